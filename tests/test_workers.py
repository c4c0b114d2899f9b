"""Worker rows, heartbeats, abandoned runs and leases."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from django_workitems import recording
from django_workitems.activation import RunSnapshot
from django_workitems.leases import LeaseKeeper
from django_workitems.models import Handler, HandlerRun, RunStatus, Worker
from tests.conftest import wait_for
from tests.factories import HandlerFactory, HandlerRunFactory, WorkerFactory


@pytest.mark.django_db
def test_runs_of_a_dead_worker_are_abandoned_and_live_ones_kept():
    dead = WorkerFactory(last_heartbeat_at=timezone.now() - timedelta(minutes=5))
    stopped = WorkerFactory(stopped_at=timezone.now())
    alive = WorkerFactory()
    dead_run = HandlerRunFactory(worker=dead, status=RunStatus.RUNNING)
    stopped_run = HandlerRunFactory(worker=stopped, status=RunStatus.RUNNING)
    live_run = HandlerRunFactory(worker=alive, status=RunStatus.RUNNING)
    finished = HandlerRunFactory(worker=dead, status=RunStatus.SUCCEEDED)

    names = recording.abandon_runs_of_dead_workers(timedelta(minutes=1))
    assert names == sorted({dead_run.handler.name, stopped_run.handler.name})

    for run in (dead_run, stopped_run, live_run, finished):
        run.refresh_from_db()
    assert dead_run.status == stopped_run.status == RunStatus.ABANDONED
    assert dead_run.finished_at is not None and "heartbeat" in dead_run.error
    assert live_run.status == RunStatus.RUNNING
    assert finished.status == RunStatus.SUCCEEDED
    assert set(Worker.objects.alive(timedelta(minutes=1))) == {alive}
    assert set(Worker.objects.dead(timedelta(minutes=1))) == {dead, stopped}


@pytest.mark.django_db
def test_an_abandoned_run_is_not_overwritten_by_its_late_worker():
    run = HandlerRunFactory(status=RunStatus.ABANDONED)
    snapshot = RunSnapshot(
        fetched=3, succeeded=3, failed=0, failures=(), status=RunStatus.SUCCEEDED, error=""
    )
    recording.write_run(run.pk, run.handler_id, snapshot)
    run.refresh_from_db()
    assert run.status == RunStatus.ABANDONED and run.items_succeeded == 3


@pytest.mark.django_db
def test_lease_is_taken_with_one_conditional_update_on_the_database_clock():
    handler = HandlerFactory()
    ttl = timedelta(minutes=1)
    one = LeaseKeeper(owner="worker:1", ttl=ttl)
    two = LeaseKeeper(owner="worker:2", ttl=ttl)
    first = one.acquire(handler.pk)
    assert first is not None and first.valid()
    assert one.acquire(handler.pk) is not None  # the holder may re-take it
    assert two.acquire(handler.pk) is None
    assert one.holder(handler.pk) == "worker:1"
    Handler.objects.filter(pk=handler.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    taken = two.acquire(handler.pk)
    assert taken is not None
    two.ttl = timedelta(hours=1)
    two.renew()
    handler.refresh_from_db()
    assert handler.lease_expires_at > timezone.now() + timedelta(minutes=59)
    # The first holder learns at its next renewal that the lease is gone: fenced for good.
    one.renew()
    assert not first.valid() and all(not lease.valid() for lease in one.held())
    two.release(taken)
    assert two.holder(handler.pk) == "" and not taken.valid()


@pytest.mark.django_db
def test_a_lease_not_renewed_within_its_timeout_is_fenced_in_this_process(monkeypatch):
    handler = HandlerFactory()
    keeper = LeaseKeeper(owner="worker:1", ttl=timedelta(seconds=10))
    lease = keeper.acquire(handler.pk)
    assert lease is not None and lease.valid()
    # A stall (SIGSTOP, a long GC pause, an outage) longer than the lease: monotonic time moves.
    real = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real() + 11)
    assert not lease.valid()
    monkeypatch.setattr(time, "monotonic", real)
    keeper.renew()  # the renewal itself succeeds (nobody took it), but trust is not restored
    assert not lease.valid()


@pytest.mark.django_db(transaction=True)
@override_settings(WORKITEMS={"LEASE_TIMEOUT": "00:00:01", "POLL_INTERVAL": 3600})
def test_a_running_worker_heartbeats_and_abandons_the_runs_of_dead_workers(
    registry, list_handler, run_in_background
):
    dead = WorkerFactory(last_heartbeat_at=timezone.now() - timedelta(minutes=5))
    orphan = HandlerRunFactory(worker=dead, status=RunStatus.RUNNING)
    registry.add_handler(list_handler("idle", 0), name="idle")

    service = run_in_background(registry=registry)
    first_beat = Worker.objects.get(pk=service.worker.pk).last_heartbeat_at
    wait_for(
        lambda: Worker.objects.get(pk=service.worker.pk).last_heartbeat_at > first_beat,
        message="a heartbeat",
    )
    wait_for(
        lambda: HandlerRun.objects.get(pk=orphan.pk).status == RunStatus.ABANDONED,
        message="abandon",
    )


@pytest.mark.django_db
def test_sync_handlers_creates_updates_and_flags_unregistered(registry, list_handler):
    HandlerFactory(name="gone", is_registered=True)
    HandlerFactory(name="kept", max_items_per_cycle=1, is_enabled=False)
    registry.add_handler(
        list_handler("kept", 0), name="kept", max_items_per_cycle=7, purpose="export"
    )
    registry.add_handler(list_handler("new", 0), name="new")

    rows = recording.sync_handlers(registry)

    assert set(rows) == {"kept", "new"}
    kept = Handler.objects.get(name="kept")
    assert (kept.max_items_per_cycle, kept.purpose, kept.is_enabled) == (7, "export", False)
    assert Handler.objects.get(name="new").is_registered
    gone = Handler.objects.get(name="gone")
    assert not gone.is_registered  # kept for its history, not deleted
