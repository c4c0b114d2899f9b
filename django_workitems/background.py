"""BackgroundProcessingService: runs activations on their poll intervals until it is stopped.

The coordinator (the thread that calls :meth:`BackgroundProcessingService.run`, the main
thread under ``runworkitems``) owns the scheduler and drives the processing service; it never
waits on the database, so a database that is down or a connection that hangs cannot keep it
from reacting to a signal. Other threads tell it things by posting events and waking it
through a socket pair, which is also where the operating system writes on SIGTERM/SIGINT
(``signal.set_wakeup_fd``): the signal handlers only set flags.

- the watcher thread reads the handler rows every second (enabled flags, run requests);
- the listener thread (PostgreSQL) turns ``NOTIFY`` into requests within milliseconds;
- the lease keeper heartbeats and, when it finds a dead worker, asks for its handlers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any

from django.db import DatabaseError

from . import health, hygiene, metrics, recording, wakeups
from .activation import Activation, ActivationResult, CycleResult
from .conf import app_settings
from .handlers import CancellationToken, Purpose
from .log import plural
from .models import RunStatus, Worker, request_run
from .processing import WorkItemProcessingService
from .registry import HandlerRegistry, Registration
from .registry import registry as default_registry
from .scheduling import Scheduler
from .slots import SlotKeeper, TakenSlot

logger = logging.getLogger("django_workitems.background")

REFRESH_INTERVAL = 1.0
"""Seconds between reads of the handler rows (enabled flags and run requests)."""

SLOT_MARGIN = 0.002
"""Seconds past a slot's time at which the watcher reads the rows to take it."""

PROGRESS_INTERVAL = 5.0
"""Seconds between progress lines of ``runworkitems --drain``."""

EXIT_RECYCLE = 3
"""Exit status of a worker that stopped because too many of its threads hung."""


class Waker:
    """Wakes a thread blocked in :meth:`wait` from any thread, or from a signal."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._read, selectors.EVENT_READ)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._write.send(b"\0")

    def wait(self, timeout: float | None) -> None:
        """Block until woken or ``timeout`` seconds pass; clears pending wake-ups."""
        if self._selector.select(timeout):
            with contextlib.suppress(BlockingIOError, OSError):
                while self._read.recv(4096):
                    pass

    @property
    def signal_fd(self) -> int:
        return self._write.fileno()

    def close(self) -> None:
        self._selector.close()
        self._read.close()
        self._write.close()


@dataclass(frozen=True)
class _Request:
    name: str


@dataclass(frozen=True)
class _States:
    states: dict[str, recording.HandlerState]


@dataclass(frozen=True)
class _Slot:
    slot: TakenSlot


_Event = _Request | _States | _Slot


class HandlerWatcher:
    """A thread that reads the handler rows every second and posts them to the coordinator.

    It also takes the slots of scheduled handlers (``slots``), waking at each slot's time.
    """

    def __init__(self, names: list[str], post: Any, slots: SlotKeeper | None = None) -> None:
        self._names = names
        self._post = post
        self._slots = slots
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workitems-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        failing = False
        try:
            while True:
                wait = REFRESH_INTERVAL
                try:
                    self._post(_States(recording.handler_states(self._names)))
                    if self._slots:
                        taken, until = self._slots.take()
                        for slot in taken:
                            self._post(_Slot(slot))
                        if until is not None:
                            wait = min(wait, until + SLOT_MARGIN)
                    if failing:
                        logger.warning("The handler rows can be read again")
                    failing = False
                except DatabaseError:
                    if not failing:
                        logger.warning("Could not read the handler rows; retrying", exc_info=True)
                    failing = True
                    hygiene.close_all()
                finally:
                    hygiene.after_work(idle=False)
                if self._stop.wait(wait):
                    self._last_flush()
                    return
        finally:
            hygiene.close_all()

    def _last_flush(self) -> None:
        """At stop: write which slots' activations ended (the others go to a live worker)."""
        if self._slots:
            try:
                self._slots.flush()
            except DatabaseError:
                logger.warning(
                    "Could not write which scheduled slots ended; live workers will run them "
                    "again once this worker is seen stopped",
                    exc_info=True,
                )


class BackgroundProcessingService:
    """Drives the selected handlers until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(
        self,
        *,
        registry: HandlerRegistry | None = None,
        handlers: Iterable[str] | None = None,
        purpose: Purpose | str | None = None,
        workers: int | None = None,
        poll_interval: timedelta | None = None,
        install_signal_handlers: bool = False,
        max_cycles: int | None = None,
        max_memory_mb: float | None = None,
        health_file: str | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.registry = registry if registry is not None else default_registry
        self.registrations: list[Registration] = self.registry.select(handlers, purpose)
        self.workers = workers if workers is not None else app_settings.workers
        self.poll_interval = poll_interval
        self.install_signal_handlers = install_signal_handlers
        self.max_cycles = max_cycles
        self.max_memory_mb = max_memory_mb
        self.health_file = health_file
        """Touched by the loop at least once a second (``runworkitems --health-file``)."""
        self.metrics_port = metrics_port
        """Port of this process's Prometheus metrics (``runworkitems --metrics-port``)."""
        self.worker: Worker | None = None
        self.exit_code = 0
        """0, or ``EXIT_RECYCLE`` when the worker stopped because too many threads hung."""
        self._waker: Waker | None = None
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._slots: SlotKeeper | None = None
        self._slot_pending: dict[str, TakenSlot] = {}
        """Slots taken for a handler whose activation has not started yet."""
        self._slot_runs: dict[int, TakenSlot] = {}
        """Activations (by serial) started for a slot."""
        self._cycles = 0
        self._recycling = False
        self._stop_requested = False
        self._sigints = 0
        self._force_exit = False
        self._token = CancellationToken()
        self._service: WorkItemProcessingService | None = None
        self._started = threading.Event()

    # -- control ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to shut down (thread-safe)."""
        self._stop_requested = True
        self._wake()

    def wake(self) -> None:
        """Wake the loop now (thread-safe)."""
        self._wake()

    def _wake(self) -> None:
        if self._waker is not None:
            self._waker.wake()

    @property
    def started(self) -> threading.Event:
        """Set once the worker row exists and the pool is running."""
        return self._started

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only flags: the wake-up fd has already woken the coordinator.
        self._stop_requested = True
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints >= 2:
                self._force_exit = True

    def _check_force_exit(self) -> bool:
        if self._force_exit:
            logger.warning("Second interrupt: exiting at once")
            os._exit(130)
        return False

    def _take_over(self, scheduler: Scheduler, names: list[str]) -> None:
        """A dead worker's runs were abandoned: run its handlers here at once.

        Not the scheduled ones: their slot, if it did not end, is run again through the slot
        keeper (once); a request here would run it a second time.
        """
        if not names:
            return  # the common case, on every turn of the loop
        scheduled = {r.name for r in self.registrations if r.schedule is not None}
        for name in names:
            if name not in scheduled:
                scheduler.request(name)

    def _post(self, event: _Event) -> None:
        self._events.put(event)
        self._wake()

    # -- running ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, *, listen: bool = True) -> Iterator[WorkItemProcessingService]:
        """Sync handlers, register the worker, run the pool; always shut down in bounded time."""
        lease_timeout = app_settings.lease_timeout
        shutdown_timeout = app_settings.shutdown_timeout.total_seconds()
        hygiene.apply_connection_timeouts(lease_timeout.total_seconds())
        recording.sync_handlers(self.registry)
        self.worker = recording.register_worker()
        self._waker = Waker()
        service = WorkItemProcessingService(
            workers=self.workers,
            worker_id=self.worker.pk,
            lease_owner=self.worker.lease_owner,
            cancel=self._token,
            waker=self._waker,
        )
        self._service = service
        listener = None
        if listen and wakeups.Listener.supported():
            listener = wakeups.Listener(lambda name: self._post(_Request(name)))
        watcher = None
        restore = self._install_signals()
        try:
            if self.metrics_port is not None:
                metrics.serve(self.metrics_port)
            metrics.set_worker_up(True)
            if listener is not None:
                listener.start()
            recording.abandon_runs_of_dead_workers(lease_timeout)
            service.start()
            if listen:
                self._slots = SlotKeeper(
                    self.registrations, worker_id=self.worker.pk, lease_timeout=lease_timeout
                )
                watcher = HandlerWatcher(
                    [r.name for r in self.registrations], self._post, self._slots
                )
                watcher.start()
            self._started.set()
            logger.info(
                "Worker %s started: %s, %s, queue of %d",
                self.worker,
                plural(len(self.registrations), "handler"),
                plural(service.workers, "thread"),
                service.queue_size,
            )
            yield service
        finally:
            logger.info("Worker %s stopping", self.worker)
            metrics.set_worker_up(False)
            if listener is not None:
                listener.stop(timeout=2.0)
            if watcher is not None:
                watcher.stop()
            service.stop(shutdown_timeout, abort=self._check_force_exit)
            restore()
            logger.info("Worker %s stopped", self.worker)
            self._waker.close()
            self._waker = None
            hygiene.close_all()

    def _install_signals(self) -> Any:
        if (
            not self.install_signal_handlers
            or threading.current_thread() is not threading.main_thread()
            or self._waker is None
        ):
            return lambda: None
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous_fd = signal.set_wakeup_fd(self._waker.signal_fd, warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def run(self) -> None:
        """Run until stopped: every handler is due at start, then on its poll interval."""
        scheduler = Scheduler(self.registrations, poll_interval=self.poll_interval)
        states: dict[str, recording.HandlerState] = {}
        with self._session() as service:
            next_memory_check = 0.0
            while not self._stop_requested:
                now = time.monotonic()
                states = self._apply_events(scheduler, states)
                self._take_over(scheduler, service.keeper.take_orphaned())
                step = service.step()
                for activation in step.fetching_ended:
                    scheduler.fetching_ended(
                        activation.name,
                        drained=activation.drained,
                        failed=activation.result().fetch_failed,
                        now=now,
                        hold=activation.hold,
                    )
                for activation in step.finished:
                    scheduler.finished(activation.name)
                    self._slot_ended(activation)
                if now >= next_memory_check:
                    next_memory_check = now + REFRESH_INTERVAL
                    self._check_memory()
                    if self.health_file is not None:
                        health.touch_liveness_file(self.health_file)
                if service.exhausted:
                    logger.error(
                        "Worker %s: %s given up on hung calls, more than WORKERS (%d); "
                        "stopping so that a fresh process takes over",
                        self.worker,
                        plural(service.given_up, "thread"),
                        service.workers,
                    )
                    self.exit_code = EXIT_RECYCLE
                    break
                if self._recycling:
                    if not scheduler.busy():
                        logger.info(
                            "Worker %s: recycling after %s",
                            self.worker,
                            plural(self._cycles, "cycle"),
                        )
                        break
                elif self._start_due(service, scheduler, states, now):
                    self._cycles += 1
                    if self.max_cycles is not None and self._cycles >= self.max_cycles:
                        self._recycling = True  # let this cycle finish, then stop
                    continue  # dispatch the new activations' fetches at once
                timeout = min(1.0, REFRESH_INTERVAL)
                until_due = scheduler.seconds_until_due(now)
                if until_due is not None:
                    timeout = min(timeout, until_due)
                if step.next_deadline is not None:
                    timeout = min(timeout, step.next_deadline - now)
                self._waker_wait(max(0.0, timeout))

    def _waker_wait(self, timeout: float) -> None:
        assert self._waker is not None
        self._waker.wait(timeout)

    def _apply_events(
        self, scheduler: Scheduler, states: dict[str, recording.HandlerState]
    ) -> dict[str, recording.HandlerState]:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return states
            if isinstance(event, _Request):
                scheduler.request(event.name)
            elif isinstance(event, _Slot):
                scheduler.request(event.slot.name)
                self._slot_pending[event.slot.name] = event.slot
            else:
                states = event.states
                scheduler.set_enabled({n: s.is_enabled for n, s in states.items()})
                scheduler.note_requests({n: s.run_requested_at for n, s in states.items()})

    def _start_due(
        self,
        service: WorkItemProcessingService,
        scheduler: Scheduler,
        states: dict[str, recording.HandlerState],
        now: float,
    ) -> bool:
        """Activate the handlers that are due; True when at least one started."""
        started = False
        for reg in scheduler.due(now):
            state = states.get(reg.name)
            if state is None:
                continue
            activation = service.activate(reg, handler_id=state.handler_id)
            if activation is not None:
                scheduler.activated(reg.name, now)
                started = True
                slot = self._slot_pending.pop(reg.name, None)
                if slot is not None:
                    self._slot_runs[activation.serial] = slot
        return started

    def _slot_ended(self, activation: Activation) -> None:
        """An activation ended: if it ran a slot, tell the slot keeper how it went."""
        slot = self._slot_runs.pop(activation.serial, None)
        if slot is None or self._slots is None:
            return
        result = activation.result()
        if result.status == RunStatus.CANCELLED or self._stop_requested:
            return  # cut short: a live worker runs the slot again once this one has stopped
        # Skipped (another process held the lease): the slot is tried again here.
        self._slots.ended(slot.name, ran=not result.skipped)

    # -- one cycle, and cycles until drained ------------------------------------------------

    def _selected(self) -> tuple[list[tuple[Registration, int]], dict[str, ActivationResult]]:
        states = recording.handler_states(r.name for r in self.registrations)
        handlers = []
        skipped: dict[str, ActivationResult] = {}
        for reg in self.registrations:
            state = states.get(reg.name)
            if state is None or not state.is_enabled:
                skipped[reg.name] = ActivationResult(reg.name, skipped="disabled")
            else:
                handlers.append((reg, state.handler_id))
        return handlers, skipped

    def run_once(self) -> CycleResult:
        """One cycle of the selected handlers: each may process up to its allowance."""
        # One cycle: nothing to wake up for, so no LISTEN connection to open and close.
        with self._session(listen=False) as service:
            handlers, skipped = self._selected()
            result = service.run_cycle(handlers, stopped=lambda: self._stop_requested)
        result.handlers.update(skipped)
        return CycleResult(dict(sorted(result.handlers.items())))

    def run_drain(self) -> CycleResult:
        """Cycles until one in which no selected handler fetched anything.

        Returns the totals of all cycles per handler (a fetch that raised in any cycle makes
        the result not ``ok``). Logs a progress line every few seconds.
        """
        totals: dict[str, ActivationResult] = {}
        with self._session(listen=False) as service:
            progress = DrainProgress(service, self.registrations)
            progress.start()
            try:
                cycles = 0
                while not self._stop_requested:
                    handlers, skipped = self._selected()
                    result = service.run_cycle(handlers, stopped=lambda: self._stop_requested)
                    cycles += 1
                    for outcome in [*result, *skipped.values()]:
                        _add(totals, outcome)
                    progress.cycle_done(result)
                    if result.fetched == 0:
                        break
                logger.info(
                    "Drained in %s: %s done",
                    plural(cycles, "cycle"),
                    plural(progress.done(), "item"),
                )
            finally:
                progress.stop()
        return CycleResult(dict(sorted(totals.items())))

    def _check_memory(self) -> None:
        if self.max_memory_mb is None:
            return
        rss = resident_memory_mb()
        if rss > self.max_memory_mb:
            logger.warning(
                "Worker %s: resident memory %.0f MB is over --max-memory %.0f MB; stopping",
                self.worker,
                rss,
                self.max_memory_mb,
            )
            self._stop_requested = True


def _add(totals: dict[str, ActivationResult], outcome: ActivationResult) -> None:
    total = totals.setdefault(outcome.handler, ActivationResult(outcome.handler))
    total.fetched += outcome.fetched
    total.succeeded += outcome.succeeded
    total.failed += outcome.failed
    total.released += outcome.released
    total.failures.extend(outcome.failures)
    if outcome.status is not None and (total.status is None or outcome.fetch_failed):
        total.status = outcome.status
    if outcome.error:
        total.error = outcome.error
    if outcome.run_id is not None:
        total.run_id = outcome.run_id
    if outcome.skipped and not total.fetched:
        total.skipped = outcome.skipped


class DrainProgress:
    """Logs items done, the rate and the items waiting every few seconds during ``--drain``."""

    def __init__(
        self,
        service: WorkItemProcessingService,
        registrations: list[Registration],
    ) -> None:
        self._service = service
        self._registrations = registrations
        self._finished_items = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="workitems-progress", daemon=True)

    def cycle_done(self, result: CycleResult) -> None:
        with self._lock:
            self._finished_items += result.succeeded + result.failed

    def done(self) -> int:
        """Items ended (succeeded or failed) so far, in finished cycles and the current one."""
        live = 0
        for activation in self._service.active():
            snapshot = activation.snapshot(failures_from=10**9)
            live += snapshot.succeeded + snapshot.failed
        with self._lock:
            return self._finished_items + live

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        try:
            while not self._stop.wait(PROGRESS_INTERVAL):
                done = self.done()
                elapsed = max(1e-9, time.monotonic() - self._started)
                waiting = 0
                known = False
                for reg in self._registrations:
                    backlog = health.handler_backlog(reg.name).count
                    if backlog is not None:
                        waiting += backlog
                        known = True
                logger.info(
                    "Draining: %s done, %.1f items/s, %s waiting",
                    plural(done, "item"),
                    done / elapsed,
                    waiting if known else "unknown",
                )
                hygiene.after_work(idle=False)
        finally:
            hygiene.close_all()


def run_once(
    handlers: Iterable[str] | None = None,
    purpose: Purpose | str | None = None,
    *,
    registry: HandlerRegistry | None = None,
    workers: int | None = None,
) -> CycleResult:
    """One full cycle of the selected handlers, blocking; syncs handler rows and records runs."""
    return BackgroundProcessingService(
        registry=registry, handlers=handlers, purpose=purpose, workers=workers
    ).run_once()


def notify(name: str, *, registry: HandlerRegistry | None = None) -> None:
    """Ask running workers to activate handler ``name`` now."""
    registry = registry if registry is not None else default_registry
    registry.get(name)  # an unknown name is an error here, not a silent no-op
    if not request_run(name):  # no row yet: no worker has started since it was added
        recording.sync_handlers(registry)
        request_run(name)


def resident_memory_mb() -> float:
    """Resident memory of this process in MB (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
