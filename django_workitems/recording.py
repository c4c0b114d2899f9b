"""Everything that writes handler rows, runs, failures, leases and worker heartbeats.

The processing code talks to the database only through this module, so the run models have
one owner and counters are written once per batch, never once per item.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import DEFAULT_DB_ALIAS, transaction
from django.db.models import F, Q, Subquery
from django.utils import timezone

from . import wakeups
from .models import Handler, HandlerRun, ItemFailure, RunStatus, Worker, lease_is_free
from .registry import Registration

MAX_MESSAGE = 10_000
MAX_TRACEBACK = 50_000


@dataclass(frozen=True)
class FailureRecord:
    """A failed item, ready to be written as an :class:`ItemFailure`."""

    item_id: str
    error_type: str
    message: str
    traceback: str
    occurred_at: datetime


def sync_handlers(registrations: Iterable[Registration]) -> dict[str, Handler]:
    """Create or update one ``Handler`` row per registration; flag the others unregistered."""
    wanted = {r.name: r for r in registrations}
    Handler.objects.bulk_create(
        [
            Handler(
                name=r.name,
                purpose=r.purpose,
                max_items_per_cycle=r.max_items_per_cycle,
                handler_class=r.handler_class,
            )
            for r in wanted.values()
        ],
        ignore_conflicts=True,  # another worker starting at the same moment may win
    )
    rows = {h.name: h for h in Handler.objects.filter(name__in=wanted)}
    changed = []
    for name, row in rows.items():
        r = wanted[name]
        fresh = (r.purpose.value, r.max_items_per_cycle, r.handler_class, True)
        if (row.purpose, row.max_items_per_cycle, row.handler_class, row.is_registered) != fresh:
            row.purpose, row.max_items_per_cycle, row.handler_class, row.is_registered = fresh
            row.modified = timezone.now()
            changed.append(row)
    if changed:
        Handler.objects.bulk_update(
            changed,
            ["purpose", "max_items_per_cycle", "handler_class", "is_registered", "modified"],
        )
    Handler.objects.exclude(name__in=wanted).filter(is_registered=True).update(
        is_registered=False, modified=timezone.now()
    )
    return rows


@dataclass(frozen=True)
class HandlerState:
    """What a worker needs to know of a ``Handler`` row each second."""

    handler_id: int
    is_enabled: bool
    run_requested_at: datetime | None


def handler_states(names: Iterable[str]) -> dict[str, HandlerState]:
    """Enabled flags and run requests of the named handlers, in one query."""
    return {
        name: HandlerState(pk, enabled, requested)
        for name, pk, enabled, requested in Handler.objects.filter(
            name__in=list(names)
        ).values_list("name", "pk", "is_enabled", "run_requested_at")
    }


def request_run(name: str, using: str = DEFAULT_DB_ALIAS) -> bool:
    """Ask running workers to activate ``name`` now; False when it has no ``Handler`` row.

    Sets ``run_requested_at`` (workers read it within a second) and, on PostgreSQL, sends the
    ``NOTIFY`` that wakes them at once.
    """
    updated = Handler.objects.using(using).filter(name=name).update(run_requested_at=timezone.now())
    if updated:
        wakeups.send(name, using=using)
    return updated == 1


def create_run(
    handler_id: int,
    *,
    worker_id: int | None,
    started_at: datetime,
    items_fetched: int,
    status: str = RunStatus.RUNNING,
    error: str = "",
) -> int:
    """Insert the run of an activation once its fetch has returned; returns its id."""
    run = HandlerRun.objects.create(
        handler_id=handler_id,
        worker_id=worker_id,
        started_at=started_at,
        items_fetched=items_fetched,
        status=status,
        error=error[:MAX_MESSAGE],
        finished_at=None if status == RunStatus.RUNNING else timezone.now(),
    )
    return run.pk


def record_progress(
    run_id: int,
    *,
    succeeded: int,
    failed: int,
    failures: Sequence[FailureRecord],
    status: str | None = None,
    error: str | None = None,
) -> None:
    """Add a batch of outcomes to a run; with ``status``, also finish it.

    Counts are added whatever the run's status (a progress batch may land after the finish);
    the status is only changed while the run is ``running``, so a run that another worker
    marked ``abandoned`` stays so. The handler's all-time totals get the same counts (and one
    run when this call finishes it) in one more UPDATE, so they outlive pruned runs.
    """
    counts: dict[str, Any] = {}
    totals: dict[str, Any] = {}
    if succeeded:
        counts["items_succeeded"] = F("items_succeeded") + succeeded
        totals["total_items_succeeded"] = F("total_items_succeeded") + succeeded
    if failed:
        counts["items_failed"] = F("items_failed") + failed
        totals["total_items_failed"] = F("total_items_failed") + failed
    with transaction.atomic():
        if status is not None:
            ending: dict[str, Any] = {"status": status, "finished_at": timezone.now()}
            if error:
                ending["error"] = error[:MAX_MESSAGE]
            # The usual case in one statement; a run no longer running only gets its counts.
            if HandlerRun.objects.filter(pk=run_id, status=RunStatus.RUNNING).update(
                **counts, **ending
            ):
                totals["total_runs"] = F("total_runs") + 1
            elif counts:
                HandlerRun.objects.filter(pk=run_id).update(**counts)
        elif counts:
            HandlerRun.objects.filter(pk=run_id).update(**counts)
        if failures:
            ItemFailure.objects.bulk_create(
                ItemFailure(
                    run_id=run_id,
                    item_id=f.item_id[:255],
                    error_type=f.error_type[:255],
                    message=f.message[:MAX_MESSAGE],
                    traceback=f.traceback[-MAX_TRACEBACK:],
                    occurred_at=f.occurred_at,
                )
                for f in failures
            )
        if totals:
            # Last, so the lock on the handler row, which every worker of a scaled-out
            # handler shares, is held only until the commit.
            Handler.objects.filter(
                pk=Subquery(HandlerRun.objects.filter(pk=run_id).values("handler_id")[:1])
            ).update(**totals)


# Leases of exclusive handlers -------------------------------------------------------------


def acquire_lease(handler_id: int, owner: str, ttl: timedelta) -> bool:
    """Take the handler's lease with one conditional UPDATE; True when this owner holds it."""
    now = timezone.now()
    taken = (
        Handler.objects.filter(pk=handler_id)
        .filter(lease_is_free(now) | Q(lease_owner=owner))
        .update(lease_owner=owner, lease_expires_at=now + ttl)
    )
    return taken == 1


def renew_leases(owner: str, ttl: timedelta) -> int:
    """Push back the expiry of every lease ``owner`` holds; returns how many."""
    return Handler.objects.filter(lease_owner=owner).update(lease_expires_at=timezone.now() + ttl)


def release_lease(handler_id: int, owner: str) -> None:
    """Give up the lease if ``owner`` still holds it."""
    Handler.objects.filter(pk=handler_id, lease_owner=owner).update(
        lease_owner="", lease_expires_at=None
    )


def lease_holder(handler_id: int) -> str:
    return Handler.objects.filter(pk=handler_id).values_list("lease_owner", flat=True).first() or ""


# Workers -------------------------------------------------------------------------------


def register_worker() -> Worker:
    """Insert the ``Worker`` row of this process."""
    return Worker.objects.create(hostname=socket.gethostname()[:255], pid=os.getpid())


def heartbeat(worker_id: int) -> None:
    Worker.objects.filter(pk=worker_id).update(last_heartbeat_at=timezone.now())


def stop_worker(worker_id: int) -> None:
    Worker.objects.filter(pk=worker_id).update(stopped_at=timezone.now())


def abandon_runs_of_dead_workers(lease_timeout: timedelta) -> int:
    """Mark ``abandoned`` the running runs whose worker stopped or stopped heartbeating."""
    dead = Worker.objects.dead(lease_timeout).values("pk")
    return HandlerRun.objects.filter(status=RunStatus.RUNNING, worker__in=dead).update(
        status=RunStatus.ABANDONED,
        finished_at=timezone.now(),
        error="Its worker stopped heartbeating before the run finished.",
    )
