"""Claims under faults (issue 11), on SQLite and PostgreSQL: the database's clock decides,
a worker never takes back its own rows, a claim whose reply was lost is undone, outcome writes
survive an outage, any queryset and any number of rows work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.db import OperationalError, connection
from django.db.models import Q
from django.utils import timezone

import django_workitems as workitems
from django_workitems.claims import ClaimBook
from django_workitems.handlers import current_worker_id
from tests.factories import WorkerFactory
from tests.testapp.handlers import TaskHandler
from tests.testapp.models import Task

pytestmark = pytest.mark.django_db

CANCEL = workitems.CancellationToken()


@contextmanager
def as_worker(worker_id: int | None) -> Iterator[None]:
    token = current_worker_id.set(worker_id)
    try:
        yield
    finally:
        current_worker_id.reset(token)


@contextmanager
def database_fails(match: str, *, after: bool) -> Iterator[list[str]]:
    """Statements containing ``match`` raise OperationalError, before or after they ran.

    ``after=True`` is a lost reply: the statement committed, the caller never hears of it.
    """
    seen: list[str] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if match in sql:
            seen.append(sql)
            if after:
                execute(sql, params, many, context)
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield seen


@pytest.mark.django_db(transaction=True)
def test_a_claim_whose_reply_was_lost_is_put_back_without_counting_an_attempt():
    """Defect 1: the commit succeeded, the reply was lost; the rows must not stay stuck."""
    worker = WorkerFactory()
    Task.objects.bulk_create([Task() for _ in range(20)])
    handler = TaskHandler()
    with as_worker(worker.pk):
        with database_fails("UPDATE", after=True) as seen, pytest.raises(OperationalError):
            # The sweep for dead workers' rows runs first; fail the normal claim itself.
            handler.claims._next_sweep[handler._model_key(handler.get_queryset())] = 1e18
            handler.fetch_next(20, CANCEL)
        assert seen, "the claim never reached the database"
        if connection.vendor == "postgresql":  # one statement: it committed, unknown to us
            assert Task.objects.filter(status="processing").count() == 20
        assert handler.claims.pending == 1

        handler.claims.settle()  # what the lease keeper does on its next heartbeat

    assert handler.claims.pending == 0
    assert Task.objects.filter(status="queued", attempts=0, claim_token=None).count() == 20
    with as_worker(worker.pk):
        assert len(TaskHandler().fetch_next(20, CANCEL)) == 20


@pytest.mark.django_db(transaction=True)
def test_a_failed_claim_after_a_take_back_keeps_the_row_taken_back():
    """Defect 5: the row taken back is processed, not orphaned; take-backs go on afterwards."""
    dead = WorkerFactory(stopped_at=timezone.now())
    alive = WorkerFactory()
    Task.objects.bulk_create([Task() for _ in range(4)])
    Task.objects.claim(2, worker_id=dead.pk)
    handler = TaskHandler()
    with as_worker(alive.pk):
        # Only the normal claim (ordered by availability) fails; the take-back goes through.
        with database_fails('ORDER BY "testapp_task"."available_at"', after=False):
            rows = handler.fetch_next(5, CANCEL)
        assert len(rows) == 2 and {r.claimed_by_id for r in rows} == {alive.pk}
        for row in rows:
            handler.process(row, CANCEL)
        handler.close()
        assert Task.objects.filter(status="succeeded").count() == 2
        # Take-backs go on: another dead worker's row is taken back by the next fetch.
        Task.objects.claim(1, worker_id=dead.pk)
        again = TaskHandler()
        again.claims = handler.claims
        second = again.fetch_next(1, CANCEL)
        assert len(second) == 1
        assert second[0].claimed_by_id == alive.pk and second[0].attempts == 2
    assert Task.objects.filter(claimed_by=dead).count() == 0


def test_a_worker_never_takes_back_its_own_rows_even_after_a_long_outage():
    """Defect 11: its heartbeat is older than LEASE_TIMEOUT, but it is alive: its items too."""
    me = WorkerFactory()
    Task.objects.bulk_create([Task() for _ in range(3)])
    mine = Task.objects.claim(3, worker_id=me.pk)
    type(me).objects.filter(pk=me.pk).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))

    with as_worker(me.pk):
        assert TaskHandler().fetch_next(10, CANCEL) == []
    assert set(Task.objects.values_list("claim_token", flat=True)) == {mine[0].claim_token}
    assert set(Task.objects.values_list("attempts", flat=True)) == {1}

    other = WorkerFactory()
    elsewhere = TaskHandler()
    elsewhere.claims = ClaimBook()  # another process, with a claim book of its own
    with as_worker(other.pk):
        assert len(elsewhere.fetch_next(10, CANCEL)) == 3  # to anyone else it looks dead


def test_the_database_clock_decides_not_the_hosts():
    """Defect 12: a host whose clock is an hour ahead takes no live worker's row and no row
    still waiting out its back-off."""
    live = WorkerFactory()  # heartbeats on the database's clock
    Task.objects.bulk_create([Task() for _ in range(2)])
    Task.objects.claim(1, worker_id=live.pk)
    Task.objects.filter(status="queued").update(available_at=timezone.now() + timedelta(minutes=30))
    ahead = WorkerFactory()
    skewed = timezone.now() + timedelta(hours=1)
    with as_worker(ahead.pk), mock.patch("django.utils.timezone.now", return_value=skewed):
        assert TaskHandler().fetch_next(10, CANCEL) == []
    assert Task.objects.filter(claimed_by=live).count() == 1


def test_a_retry_back_off_is_counted_on_the_database_clock():
    worker = WorkerFactory()
    Task.objects.create(action="fail")
    handler = TaskHandler()
    handler.retry_backoff = 3600.0
    with as_worker(worker.pk):
        [row] = handler.fetch_next(1, CANCEL)
        skewed = timezone.now() - timedelta(days=1)  # a host a day behind writes the failure
        with (
            mock.patch("django.utils.timezone.now", return_value=skewed),
            pytest.raises(ValueError),
        ):
            handler.process(row, CANCEL)
    row.refresh_from_db()
    assert row.status == "queued"
    assert row.available_at > timezone.now() + timedelta(minutes=55)


@pytest.mark.django_db(transaction=True)
def test_outcome_writes_survive_an_outage_and_are_written_when_it_ends():
    """Defect 13: outcomes the database refused are kept and written on the next beat."""
    worker = WorkerFactory()
    Task.objects.bulk_create([Task() for _ in range(6)] + [Task(action="fail")])
    handler = TaskHandler()
    handler.success_batch_size = 1
    with as_worker(worker.pk):
        rows = handler.fetch_next(10, CANCEL)
        with database_fails("UPDATE", after=False):
            for row in rows:
                with suppress(ValueError):
                    handler.process(row, CANCEL)
        assert handler.claims.pending == len(rows)
        assert Task.objects.filter(status="processing").count() == len(rows)
        handler.claims.settle()
    assert handler.claims.pending == 0
    assert Task.objects.filter(status="succeeded").count() == 6
    assert Task.objects.get(action="fail").status == "queued"


def test_kept_outcomes_are_bounded():
    with mock.patch("django_workitems.claims.MAX_UNSETTLED", 3):
        book = ClaimBook()
    from django_workitems.claims import _Write

    for i in range(5):
        book.keep(_Write(Task, Q(pk=i), {"status": "succeeded"}, f"write {i}"))
    assert book.pending == 3


def test_more_than_a_thousand_rows_are_released_in_one_go():
    """Defect 9: SQLite refused the release of ~1,000 rows ("Expression tree is too large")."""
    Task.objects.bulk_create([Task() for _ in range(1500)])
    handler = TaskHandler()
    rows = handler.fetch_next(1500, CANCEL)
    assert len(rows) == 1500
    handler.release(rows)
    assert handler.claims.pending == 0
    assert Task.objects.filter(status="queued", attempts=0).count() == 1500


class JoinedTaskHandler(TaskHandler):
    """A queryset with an outer join and ``distinct()``: PostgreSQL cannot lock it as it is."""

    queryset = (
        Task.objects.filter(Q(claimed_by__isnull=True) | Q(claimed_by__hostname="nowhere"))
        .filter(action__in=["ok", "fail"])
        .distinct()
        .order_by("-pk")
    )


def test_querysets_with_joins_and_distinct_are_claimed_on_both_databases():
    """Defect 14: "FOR UPDATE cannot be applied to the nullable side of an outer join"."""
    Task.objects.bulk_create([Task() for _ in range(5)] + [Task(action="sleep")])
    handler = JoinedTaskHandler()
    rows = handler.fetch_next(10, CANCEL)
    assert sorted(r.action for r in rows) == ["ok"] * 5
    assert handler.fetch_next(10, CANCEL) == []
    for row in rows:
        handler.process(row, CANCEL)
    handler.close()
    assert Task.objects.filter(status="succeeded").count() == 5
    assert Task.objects.get(action="sleep").status == "queued"
