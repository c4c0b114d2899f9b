"""Bad items and hung calls (issue 11, defects 6-8): each fails alone, visibly, and leaves its
pool thread (or the pool) healthy; ``run_once`` always returns."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction

import django_workitems as workitems
from django_workitems.background import run_once
from django_workitems.models import HandlerRun, ItemFailure, RunStatus
from tests.testapp.models import Job

pytestmark = pytest.mark.django_db(transaction=True)


class BadId:
    @property
    def id(self) -> Any:
        raise RuntimeError("no id for you")


class BadIdFails(BadId):
    def run(self, cancel: workitems.CancellationToken) -> None:
        raise ValueError("and it fails")


class BadMessage(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message either")


class Items(workitems.WorkItemHandler[Any]):
    """Hands out ``items`` once (then nothing); ``process`` calls each item's ``run``."""

    items: list[Any] = []

    def __init__(self) -> None:
        self.done: list[Any] = []

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[Any]:
        batch, type(self).items = type(self).items[:max_items], type(self).items[max_items:]
        return batch

    def process(self, item: Any, cancel: workitems.CancellationToken) -> None:
        if callable(getattr(item, "run", None)):
            item.run(cancel)


class Ok:
    def __init__(self, ident: str) -> None:
        self.id = ident

    def run(self, cancel: workitems.CancellationToken) -> None:
        Job.objects.create(queue="ok", action=self.id)


class RaisesBadMessage(Ok):
    def run(self, cancel: workitems.CancellationToken) -> None:
        raise BadMessage()


class LeaksTransaction(Ok):
    def run(self, cancel: workitems.CancellationToken) -> None:
        transaction.atomic().__enter__()  # never exited: the transaction stays open
        Job.objects.create(queue="leaked", action=self.id)


class Hangs(Ok):
    unblock = threading.Event()

    def run(self, cancel: workitems.CancellationToken) -> None:
        self.unblock.wait(120)  # ignores its token, like a blocking call would


def handler_with(items: list[Any]) -> type[Items]:
    return type("ItemsOf", (Items,), {"items": list(items)})


def test_an_item_whose_id_raises_fails_alone_and_the_run_ends(registry):
    items = [BadId(), BadIdFails(), Ok("a"), Ok("b")]
    registry.add_handler(handler_with(items), name="bad-id", exclusive=False)

    result = run_once(registry=registry)

    assert (result["bad-id"].succeeded, result["bad-id"].failed) == (3, 1)
    run = HandlerRun.objects.get(handler__name="bad-id")
    assert run.status == RunStatus.PARTIAL and run.finished_at is not None
    assert ItemFailure.objects.get(run=run).item_id  # named somehow, never empty


def test_an_exception_whose_str_raises_is_recorded_by_its_type(registry):
    registry.add_handler(handler_with([RaisesBadMessage("x"), Ok("y")]), name="bad-message")

    result = run_once(registry=registry)

    assert (result["bad-message"].succeeded, result["bad-message"].failed) == (1, 1)
    failure = ItemFailure.objects.get(run__handler__name="bad-message")
    assert failure.item_id == "x" and failure.error_type.endswith("BadMessage")
    assert HandlerRun.objects.get(handler__name="bad-message").status == RunStatus.PARTIAL


class ClosesWithSystemExit(Items):
    def close(self) -> None:
        raise SystemExit(3)


def test_close_raising_systemexit_still_stores_a_real_status(registry):
    handler = type("C", (ClosesWithSystemExit,), {"items": [Ok("1")]})
    registry.add_handler(handler, name="close-exit")

    run_once(registry=registry)

    run = HandlerRun.objects.get(handler__name="close-exit")
    assert run.status in set(RunStatus) and run.status != ""
    assert run.items_succeeded == 1 and "close()" in run.error


def test_a_process_that_leaves_a_transaction_open_fails_alone(registry):
    """Defect 8: rolled back, its item failed, the thread's next items unaffected."""
    items = [LeaksTransaction("leak")] + [Ok(f"after-{i}") for i in range(6)]
    registry.add_handler(handler_with(items), name="leaky", exclusive=False)

    with override_workers(1):
        result = run_once(registry=registry)

    assert (result["leaky"].succeeded, result["leaky"].failed) == (6, 1)
    assert not Job.objects.filter(queue="leaked").exists(), "the open transaction was committed"
    assert Job.objects.filter(queue="ok").count() == 6
    failure = ItemFailure.objects.get(run__handler__name="leaky")
    assert failure.item_id == "leak" and "transaction" in failure.message.lower()
    assert not connection.in_atomic_block


def test_a_hung_process_is_given_up_after_its_timeout_and_the_others_go_on(registry):
    """Defect 6: failed ("did not finish within"), visible in the run; the rest processed."""
    Hangs.unblock.clear()
    try:
        registry.add_handler(
            handler_with([Hangs("stuck")] + [Ok(f"n{i}") for i in range(5)]),
            name="hangs",
            exclusive=False,
            item_timeout=timedelta(seconds=0.5),
        )
        registry.add_handler(handler_with([Ok(f"m{i}") for i in range(3)]), name="neighbour")

        result = run_once(registry=registry)

        assert (result["hangs"].succeeded, result["hangs"].failed) == (5, 1)
        assert result["neighbour"].succeeded == 3
        failure = ItemFailure.objects.get(run__handler__name="hangs")
        assert failure.item_id == "stuck" and "did not finish within" in failure.message
        assert HandlerRun.objects.get(handler__name="hangs").status == RunStatus.PARTIAL
    finally:
        Hangs.unblock.set()


class HungFetch(workitems.WorkItemHandler[Any]):
    unblock = threading.Event()

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[Any]:
        self.unblock.wait(120)
        return [Ok("late")]

    def process(self, item: Any, cancel: workitems.CancellationToken) -> None:
        raise AssertionError("an item of a given-up fetch was processed")


def test_a_hung_fetch_is_given_up_after_its_timeout_and_other_handlers_run(registry):
    HungFetch.unblock.clear()
    try:
        registry.add_handler(HungFetch, name="hung-fetch", fetch_timeout=timedelta(seconds=0.5))
        registry.add_handler(handler_with([Ok(f"k{i}") for i in range(4)]), name="fine")

        result = run_once(registry=registry)

        assert "hung-fetch" in result.failed_fetches
        assert result["fine"].succeeded == 4
        run = HandlerRun.objects.get(handler__name="hung-fetch")
        assert run.status == RunStatus.FAILED and "within" in run.error
    finally:
        HungFetch.unblock.set()


def override_workers(n: int) -> Any:
    from django.conf import settings
    from django.test import override_settings

    return override_settings(WORKITEMS={**settings.WORKITEMS, "WORKERS": n})
