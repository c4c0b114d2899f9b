"""Everything that writes handler rows, runs, failures and worker rows.

:class:`RunRecorder` is the one writer of runs once they exist: progress and end, from the
activation's own counts (absolute values, so a write retried after a lost reply never counts
twice), retried until the database answers. Leases live in :mod:`django_workitems.leases`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction
from django.db.models import F, Q
from django.utils import timezone

from . import hygiene
from .log import plural
from .models import (
    Handler,
    HandlerRun,
    ItemFailure,
    RunStatus,
    Worker,
    db_now,
    db_now_plus,
    quoted_column,
)
from .registry import Registration

if TYPE_CHECKING:
    from .activation import Activation, Failure, RunSnapshot

logger = logging.getLogger("django_workitems.recording")

MAX_MESSAGE = 10_000
MAX_TRACEBACK = 50_000


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
                schedule=r.schedule or "",
            )
            for r in wanted.values()
        ],
        ignore_conflicts=True,  # another worker starting at the same moment may win
    )
    rows = {h.name: h for h in Handler.objects.filter(name__in=wanted)}
    changed = []
    for name, row in rows.items():
        r = wanted[name]
        schedule = r.schedule or ""
        fresh = (r.purpose.value, r.max_items_per_cycle, r.handler_class, True, schedule)
        current = (
            row.purpose,
            row.max_items_per_cycle,
            row.handler_class,
            row.is_registered,
            row.schedule,
        )
        if current != fresh:
            if row.schedule != schedule:
                row.next_slot_at = None  # slots of the new expression start from now
            row.purpose, row.max_items_per_cycle, row.handler_class, row.is_registered = fresh[:4]
            row.schedule = schedule
            row.modified = timezone.now()
            changed.append(row)
    if changed:
        Handler.objects.bulk_update(
            changed,
            [
                "purpose",
                "max_items_per_cycle",
                "handler_class",
                "is_registered",
                "schedule",
                "next_slot_at",
                "modified",
            ],
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


def _db_now_minus(delta: timedelta) -> Any:
    return db_now_plus(-delta)


# Runs --------------------------------------------------------------------------------------


def reserve_run_ids(count: int) -> list[int]:
    """``count`` ids for runs not yet written, from ``HandlerRun``'s sequence (PostgreSQL).

    Empty elsewhere: there a run's id is known only once its row is inserted.
    """
    connection = connections[DEFAULT_DB_ALIAS]
    if connection.vendor != "postgresql":
        return []
    meta = HandlerRun._meta
    assert meta.pk is not None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
            [connection.ops.quote_name(meta.db_table), meta.pk.column, count],
        )
        return [int(row[0]) for row in cursor.fetchall()]


def create_run(
    handler_id: int,
    *,
    worker_id: int | None,
    started_at: datetime,
    items_fetched: int,
    status: str = RunStatus.RUNNING,
    error: str = "",
    run_id: int | None = None,
) -> int:
    """Insert the run of an activation once its first fetch returned; returns its id.

    Idempotent for one activation: with a ``run_id`` reserved beforehand, a second insert of it
    does nothing; without, a retry after a lost reply finds the row the first attempt inserted
    (same handler, worker and start time) instead of adding a second one.
    """
    run = HandlerRun(
        pk=run_id,
        handler_id=handler_id,
        worker_id=worker_id,
        started_at=started_at,
        items_fetched=items_fetched,
        status=status,
        error=error[:MAX_MESSAGE],
        finished_at=None if status == RunStatus.RUNNING else timezone.now(),
    )
    if run_id is not None:
        HandlerRun.objects.bulk_create([run], ignore_conflicts=True)
        return run_id
    existing = (
        HandlerRun.objects.filter(handler_id=handler_id, worker_id=worker_id, started_at=started_at)  # type: ignore[misc]  # worker_id None matches no row: then a run is inserted
        .values_list("pk", flat=True)
        .first()
    )
    if existing is not None:
        return int(existing)
    run.save(force_insert=True)
    return int(run.pk)


def write_failures(run_id: int, failures: Sequence[Failure]) -> None:
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


def write_run(run_id: int, handler_id: int, snapshot: RunSnapshot) -> None:
    """Write a run's counts (absolute) and new failures; with a status, also end it.

    The status changes only while the run is ``running`` (a run another worker marked
    ``abandoned`` keeps that status but gets its counts), and the handler's all-time totals
    get the run's counts in the same transaction as that change: exactly once.
    """
    counts = {
        "items_fetched": snapshot.fetched,
        "items_succeeded": snapshot.succeeded,
        "items_failed": snapshot.failed,
    }
    with transaction.atomic():
        if snapshot.status is None:
            HandlerRun.objects.filter(pk=run_id).update(**counts)
        else:
            ending: dict[str, Any] = {"status": snapshot.status, "finished_at": timezone.now()}
            if snapshot.error:
                ending["error"] = snapshot.error[:MAX_MESSAGE]
            if HandlerRun.objects.filter(pk=run_id, status=RunStatus.RUNNING).update(
                **counts, **ending
            ):
                _add_totals(handler_id, snapshot.succeeded, snapshot.failed)
            else:
                HandlerRun.objects.filter(pk=run_id).update(**counts)
        if snapshot.failures:
            write_failures(run_id, snapshot.failures)


class RunStatements:
    """A run's last write as one statement (PostgreSQL): its end and the handler's totals.

    :func:`write_run` ends a run in a transaction of three statements (five round trips with
    its BEGIN and COMMIT), after the INSERT of a run whose id was reserved; a short run has
    usually ended by the time the recorder gets to it. Here a run is inserted already ended, or
    updated from ``running`` to its end, and the handler's all-time totals get its counts in
    the same statement only when that happened: exactly once, whatever a retry after a lost
    reply does. So the recorder keeps up with hundreds of runs a second.
    """

    def __init__(self, using: str = DEFAULT_DB_ALIAS) -> None:
        self.using = using
        quote = connections[using].ops.quote_name
        run_table = quote(HandlerRun._meta.db_table)
        handler_table = quote(Handler._meta.db_table)
        col = {f: quoted_column(HandlerRun, f, using=using) for f in _RUN_COLUMNS}
        hcol = {
            f: quoted_column(Handler, f, using=using)
            for f in ("id", "total_runs", "total_items_succeeded", "total_items_failed")
        }
        # Only the models' quoted identifiers are interpolated; values are parameters.
        totals = (
            f"UPDATE {handler_table} SET "  # noqa: S608
            f"{hcol['total_runs']} = {hcol['total_runs']} + 1, "
            f"{hcol['total_items_succeeded']} = {hcol['total_items_succeeded']} + %s, "
            f"{hcol['total_items_failed']} = {hcol['total_items_failed']} + %s "
            f"FROM written WHERE {handler_table}.{hcol['id']} = written.handler RETURNING 1"
        )
        self.insert_ended = (
            f"WITH written AS (INSERT INTO {run_table} "  # noqa: S608
            f"({', '.join(col[f] for f in _RUN_COLUMNS)}) "
            f"VALUES ({', '.join(['%s'] * len(_RUN_COLUMNS))}) "
            f"ON CONFLICT ({col['id']}) DO NOTHING RETURNING {col['handler']} AS handler) " + totals
        )
        self.end = {
            with_error: (
                f"WITH written AS (UPDATE {run_table} SET "  # noqa: S608
                f"{col['items_fetched']} = %s, {col['items_succeeded']} = %s, "
                f"{col['items_failed']} = %s, {col['status']} = %s, {col['finished_at']} = %s"
                + (f", {col['error']} = %s" if with_error else "")
                + f" WHERE {col['id']} = %s AND {col['status']} = %s "
                f"RETURNING {col['handler']} AS handler) " + totals
            )
            for with_error in (False, True)
        }

    @staticmethod
    def usable(using: str = DEFAULT_DB_ALIAS) -> bool:
        return connections[using].vendor == "postgresql"

    def insert(
        self,
        run_id: int,
        handler_id: int,
        *,
        worker_id: int | None,
        started_at: datetime,
        snapshot: RunSnapshot,
    ) -> bool:
        """Insert a run that has already ended; False when a row of that id exists."""
        assert snapshot.status is not None
        values = {
            "id": run_id,
            "handler": handler_id,
            "worker": worker_id,
            "status": str(snapshot.status),
            "started_at": started_at,
            "finished_at": timezone.now(),
            "items_fetched": snapshot.fetched,
            "items_succeeded": snapshot.succeeded,
            "items_failed": snapshot.failed,
            "error": snapshot.error[:MAX_MESSAGE],
        }
        params = [values[f] for f in _RUN_COLUMNS] + [snapshot.succeeded, snapshot.failed]
        return self._execute(self.insert_ended, params)

    def finish(self, run_id: int, snapshot: RunSnapshot) -> bool:
        """End a ``running`` run; False when it is not running (another worker abandoned it)."""
        assert snapshot.status is not None
        params: list[Any] = [
            snapshot.fetched,
            snapshot.succeeded,
            snapshot.failed,
            str(snapshot.status),
            timezone.now(),
        ]
        if snapshot.error:
            params.append(snapshot.error[:MAX_MESSAGE])
        params += [run_id, str(RunStatus.RUNNING), snapshot.succeeded, snapshot.failed]
        return self._execute(self.end[bool(snapshot.error)], params)

    def _execute(self, sql: str, params: list[Any]) -> bool:
        with connections[self.using].cursor() as cursor:
            cursor.execute(sql, params)
            return len(cursor.fetchall()) == 1


_RUN_COLUMNS = (
    "id",
    "handler",
    "worker",
    "status",
    "started_at",
    "finished_at",
    "items_fetched",
    "items_succeeded",
    "items_failed",
    "error",
)


def _add_totals(handler_id: int, succeeded: int, failed: int) -> None:
    # Last in its transaction, so the lock on the handler row, which every worker of a
    # scaled-out handler shares, is held only until the commit.
    Handler.objects.filter(pk=handler_id).update(
        total_runs=F("total_runs") + 1,
        total_items_succeeded=F("total_items_succeeded") + succeeded,
        total_items_failed=F("total_items_failed") + failed,
    )


def mark_checked(handler_ids: Iterable[int]) -> None:
    """``Handler.last_checked_at`` = the database's now, for handlers just fetched."""
    ids = sorted(set(handler_ids))
    if ids:
        Handler.objects.filter(pk__in=ids).update(last_checked_at=db_now())


# Workers -------------------------------------------------------------------------------


def register_worker() -> Worker:
    """Insert the ``Worker`` row of this process."""
    worker = Worker.objects.create(hostname=socket.gethostname()[:255], pid=os.getpid())
    heartbeat(worker.pk)  # on the database's clock, like every later beat
    return worker


def heartbeat(worker_id: int) -> None:
    Worker.objects.filter(pk=worker_id).update(last_heartbeat_at=db_now())


def stop_worker(worker_id: int) -> None:
    Worker.objects.filter(pk=worker_id).update(stopped_at=db_now())


def dead_workers(lease_timeout: timedelta) -> Q:
    """Workers that stopped, or whose last heartbeat is ``lease_timeout`` old on the DB clock."""
    return Q(stopped_at__isnull=False) | Q(last_heartbeat_at__lt=_db_now_minus(lease_timeout))


def abandon_runs_of_dead_workers(lease_timeout: timedelta) -> list[str]:
    """Mark ``abandoned`` the running runs whose worker stopped or stopped heartbeating.

    Returns the names of their handlers (so a live worker can take their work over at once).
    Each run's counts so far go into its handler's totals with the change of status.
    """
    dead = Worker.objects.filter(dead_workers(lease_timeout)).values("pk")
    runs = list(
        HandlerRun.objects.filter(status=RunStatus.RUNNING, worker__in=dead).values_list(
            "pk", "handler_id", "handler__name", "items_succeeded", "items_failed"
        )[:1000]
    )
    names = []
    for run_id, handler_id, name, succeeded, failed in runs:
        with transaction.atomic():
            if HandlerRun.objects.filter(pk=run_id, status=RunStatus.RUNNING).update(
                status=RunStatus.ABANDONED,
                finished_at=timezone.now(),
                error="Its worker stopped heartbeating before the run finished.",
            ):
                _add_totals(handler_id, succeeded, failed)
                names.append(name)
    return sorted(set(names))


# The run recorder ------------------------------------------------------------------------

MAX_PENDING_RUNS = 1_000
"""Runs kept for writing before new activations wait: memory stays bounded in an outage."""

FLUSH_INTERVAL = 2.0
"""Seconds between progress writes of a long run (counts and failures, in one transaction)."""

RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
"""Pauses between attempts while the database does not answer (the last one repeats)."""

RUN_ID_BLOCK = 32
"""Run ids reserved at a time (PostgreSQL), so a new run needs no statement before its items."""


@dataclass
class _Run:
    activation: Activation
    run_id: int | None
    created: bool = True
    """False while the row of a run whose id was reserved is still to be inserted."""
    failures_written: int = 0
    written: tuple[int, int, int] | None = None
    ended: bool = False

    @property
    def unwritten(self) -> bool:
        return self.run_id is None or not self.created


class RunRecorder:
    """One thread that writes every run's progress and end, retrying until the database answers.

    Activations register when their first fetch returned (:meth:`start_run`) and report their
    end (:meth:`ended`); the recorder reads their counts itself (the activation owns them),
    writes progress every ``FLUSH_INTERVAL`` and the end as soon as it is reported. On
    PostgreSQL a run's id is reserved in advance and its row inserted here, after its first
    items have started; elsewhere :meth:`start_run` inserts it on the caller's thread. Nothing
    is dropped while the database is away: the runs wait here (at most ``MAX_PENDING_RUNS``;
    the service starts no activation while the recorder is that far behind).
    """

    def __init__(self, *, worker_id: int | None) -> None:
        self.worker_id = worker_id
        self._runs: dict[int, _Run] = {}  # by activation serial, in the order they started
        self._checked: set[int] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="workitems-recorder", daemon=True)
        self._idle = threading.Event()
        self._idle.set()
        self.failing_since: float | None = None
        self._run_ids: list[int] = []
        self._run_ids_lock = threading.Lock()
        self._reserves_ids = True
        self._statements: RunStatements | None = None
        """The one-statement end of a run (PostgreSQL), made on the recorder thread."""
        self._statements_unusable = False

    def start(self) -> None:
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Runs waiting to be written or ended."""
        with self._cond:
            return sum(1 for run in self._runs.values() if run.ended or run.unwritten)

    def start_run(self, activation: Activation, *, items_fetched: int) -> None:
        """An activation's first fetch returned items: it is a run from now on.

        Sets ``activation.run_id`` at once where an id can be reserved (its row is inserted on
        the recorder's thread); elsewhere inserts the row here. If the database refuses, the
        recorder inserts it later and the items go ahead meanwhile.
        """
        try:
            run_id = self._reserved_run_id()
            if run_id is not None:
                activation.run_id = run_id
                self.track(activation, run_id, created=False)
                return
            activation.run_id = create_run(
                activation.handler_id,
                worker_id=self.worker_id,
                started_at=activation.started_at,
                items_fetched=items_fetched,
            )
        except DatabaseError:
            logger.warning(
                "Handler %s: could not record its run yet; its items go ahead",
                activation.name,
                exc_info=True,
                extra=activation.log_extra(),
            )
        finally:
            hygiene.after_work(idle=False)
        self.track(activation, activation.run_id)

    def _reserved_run_id(self) -> int | None:
        with self._run_ids_lock:
            if self._run_ids or not self._reserves_ids:
                return self._run_ids.pop(0) if self._run_ids else None
        # Outside the lock: no fetch thread waits on another's round trip. Two threads that
        # both found the block empty each reserve one; the ids are all kept.
        ids = reserve_run_ids(RUN_ID_BLOCK)
        with self._run_ids_lock:
            self._reserves_ids = bool(ids)
            self._run_ids.extend(ids)
            return self._run_ids.pop(0) if self._run_ids else None

    def track(self, activation: Activation, run_id: int | None, *, created: bool = True) -> None:
        """Follow an activation's run; until it is ``created`` (or while ``run_id`` is None: its
        INSERT failed) the recorder inserts it first."""
        with self._cond:
            run = self._runs[activation.serial] = _Run(activation, run_id, created=created)
            self._idle.clear()
            if run.unwritten:
                self._cond.notify()

    def checked(self, handler_id: int) -> None:
        """A handler was just fetched: its ``last_checked_at`` is written soon."""
        with self._cond:
            self._checked.add(handler_id)
            self._idle.clear()
            self._cond.notify()

    def ended(self, activation: Activation) -> None:
        """An activation finished: write its run's end (if it was a run)."""
        with self._cond:
            run = self._runs.get(activation.serial)
            if run is None:
                if not activation.is_run:
                    return
                run = self._runs[activation.serial] = _Run(activation, activation.run_id)
            run.ended = True
            self._idle.clear()
            self._cond.notify()

    def stop(self, timeout: float) -> bool:
        """Write what is pending (for up to ``timeout`` seconds), then stop; True if all was."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left = [run for run in self._runs.values() if run.ended or run.unwritten]
        if left:
            logger.error(
                "%s could not be written before the shutdown deadline; other workers will "
                "mark them abandoned",
                plural(len(left), "run"),
            )
        return not left

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending (for ``run_once``)."""
        return self._idle.wait(timeout)

    # -- the recorder thread ----------------------------------------------------------------

    def _loop(self) -> None:
        delay_index = 0
        next_progress = time.monotonic() + FLUSH_INTERVAL
        try:
            while True:
                with self._cond:
                    if not self._urgent():
                        if self._stopping:
                            break
                        self._idle.set()
                        self._cond.wait(max(0.0, next_progress - time.monotonic()))
                    stopping = self._stopping
                progress = time.monotonic() >= next_progress or stopping
                try:
                    self._write(progress=progress)
                except DatabaseError:
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                        logger.warning(
                            "Could not write runs; keeping them and retrying", exc_info=True
                        )
                    hygiene.close_all()
                    delay = RETRY_DELAYS[min(delay_index, len(RETRY_DELAYS) - 1)]
                    delay_index += 1
                    with self._cond:
                        if not self._stopping:
                            self._cond.wait(delay)
                    continue
                except Exception:
                    logger.exception("Could not write runs")
                    with self._cond:
                        self._cond.wait(1.0)
                    continue
                if self.failing_since is not None:
                    logger.warning(
                        "Runs written again after %.1fs", time.monotonic() - self.failing_since
                    )
                    self.failing_since = None
                delay_index = 0
                if progress:
                    next_progress = time.monotonic() + FLUSH_INTERVAL
                hygiene.after_work(idle=False)
        finally:
            self._idle.set()
            hygiene.close_all()

    def _urgent(self) -> bool:
        return bool(self._checked) or any(run.ended or run.unwritten for run in self._runs.values())

    def _write(self, *, progress: bool) -> None:
        with self._cond:
            checked = set(self._checked)
            runs = [run for run in self._runs.values() if run.ended or run.unwritten or progress]
        if checked:
            mark_checked(checked)
            with self._cond:
                self._checked -= checked
        for run in runs:
            self._write_run(run)

    def _write_run(self, run: _Run) -> None:
        activation = run.activation
        if run.ended and self._end_in_one_statement(run):
            with self._cond:
                self._runs.pop(activation.serial, None)
            return
        if run.unwritten:
            run.run_id = create_run(
                activation.handler_id,
                worker_id=self.worker_id,
                started_at=activation.started_at,
                items_fetched=activation.fetched,
                run_id=run.run_id,
            )
            run.created = True
            activation.run_id = run.run_id
        assert run.run_id is not None
        snapshot = activation.snapshot(failures_from=run.failures_written)
        final = run.ended and snapshot.status is not None
        counts = (snapshot.fetched, snapshot.succeeded, snapshot.failed)
        if final or counts != run.written or snapshot.failures:
            if not final:
                snapshot = replace_status(snapshot, None)
            write_run(run.run_id, activation.handler_id, snapshot)
            run.failures_written += len(snapshot.failures)
            run.written = counts
        if final:
            with self._cond:
                self._runs.pop(activation.serial, None)

    def _end_in_one_statement(self, run: _Run) -> bool:
        """End a run with no failures left to write in one statement (PostgreSQL): inserted
        already ended when its row is still to be written, else updated; True when it was."""
        if self._statements is None:
            if self._statements_unusable or not RunStatements.usable():
                self._statements_unusable = True
                return False
            self._statements = RunStatements()
        activation = run.activation
        snapshot = activation.snapshot(failures_from=run.failures_written)
        if snapshot.status is None or snapshot.failures:
            return False  # failures go with the end in one transaction: write_run
        if run.unwritten:
            if run.run_id is None or not self._statements.insert(
                run.run_id,
                activation.handler_id,
                worker_id=self.worker_id,
                started_at=activation.started_at,
                snapshot=snapshot,
            ):
                return False  # no id reserved, or its row exists already: the usual way
            run.created = True
            return True
        assert run.run_id is not None
        if not self._statements.finish(run.run_id, snapshot):
            # Not running any more (a live worker marked it abandoned): its counts only.
            write_run(run.run_id, activation.handler_id, replace_status(snapshot, None))
        return True


def replace_status(snapshot: RunSnapshot, status: RunStatus | None) -> RunSnapshot:
    from dataclasses import replace

    return replace(snapshot, status=status)
