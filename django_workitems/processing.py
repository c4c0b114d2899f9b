"""WorkItemProcessingService: fetches in parallel, a fair bounded channel, a pool of threads.

Threads and who owns what:

- fetches run on fetch threads, one fetch at a time each; a thread is added whenever every one
  is busy, so a slow fetch never holds back another handler's items;
- ``workers`` pool threads take items from the channel and process them;
- every thread owns its Django connections, keeps them while work keeps coming, applies
  ``close_old_connections`` semantics after ``IDLE_AFTER`` seconds without work, and closes
  them when it exits;
- the recorder thread writes the runs (progress and end), in order, so that no pool thread waits
  on the database for bookkeeping;
- a keeper thread renews the leases of exclusive handlers (and, through ``on_beat``, the
  worker's heartbeat) well inside ``LEASE_TIMEOUT``;
- an :class:`Activation` is shared by its fetch thread and the pool threads that process its
  items; its counters are guarded by its own lock, and it is finished exactly once, by
  whichever thread sees its last item end.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, connections
from django.utils import timezone

from . import recording
from .channel import FairChannel
from .conf import app_settings
from .exceptions import Cancelled
from .handlers import (
    CancellationToken,
    WorkItemHandler,
    call_handler,
    current_worker_id,
    describe_item,
)
from .log import log_context
from .models import RunStatus
from .recording import FailureRecord
from .registry import Registration
from .scheduling import fair_shares

logger = logging.getLogger("django_workitems.processing")

FLUSH_INTERVAL = 2.0
"""Seconds between progress writes of a long activation (counts and failures, in one batch)."""

IDLE_AFTER = 1.0
"""Seconds without work after which a thread applies ``close_old_connections`` semantics.

While work keeps coming, a thread keeps its connection from one unit to the next (even with
``CONN_MAX_AGE = 0``), so a busy worker does not reconnect for every item or batch.
"""

MAX_FETCHERS = 32
"""Fetch threads are added while every one is busy (a slow fetch never holds others back)."""


def release_connections(*, idle: bool) -> None:
    """Close this thread's connections that are broken, obsolete or, when ``idle``, stale.

    Django's ``close_old_connections`` applied per burst: a busy pool thread keeps its
    connection from one item to the next even with ``CONN_MAX_AGE = 0``, and closes it as
    soon as it has nothing to do.
    """
    for conn in connections.all(initialized_only=True):
        if conn.connection is None:
            continue
        if (
            idle
            or conn.errors_occurred
            or conn.settings_dict.get("CONN_MAX_AGE", 0) != 0
            or conn.get_autocommit() != conn.settings_dict.get("AUTOCOMMIT", True)
        ):
            conn.close_if_unusable_or_obsolete()


@dataclass
class ItemFailureInfo:
    """One failed item of an activation."""

    item_id: str
    exception: BaseException
    traceback: str


@dataclass
class ActivationResult:
    """What one activation of a handler did."""

    handler: str
    status: str = ""
    run_id: int | None = None
    fetched: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    isolated: int = 0
    error: str = ""
    skipped: str = ""
    failures: list[ItemFailureInfo] = field(default_factory=list)

    @property
    def fetch_failed(self) -> bool:
        return self.status == RunStatus.FAILED


@dataclass
class CycleResult:
    """Per-handler outcome of one cycle (``run_once``, ``runworkitems --once``)."""

    handlers: dict[str, ActivationResult] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ActivationResult:
        return self.handlers[name]

    def __iter__(self) -> Iterator[ActivationResult]:
        return iter(self.handlers.values())

    @property
    def fetched(self) -> int:
        return sum(r.fetched for r in self)

    @property
    def succeeded(self) -> int:
        return sum(r.succeeded for r in self)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self)

    @property
    def failed_fetches(self) -> list[str]:
        """Names of the handlers whose fetch raised."""
        return [r.handler for r in self if r.fetch_failed]

    @property
    def ok(self) -> bool:
        """True when every fetch ran (item failures are recorded, not fatal)."""
        return not self.failed_fetches


class Activation:
    """One handler instance: its fetch, its items in the channel or in process, and its run."""

    def __init__(
        self,
        registration: Registration,
        *,
        handler_id: int,
        max_items: int,
        token: CancellationToken,
    ) -> None:
        self.registration = registration
        self.name = registration.name
        self.handler_id = handler_id
        self.max_items = max_items
        self.token = token
        self.handler: WorkItemHandler[Any] | None = None
        self.run_id: int | None = None
        self.started = time.monotonic()
        self.lease_held = False
        self.result = ActivationResult(handler=registration.name)
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._finished = False
        self._last_flush = time.monotonic()
        self._unflushed_succeeded = 0
        self._unflushed_failed = 0
        self._unflushed_failures: list[FailureRecord] = []

    def log_extra(self, item_id: str | None = None) -> dict[str, object]:
        return {"handler": self.name, "run_id": self.run_id, "work_item_id": item_id}

    def items_queued(self, count: int) -> None:
        with self._lock:
            self._outstanding += count

    def item_done(
        self,
        *,
        succeeded: bool = False,
        failure: FailureRecord | None = None,
        info: ItemFailureInfo | None = None,
        cancelled: int = 0,
    ) -> tuple[bool, tuple[int, int, list[FailureRecord]] | None]:
        """Count an item's outcome; returns (was it the last item, a batch to flush or None)."""
        now = time.monotonic()
        with self._lock:
            if self._finished:
                return False, None
            if succeeded:
                self.result.succeeded += 1
                self._unflushed_succeeded += 1
            if failure is not None and info is not None:
                self.result.failed += 1
                self.result.failures.append(info)
                self._unflushed_failed += 1
                self._unflushed_failures.append(failure)
            self.result.cancelled += cancelled
            self._outstanding -= max(1, cancelled)
            if self._outstanding <= 0:
                return True, None
            if now - self._last_flush >= FLUSH_INTERVAL:
                self._last_flush = now
                return False, self._take_unflushed()
            return False, None

    def _take_unflushed(self) -> tuple[int, int, list[FailureRecord]]:
        batch = (self._unflushed_succeeded, self._unflushed_failed, self._unflushed_failures)
        self._unflushed_succeeded = self._unflushed_failed = 0
        self._unflushed_failures = []
        return batch

    def begin_finish(self) -> tuple[int, int, list[FailureRecord]] | None:
        """Mark finished; returns the last batch, or None if another thread finished it."""
        with self._lock:
            if self._finished:
                return None
            self._finished = True
            return self._take_unflushed()

    @property
    def finished(self) -> bool:
        return self._finished


Entry = tuple[Activation, Any]


class WorkItemProcessingService:
    """Runs activations of handlers: parallel fetches, a fair bounded channel, a thread pool.

    ``run_cycle`` runs one cycle (fetch all, process everything fetched) and returns its
    result; :class:`~django_workitems.background.BackgroundProcessingService` drives it, or
    schedules single activations through ``activate``.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        queue_size: int | None = None,
        worker_id: int | None = None,
        lease_owner: str | None = None,
        cancel: CancellationToken | None = None,
        on_fetched: Callable[[Activation], None] | None = None,
        on_finished: Callable[[Activation], None] | None = None,
        on_room: Callable[[], None] | None = None,
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        self.workers = workers if workers is not None else app_settings.workers
        self.queue_size = queue_size if queue_size is not None else app_settings.queue_size
        self.lease_timeout = app_settings.lease_timeout
        self.worker_id = worker_id
        self.lease_owner = lease_owner or (
            f"process:{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self.token = cancel or CancellationToken()
        self.channel: FairChannel[Entry] = FairChannel(self.queue_size, on_room=on_room)
        self._on_fetched = on_fetched
        self._on_finished = on_finished
        self._on_beat = on_beat
        self._threads: list[threading.Thread] = []
        self._fetchers: list[threading.Thread] = []
        self._fetch_jobs: queue.SimpleQueue[Activation | None] = queue.SimpleQueue()
        self._idle_fetchers = 0
        self._waiting_fetches = 0
        self._active: set[Activation] = set()
        self._lock = threading.Lock()
        self._lease_lock = threading.Lock()  # held across the lease UPDATEs: see _take_lease
        self._lease_holds: Counter[int] = Counter()
        self._stopping = threading.Event()
        self._keeper: threading.Thread | None = None
        self._recorder = Recorder()
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the pool threads and the lease keeper."""
        if self._started:
            return
        self._started = True
        for number in range(self.workers):
            thread = threading.Thread(
                target=self._pool_worker, name=f"workitems-pool-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._keeper = threading.Thread(
            target=self._keep_leases, name="workitems-keeper", daemon=True
        )
        self._keeper.start()
        self._recorder.start()

    def __enter__(self) -> WorkItemProcessingService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(app_settings.shutdown_timeout.total_seconds())

    def active(self) -> list[Activation]:
        with self._lock:
            return list(self._active)

    def stop(self, timeout: float, abort: Callable[[], bool] | None = None) -> None:
        """Shut down: cancel, release unstarted items, give items in process ``timeout`` seconds.

        Activations still unfinished after that are recorded ``cancelled``; the threads still
        busy with them are daemons and do not keep the process alive.
        """
        self._stopping.set()
        self.token.cancel()
        self.channel.close()
        self._release(self.channel.drain())
        deadline = time.monotonic() + timeout
        with self._lock:
            fetchers = list(self._fetchers)
        for _ in fetchers:
            self._fetch_jobs.put(None)  # each fetcher ends after its current fetch
        for thread in [*self._threads, *fetchers]:
            while thread.is_alive() and time.monotonic() < deadline:
                if abort is not None and abort():
                    return
                thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
        # Fetches that returned after the drain released their own items; anything left is
        # still in process past the time-out.
        self._release(self.channel.drain())
        for activation in self.active():
            if not activation.finished:
                logger.warning(
                    "Handler %s: items still in process after the shutdown timeout of %.1fs",
                    activation.name,
                    timeout,
                    extra=activation.log_extra(),
                )
                self._finish(activation, forced=True)
        self._recorder.stop(timeout=max(10.0, sum(RETRY_DELAYS) + 5))
        if self._keeper is not None:
            self._keeper.join(timeout=5)

    # -- activations ----------------------------------------------------------------------

    def activate(
        self, registration: Registration, *, handler_id: int, max_items: int
    ) -> Activation | None:
        """Start an activation: reserve channel room, then hand the fetch to a fetch thread.

        Returns None when the channel has no room or the service is stopping.
        """
        if self._stopping.is_set():
            return None
        granted = self.channel.reserve(registration.name, max_items)
        if granted < 1:
            return None
        self.channel.set_limit(registration.name, registration.max_concurrency)
        activation = Activation(
            registration, handler_id=handler_id, max_items=granted, token=self.token.child()
        )
        with self._lock:
            self._active.add(activation)
            self._waiting_fetches += 1
            thread = None
            if self._waiting_fetches > self._idle_fetchers and len(self._fetchers) < MAX_FETCHERS:
                thread = threading.Thread(
                    target=self._fetcher,
                    name=f"workitems-fetch-{len(self._fetchers)}",
                    daemon=True,
                )
                self._fetchers.append(thread)
        self._fetch_jobs.put(activation)
        if thread is not None:
            thread.start()
        return activation

    def _fetcher(self) -> None:
        """A fetch thread: runs fetches one after another, keeping its connection while busy."""
        try:
            while True:
                with self._lock:
                    self._idle_fetchers += 1
                try:
                    try:
                        job = self._fetch_jobs.get(timeout=IDLE_AFTER)
                    except queue.Empty:
                        release_connections(idle=True)
                        job = self._fetch_jobs.get()
                finally:
                    with self._lock:
                        self._idle_fetchers -= 1
                if job is None:
                    break
                with self._lock:
                    self._waiting_fetches -= 1
                self._fetch(job)
        finally:
            connections.close_all()

    def run_cycle(
        self,
        handlers: Sequence[tuple[Registration, int]],
        *,
        stopped: Callable[[], bool] = lambda: False,
        wait: Callable[[float], None] | None = None,
    ) -> CycleResult:
        """One cycle: fetch each (registration, handler row id) once, process all it fetched.

        The fetches run in parallel, each asked for its fair share of the channel. Returns when
        every activation has ended, or when ``stopped()`` says so (``wait`` blocks between
        checks; by default it waits on the activations themselves).
        """
        self.start()
        result = CycleResult()
        asks = fair_shares(self.queue_size, [reg.max_items_per_cycle for reg, _ in handlers])
        activations = []
        for (reg, handler_id), ask in zip(handlers, asks, strict=True):
            activation = self.activate(reg, handler_id=handler_id, max_items=ask) if ask else None
            if activation is None:
                result.handlers[reg.name] = ActivationResult(reg.name, skipped="no room")
            else:
                activations.append(activation)
        while not stopped():
            pending = [a for a in activations if not a.done.is_set()]
            if not pending:
                break
            if wait is not None:
                wait(1.0)
            else:
                pending[0].done.wait(1.0)
        for activation in activations:
            result.handlers[activation.name] = activation.result
        return result

    def _fetch(self, activation: Activation) -> None:
        """The fetch thread: every path reports the fetch and, if nothing was queued, finishes."""
        handed_over = False
        # This thread's own context: no reset needed.
        current_worker_id.set(self.worker_id)
        log_context.set((activation.name, None, None))
        try:
            handed_over = self._fetch_and_queue(activation)
        except BaseException as exc:  # e.g. the database is down: recorded, retried later
            activation.result.status = RunStatus.FAILED
            activation.result.error = activation.result.error or _format_exception(exc)
            logger.error(
                "Handler %s: the activation failed: %s",
                activation.name,
                exc,
                exc_info=True,
                extra=activation.log_extra(),
            )
        finally:
            try:
                if not handed_over:
                    self.channel.unreserve(activation.name, activation.max_items)
                self._fetched(activation)
                if not handed_over:
                    self._finish(activation)
            finally:
                release_connections(idle=False)

    def _fetch_and_queue(self, activation: Activation) -> bool:
        """Fetch and queue the items; True once they (and the reservation) are in the channel."""
        reg = activation.registration
        result = activation.result
        if reg.exclusive:
            if not self._take_lease(activation.handler_id):
                holder = recording.lease_holder(activation.handler_id)
                result.skipped = f"another process holds its lease ({holder})"
                logger.debug(
                    "Handler %s skipped: %s", reg.name, result.skipped, extra=activation.log_extra()
                )
                return False
            activation.lease_held = True
        started_at = timezone.now()
        try:
            activation.token.raise_if_cancelled()
            activation.handler = reg.create_handler()
            items = list(
                call_handler(activation.handler.fetch_next, activation.max_items, activation.token)
                or ()
            )
        except Cancelled:
            result.skipped = "shutting down"
            return False
        except Exception as exc:
            result.status = RunStatus.FAILED
            result.error = _format_exception(exc)
            logger.error(
                "Handler %s: fetch_next raised %s: %s",
                reg.name,
                type(exc).__name__,
                exc,
                exc_info=True,
                extra=activation.log_extra(),
            )
            activation.run_id = recording.create_run(
                activation.handler_id,
                worker_id=self.worker_id,
                started_at=started_at,
                items_fetched=0,
                error=result.error,
            )
            return False
        result.fetched = len(items)
        if not items:
            logger.debug("Handler %s: nothing to do", reg.name, extra=activation.log_extra())
            return False
        if len(items) > activation.max_items:
            logger.warning(
                "Handler %s: fetch_next returned %d items, more than the %d asked for",
                reg.name,
                len(items),
                activation.max_items,
                extra=activation.log_extra(),
            )
        try:
            solo = [bool(activation.handler.isolate(item)) for item in items]
            activation.result.isolated = sum(solo)
            activation.run_id = recording.create_run(
                activation.handler_id,
                worker_id=self.worker_id,
                started_at=started_at,
                items_fetched=len(items),
            )
        except BaseException:
            self._give_back(activation, items)  # claimed items must not stay claimed
            raise
        activation.items_queued(len(items))
        entries = [(activation, item) for item in items]
        if not self.channel.put(reg.name, entries, activation.max_items, solo):
            self._release([(reg.name, entry) for entry in entries])  # shutting down meanwhile
        return True

    def _fetched(self, activation: Activation) -> None:
        if self._on_fetched is not None:
            self._on_fetched(activation)

    # -- the pool -------------------------------------------------------------------------

    def _pool_worker(self) -> None:
        try:
            while True:
                found = self.channel.take(timeout=IDLE_AFTER)
                if found is None:
                    if self.channel.closed:
                        break
                    release_connections(idle=True)
                    found = self.channel.take()
                    if found is None:
                        break
                key, (activation, item) = found
                try:
                    self._process(activation, item)
                finally:
                    self.channel.task_done(key)
        finally:
            connections.close_all()

    def _process(self, activation: Activation, item: Any) -> None:
        item_id = describe_item(item)
        handler = activation.handler
        assert handler is not None  # items are queued only after the handler fetched them
        context = log_context.set((activation.name, activation.run_id, item_id))
        try:
            call_handler(handler.process, item, activation.token)
        except Cancelled as exc:
            if not activation.token.cancelled:
                self._item_failed(activation, item_id, exc, traceback.format_exc())
            else:
                self._release([(activation.name, (activation, item))])
        except BaseException as exc:  # an item must never take its pool thread down
            self._item_failed(activation, item_id, exc, traceback.format_exc())
        else:
            self._item_counted(activation, activation.item_done(succeeded=True))
        finally:
            log_context.reset(context)
            release_connections(idle=False)

    def _item_failed(
        self, activation: Activation, item_id: str, exc: BaseException, tb: str
    ) -> None:
        logger.error(
            "Handler %s: item %s failed: %s: %s",
            activation.name,
            item_id,
            type(exc).__name__,
            exc,
            exc_info=exc,
            extra=activation.log_extra(item_id),
        )
        failure = FailureRecord(
            item_id=item_id,
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            message=str(exc),
            traceback=tb,
            occurred_at=timezone.now(),
        )
        info = ItemFailureInfo(item_id=item_id, exception=exc, traceback=tb)
        self._item_counted(activation, activation.item_done(failure=failure, info=info))

    def _item_counted(
        self,
        activation: Activation,
        outcome: tuple[bool, tuple[int, int, list[FailureRecord]] | None],
    ) -> None:
        last, batch = outcome
        if last:
            self._finish(activation)
        elif batch is not None and activation.run_id is not None:
            run_id = activation.run_id
            succeeded, failed, failures = batch
            self._recorder.submit(
                lambda: recording.record_progress(
                    run_id, succeeded=succeeded, failed=failed, failures=failures
                )
            )

    def _release(self, entries: Sequence[tuple[str, Entry]]) -> None:
        """Give items that were never started back to their handlers, then count them."""
        by_activation: dict[Activation, list[Any]] = {}
        for _key, (activation, item) in entries:
            by_activation.setdefault(activation, []).append(item)
        for activation, items in by_activation.items():
            self._give_back(activation, items)
            self._item_counted(activation, activation.item_done(cancelled=len(items)))

    def _give_back(self, activation: Activation, items: Sequence[Any]) -> None:
        assert activation.handler is not None
        try:
            activation.handler.release(items)
        except Exception:
            logger.exception(
                "Handler %s: release() of %d unstarted items raised",
                activation.name,
                len(items),
                extra=activation.log_extra(),
            )
        else:
            logger.info(
                "Handler %s: released %d items never started",
                activation.name,
                len(items),
                extra=activation.log_extra(),
            )

    # -- finishing ------------------------------------------------------------------------

    def _finish(self, activation: Activation, *, forced: bool = False) -> None:
        """End an activation once: ``close()`` the handler, then have its run recorded.

        The scheduler hears of it at once, and the database writes (the run, the lease) go to
        the recorder thread, so the pool thread that ran the last item takes the next at once.
        """
        batch = activation.begin_finish()
        if batch is None:
            return
        result = activation.result
        try:
            self._close_handler(activation)
            if result.status != RunStatus.FAILED:
                if forced or result.cancelled:
                    result.status = RunStatus.CANCELLED
                elif result.failed:
                    result.status = RunStatus.PARTIAL
                else:
                    result.status = RunStatus.SUCCEEDED
        finally:
            # The next activation may start while this one is recorded: its items are all
            # done and closed. (Its lease, if any, is shared meanwhile: see _take_lease.)
            if self._on_finished is not None:
                self._on_finished(activation)
            self._recorder.submit(lambda: self._record_end(activation, batch))

    def _record_end(
        self, activation: Activation, batch: tuple[int, int, list[FailureRecord]]
    ) -> None:
        """On the recorder thread: write the run's end, free the lease, mark the activation done."""
        result = activation.result
        try:
            if activation.run_id is not None:
                succeeded, failed, failures = batch
                run_id = activation.run_id
                _retrying(
                    lambda: recording.record_progress(
                        run_id,
                        succeeded=succeeded,
                        failed=failed,
                        failures=failures,
                        status=result.status,
                        error=result.error,
                    ),
                    f"record the end of run {run_id}",
                    activation,
                )
                result.run_id = activation.run_id
                logger.info(
                    "Handler %s run %s %s: %d fetched, %d succeeded, %d failed%s in %.2fs",
                    activation.name,
                    activation.run_id,
                    result.status,
                    result.fetched,
                    result.succeeded,
                    result.failed,
                    f", {result.cancelled} released" if result.cancelled else "",
                    time.monotonic() - activation.started,
                    extra=activation.log_extra(),
                )
            if activation.lease_held:
                try:
                    self._release_lease(activation.handler_id)
                except Exception:
                    logger.exception(
                        "Handler %s: could not release its lease",
                        activation.name,
                        extra=activation.log_extra(),
                    )
        finally:
            with self._lock:
                self._active.discard(activation)
            activation.done.set()

    def _take_lease(self, handler_id: int) -> bool:
        """Hold the handler's lease for one more activation here; False if another process has it.

        Activations of one exclusive handler may overlap in this process only while the last
        one is being recorded; the lease is released in the database when the last lets go.
        """
        with self._lease_lock:
            if self._lease_holds[handler_id]:
                self._lease_holds[handler_id] += 1
                return True
            if not recording.acquire_lease(handler_id, self.lease_owner, self.lease_timeout):
                return False
            self._lease_holds[handler_id] = 1
            return True

    def _release_lease(self, handler_id: int) -> None:
        with self._lease_lock:
            self._lease_holds[handler_id] -= 1
            if self._lease_holds[handler_id] > 0:
                return
            del self._lease_holds[handler_id]
            recording.release_lease(handler_id, self.lease_owner)

    def _close_handler(self, activation: Activation) -> None:
        if activation.handler is None:
            return
        try:
            activation.handler.close()
        except Exception as exc:
            message = f"close() raised {_format_exception(exc)}"
            activation.result.error = (
                f"{activation.result.error}\n{message}" if activation.result.error else message
            )
            logger.error(
                "Handler %s: close() raised %s: %s",
                activation.name,
                type(exc).__name__,
                exc,
                exc_info=True,
                extra=activation.log_extra(),
            )

    # -- leases and heartbeat -------------------------------------------------------------

    def _keep_leases(self) -> None:
        interval = max(0.05, self.lease_timeout.total_seconds() / 4)
        try:
            while not self._stopping.wait(interval):
                try:
                    if any(a.lease_held for a in self.active()):
                        recording.renew_leases(self.lease_owner, self.lease_timeout)
                    if self._on_beat is not None:
                        self._on_beat()
                except Exception:
                    logger.exception("Heartbeat failed; retrying in %.1fs", interval)
                finally:
                    release_connections(idle=True)
        finally:
            connections.close_all()


RECORDER_BACKLOG = 32
"""Runs waiting to be written before a finishing activation waits for the recorder.

The bound is the back-pressure that keeps memory flat when activations end faster than the
database takes their runs: each waiting run holds its activation's handler and results.
"""


class Recorder:
    """One thread that writes runs in the order they are handed over, off the pool's back."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue(RECORDER_BACKLOG)
        self._thread = threading.Thread(target=self._run, name="workitems-recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Callable[[], object]) -> None:
        if self._thread.is_alive():
            self._jobs.put(job)
        else:  # not started, or stopped: write in the calling thread
            self._do(job)

    def stop(self, timeout: float) -> None:
        """Write what was handed over (for up to ``timeout`` seconds), then stop."""
        if self._thread.is_alive():
            deadline = time.monotonic() + timeout
            try:
                self._jobs.put(None, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        try:
            while True:
                try:
                    job = self._jobs.get(timeout=IDLE_AFTER)
                except queue.Empty:
                    release_connections(idle=True)
                    job = self._jobs.get()
                if job is None:
                    break
                self._do(job)
        finally:
            connections.close_all()

    @staticmethod
    def _do(job: Callable[[], object]) -> None:
        try:
            job()
        except Exception:
            logger.exception("Recording a run failed")
        finally:
            release_connections(idle=False)


RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
"""Pauses between attempts at writing a run's end while the database is unreachable."""


def _retrying(write: Callable[[], object], what: str, activation: Activation) -> None:
    """Write, retrying on database errors: a run left ``running`` would look alive forever."""
    for delay in (*RETRY_DELAYS, None):
        try:
            write()
            return
        except DatabaseError:
            if delay is None:
                logger.exception(
                    "Handler %s: could not %s", activation.name, what, extra=activation.log_extra()
                )
                return
            logger.warning(
                "Handler %s: could not %s; retrying in %.1fs",
                activation.name,
                what,
                delay,
                extra=activation.log_extra(),
            )
            connections.close_all()  # this thread's connection may be the broken one
            time.sleep(delay)


def _format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
