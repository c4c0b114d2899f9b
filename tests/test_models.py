"""Models, migrations and the testing helper."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command

import django_workitems as workitems
from django_workitems.models import RunStatus
from django_workitems.testing import run_handler
from tests.factories import HandlerRunFactory, ItemFailureFactory


@pytest.mark.django_db
def test_no_migration_is_missing():
    out = StringIO()
    call_command("makemigrations", "django_workitems", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


@pytest.mark.django_db
def test_run_duration_and_failures():
    failure = ItemFailureFactory()
    run = failure.run
    run.finished_at = run.started_at + timedelta(seconds=90)
    assert run.duration_seconds == 90
    assert list(run.failures.all()) == [failure]
    assert HandlerRunFactory(status=RunStatus.RUNNING).duration is None
    assert str(failure) == f"{failure.item_id}: builtins.ValueError"


class Numbers(workitems.WorkItemHandler[int]):
    closed = False

    def fetch_next(self, max_items, cancel):
        return list(range(max_items))

    def process(self, item, cancel):
        if item % 3 == 2:
            raise KeyError(item)

    def close(self):
        Numbers.closed = True


def test_run_handler_reports_items_and_failures_without_raising():
    result = run_handler(Numbers, max_items=6)
    assert result.items == [0, 1, 2, 3, 4, 5]
    assert (result.succeeded, result.failed) == (4, 2)
    assert [f.item_id for f in result.failures] == ["2", "5"]
    assert isinstance(result.failures[0].exception, KeyError)
    assert Numbers.closed


def test_run_handler_accepts_an_instance_and_async_handlers():
    class Async(workitems.WorkItemHandler[dict]):
        async def fetch_next(self, max_items, cancel):
            return [{"id": "a"}, {"id": "b"}]

        async def process(self, item, cancel):
            if item["id"] == "b":
                raise ValueError("bad b")

    result = run_handler(Async())
    assert (result.succeeded, result.failed) == (1, 1)
    assert result.failures[0].item_id == "b" and str(result.failures[0].exception) == "bad b"


def test_cancellation_token_tree():
    parent = workitems.CancellationToken()
    child = parent.child()
    assert not child.cancelled and child.wait(0) is False
    parent.cancel()
    assert child.cancelled and child.wait(5) is True
    with pytest.raises(workitems.Cancelled):
        child.raise_if_cancelled()
    late = parent.child()
    assert late.cancelled  # a child of a cancelled token starts cancelled
