"""Run retention: the built-in prune handler, and the all-time totals that outlive it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import django_workitems as workitems
from django_workitems import recording
from django_workitems.activation import Failure, RunSnapshot
from django_workitems.housekeeping import PRUNE_RUNS_HANDLER, PruneRunsHandler
from django_workitems.models import Handler, HandlerRun, ItemFailure, RunStatus
from django_workitems.recording import sync_handlers
from django_workitems.registry import registry as default_registry
from django_workitems.testing import run_handler
from tests.factories import HandlerFactory, HandlerRunFactory, ItemFailureFactory
from tests.testapp.models import Job

RETENTION = timedelta(days=30)  # the default RUN_RETENTION


def aged(days: float, **kwargs) -> HandlerRun:
    started = timezone.now() - timedelta(days=days)
    run: HandlerRun = HandlerRunFactory.create(started_at=started, finished_at=started, **kwargs)
    return run


def test_the_app_registers_the_prune_handler_like_any_other():
    registration = default_registry.get(PRUNE_RUNS_HANDLER)
    assert registration.purpose == workitems.Purpose.INTERNAL
    assert registration.exclusive  # one process prunes at a time
    assert registration.poll_interval == timedelta(hours=1)


@pytest.mark.django_db
def test_prunes_finished_runs_older_than_the_retention_with_their_failures():
    handler = HandlerFactory()
    old = [aged(31 + i, handler=handler) for i in range(3)]
    failure = ItemFailureFactory(run=old[0])
    recent = aged(29, handler=handler)
    stuck = aged(40, handler=handler, status=RunStatus.RUNNING)  # never deleted while running
    kept_failure = ItemFailureFactory(run=recent)

    result = run_handler(PruneRunsHandler, max_items=10)

    assert (result.succeeded, result.failed) == (1, 0)  # one batch of three
    assert set(HandlerRun.objects.values_list("pk", flat=True)) == {recent.pk, stuck.pk}
    assert not ItemFailure.objects.filter(pk=failure.pk).exists()
    assert ItemFailure.objects.filter(pk=kept_failure.pk).exists()
    assert Handler.objects.filter(pk=handler.pk).exists()


@pytest.mark.django_db
def test_prunes_in_bounded_batches_oldest_first(monkeypatch):
    monkeypatch.setattr(PruneRunsHandler, "batch_size", 2)
    handler = HandlerFactory()
    runs = [aged(100 - i, handler=handler) for i in range(5)]  # runs[0] is the oldest
    for run in runs:
        ItemFailureFactory.create_batch(3, run=run)

    first = run_handler(PruneRunsHandler, max_items=1)

    assert [len(batch.run_ids) for batch in first.items] == [2]
    assert set(HandlerRun.objects.values_list("pk", flat=True)) == {r.pk for r in runs[2:]}

    rest = run_handler(PruneRunsHandler, max_items=10)
    assert [len(batch.run_ids) for batch in rest.items] == [2, 1]
    assert not HandlerRun.objects.exists() and not ItemFailure.objects.exists()


@pytest.mark.django_db
def test_a_batch_costs_the_same_queries_however_many_failures_its_runs_have(monkeypatch):
    monkeypatch.setattr(PruneRunsHandler, "batch_size", 3)

    def prune_one_batch(failures_per_run: int) -> int:
        for _ in range(3):
            ItemFailureFactory.create_batch(failures_per_run, run=aged(60))
        handler = PruneRunsHandler()
        (batch,) = handler.fetch_next(1, workitems.CancellationToken())
        with CaptureQueriesContext(connection) as ctx:
            handler.process(batch, workitems.CancellationToken())
        assert not HandlerRun.objects.exists()
        return len(ctx.captured_queries)

    assert prune_one_batch(1) == prune_one_batch(40)


@pytest.mark.django_db
@override_settings(WORKITEMS={"RUN_RETENTION": "2.00:00:00"})
def test_the_retention_setting_decides_what_expires():
    kept, gone = aged(1), aged(3)
    run_handler(PruneRunsHandler)
    assert list(HandlerRun.objects.values_list("pk", flat=True)) == [kept.pk]
    assert not HandlerRun.objects.filter(pk=gone.pk).exists()


@pytest.mark.django_db
def test_backlog_counts_expired_runs_and_dates_the_oldest_expiry():
    handler = PruneRunsHandler()
    assert handler.backlog() == 0 and handler.oldest_waiting() is None
    oldest = aged(45)
    aged(35)
    aged(5)
    assert handler.backlog() == 2
    assert handler.oldest_waiting() == oldest.started_at + RETENTION


# All-time totals --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_totals_are_kept_as_runs_finish_and_survive_pruning():
    Job.objects.bulk_create([Job(), Job(), Job(action="fail")])
    workitems.run_once(handlers=["jobs"])
    Job.objects.bulk_create([Job()])
    workitems.run_once(handlers=["jobs"])

    # The failed job stays queued, so the second run fails it again: 2 + 1 ok, 1 + 1 failed.
    jobs = Handler.objects.get(name="jobs")
    assert (jobs.total_runs, jobs.total_items_succeeded, jobs.total_items_failed) == (2, 3, 2)

    HandlerRun.objects.update(started_at=timezone.now() - RETENTION - timedelta(days=1))
    workitems.run_once(handlers=[PRUNE_RUNS_HANDLER])

    assert not HandlerRun.objects.filter(handler=jobs).exists()
    jobs.refresh_from_db()
    assert (jobs.total_runs, jobs.total_items_succeeded, jobs.total_items_failed) == (2, 3, 2)
    prune = Handler.objects.get(name=PRUNE_RUNS_HANDLER)
    assert prune.total_runs == 1 and prune.total_items_succeeded == 1  # its own run: one batch


def _snapshot(succeeded, failed, failures=(), status=None, fetched=5):
    return RunSnapshot(
        fetched=fetched,
        succeeded=succeeded,
        failed=failed,
        failures=tuple(failures),
        status=status,
        error="",
    )


@pytest.mark.django_db
def test_progress_writes_absolute_counts_and_the_end_adds_the_totals_once():
    handler = HandlerFactory()
    run_id = recording.create_run(
        handler.pk, worker_id=None, started_at=timezone.now(), items_fetched=5
    )
    failure = Failure("7", "builtins.ValueError", "bad", "tb", timezone.now())

    recording.write_run(run_id, handler.pk, _snapshot(3, 1, [failure]))
    recording.write_run(run_id, handler.pk, _snapshot(3, 1))  # a retry: nothing doubles
    run = HandlerRun.objects.get(pk=run_id)
    assert (run.items_succeeded, run.items_failed, run.status) == (3, 1, RunStatus.RUNNING)
    handler.refresh_from_db()
    assert handler.total_runs == handler.total_items_succeeded == 0  # added at the end

    with CaptureQueriesContext(connection) as ctx:
        recording.write_run(run_id, handler.pk, _snapshot(4, 1, status=RunStatus.PARTIAL))
    handler_updates = [
        q["sql"]
        for q in ctx.captured_queries
        if q["sql"].startswith("UPDATE") and 'django_workitems_handler"' in q["sql"].split("SET")[0]
    ]
    assert len(handler_updates) == 1
    handler.refresh_from_db()
    assert (handler.total_runs, handler.total_items_succeeded, handler.total_items_failed) == (
        1,
        4,
        1,
    )
    assert ItemFailure.objects.filter(run_id=run_id).count() == 1


@pytest.mark.django_db
def test_a_run_finished_twice_counts_once():
    handler = HandlerFactory()
    run_id = recording.create_run(
        handler.pk, worker_id=None, started_at=timezone.now(), items_fetched=1
    )
    done = _snapshot(1, 0, status=RunStatus.SUCCEEDED, fetched=1)
    recording.write_run(run_id, handler.pk, done)
    recording.write_run(run_id, handler.pk, done)  # the reply to the first was lost
    late = recording.create_run(
        handler.pk, worker_id=None, started_at=timezone.now(), items_fetched=1
    )
    HandlerRun.objects.filter(pk=late).update(status=RunStatus.ABANDONED)
    recording.write_run(late, handler.pk, done)
    handler.refresh_from_db()
    # The abandoned run keeps its status and gets its counts; it was not finished by its worker.
    assert (handler.total_runs, handler.total_items_succeeded) == (1, 1)
    assert HandlerRun.objects.get(pk=late).items_succeeded == 1


@pytest.mark.django_db
def test_create_run_is_idempotent_for_one_activation():
    handler = HandlerFactory()
    started = timezone.now()
    first = recording.create_run(handler.pk, worker_id=None, started_at=started, items_fetched=1)
    again = recording.create_run(handler.pk, worker_id=None, started_at=started, items_fetched=1)
    assert first == again and HandlerRun.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_migration_starts_the_totals_from_the_existing_runs():
    executor = MigrationExecutor(connection)
    executor.migrate([("django_workitems", "0001_initial")])
    try:
        apps = executor.loader.project_state([("django_workitems", "0001_initial")]).apps
        OldHandler = apps.get_model("django_workitems", "Handler")
        OldRun = apps.get_model("django_workitems", "HandlerRun")
        busy = OldHandler.objects.create(name="busy")
        OldHandler.objects.create(name="idle")
        for status, ok, failed in (
            ("succeeded", 5, 0),
            ("partial", 3, 2),
            ("running", 1, 0),
            ("abandoned", 2, 1),
        ):
            OldRun.objects.create(
                handler=busy, status=status, items_succeeded=ok, items_failed=failed
            )
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
    totals = {
        name: (runs, ok, failed)
        for name, runs, ok, failed in Handler.objects.values_list(
            "name", "total_runs", "total_items_succeeded", "total_items_failed"
        )
    }
    assert totals == {"busy": (2, 11, 3), "idle": (0, 0, 0)}


@pytest.mark.django_db
def test_sync_does_not_reset_the_totals():
    jobs = sync_handlers(default_registry)["jobs"]
    Handler.objects.filter(pk=jobs.pk).update(total_runs=9, total_items_succeeded=90)
    sync_handlers(default_registry)
    jobs.refresh_from_db()
    assert (jobs.total_runs, jobs.total_items_succeeded) == (9, 90)


@pytest.mark.django_db
def test_workers_silent_for_longer_than_the_retention_are_forgotten():
    from django_workitems.models import Worker
    from tests.factories import WorkerFactory
    from tests.testapp.models import Task

    old = WorkerFactory(last_heartbeat_at=timezone.now() - RETENTION - timedelta(days=1))
    recent = WorkerFactory(last_heartbeat_at=timezone.now() - timedelta(days=1))
    run = aged(40, worker=old)
    task = Task.objects.create(status="failed", claimed_by=old)

    run_handler(PruneRunsHandler)

    assert list(Worker.objects.all()) == [recent]
    assert not HandlerRun.objects.filter(pk=run.pk).exists()  # pruned as before
    task.refresh_from_db()
    assert task.claimed_by is None and task.status == "failed"  # the row itself is kept
