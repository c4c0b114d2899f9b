"""BackgroundProcessingService: runs cycles on the poll interval until it is stopped.

The coordinator (the thread that calls :meth:`BackgroundProcessingService.run`, the main
thread under ``runworkitems``) owns the scheduler. Other threads never touch it: they post
events to a queue and wake the coordinator through a socket pair, which is also where the
operating system writes on SIGTERM/SIGINT (``signal.set_wakeup_fd``), so the signal handlers
only set flags and the coordinator still reacts at once.
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
from datetime import timedelta
from types import FrameType
from typing import Any

from django.db import DatabaseError, connections

from . import health, metrics, recording, wakeups
from .conf import app_settings
from .handlers import CancellationToken, Purpose
from .models import Worker
from .processing import (
    Activation,
    ActivationResult,
    CycleResult,
    WorkItemProcessingService,
    release_connections,
)
from .registry import HandlerRegistry, Registration
from .registry import registry as default_registry
from .scheduling import Scheduler

logger = logging.getLogger("django_workitems.background")

REFRESH_INTERVAL = 1.0
"""Seconds between reads of the handler rows (enabled flags and run requests)."""


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


class _NoWaker(Waker):
    """Stands in before the service runs: waking it does nothing, and nothing is opened."""

    def __init__(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


class BackgroundProcessingService:
    """Drives the selected handlers until :meth:`stop` (or SIGTERM/SIGINT).

    Each pass of the loop applies finished fetches and activations to the scheduler, reads
    the handler rows at most once a second, and starts the fetches the scheduler asks for.
    """

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
        self._waker: Waker = _NoWaker()  # the real one (a socket pair) exists while running
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
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
        self._waker.wake()

    def wake(self) -> None:
        """Re-read the handler rows now instead of within a second (thread-safe)."""
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

    # -- running ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, *, listen: bool = True) -> Iterator[WorkItemProcessingService]:
        """Sync handlers, register the worker, run the pool; always shut down cleanly."""
        recording.sync_handlers(self.registry)
        self._waker = Waker()
        self.worker = recording.register_worker()
        worker_id = self.worker.pk
        lease_timeout = app_settings.lease_timeout
        shutdown_timeout = app_settings.shutdown_timeout.total_seconds()

        def beat() -> None:
            recording.heartbeat(worker_id)
            abandoned = recording.abandon_runs_of_dead_workers(lease_timeout)
            if abandoned:
                logger.warning("Marked %d runs of dead workers abandoned", abandoned)

        service = WorkItemProcessingService(
            workers=self.workers,
            worker_id=worker_id,
            lease_owner=self.worker.lease_owner,
            cancel=self._token,
            on_fetched=lambda a: self._post("fetched", a),
            on_finished=lambda a: self._post("finished", a),
            on_room=self._waker.wake,
            on_beat=beat,
        )
        self._service = service
        listener = None
        if listen and wakeups.Listener.supported():
            listener = wakeups.Listener(lambda name: self._post("request", name))
        restore = self._install_signals()
        try:
            if self.metrics_port is not None:
                metrics.serve(self.metrics_port)
            metrics.set_worker_up(True)
            if listener is not None:
                listener.start()
            recording.abandon_runs_of_dead_workers(lease_timeout)
            service.start()
            self._started.set()
            logger.info(
                "Worker %s started: %d handlers, %d threads, queue of %d",
                self.worker,
                len(self.registrations),
                service.workers,
                service.queue_size,
            )
            yield service
        finally:
            logger.info("Worker %s stopping", self.worker)
            metrics.set_worker_up(False)
            if listener is not None:
                listener.stop()
            service.stop(shutdown_timeout, abort=self._check_force_exit)
            try:
                recording.stop_worker(worker_id)
            except DatabaseError:
                logger.exception("Could not record the stop of worker %s", self.worker)
            restore()
            logger.info("Worker %s stopped", self.worker)

    def _post(self, kind: str, subject: Any) -> None:
        self._events.put((kind, subject))
        self._waker.wake()

    def _install_signals(self) -> Any:
        if (
            not self.install_signal_handlers
            or threading.current_thread() is not threading.main_thread()
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
        try:
            with self._session() as service:
                next_refresh = 0.0
                while not self._stop_requested:
                    now = time.monotonic()
                    if now >= next_refresh:
                        states = self._refresh(scheduler, states)
                        next_refresh = now + REFRESH_INTERVAL
                        self._check_memory()
                        if self.health_file is not None:
                            health.touch_liveness_file(self.health_file)
                    self._apply_events(scheduler, now)
                    if self._recycling:
                        if not scheduler.busy():
                            logger.info(
                                "Worker %s: recycling after %d cycles", self.worker, self._cycles
                            )
                            break
                    elif self._start_due(service, scheduler, states, now):
                        self._cycles += 1
                        if self.max_cycles is not None and self._cycles >= self.max_cycles:
                            self._recycling = True  # let this cycle finish, then stop
                    until_due = scheduler.seconds_until_due(now)
                    timeout = next_refresh - now
                    if until_due is not None:
                        timeout = min(timeout, until_due)
                    self._waker.wait(max(0.0, timeout))
        finally:
            self._waker.close()
            # This thread is the worker's coordinator: nobody else uses its connections.
            connections.close_all()

    def run_once(self) -> CycleResult:
        """One cycle of the selected handlers: fetch each once, process everything fetched."""
        skipped: dict[str, ActivationResult] = {}
        try:
            # One cycle: nothing to wake up for, so no LISTEN connection to open and close.
            with self._session(listen=False) as service:
                states = recording.handler_states(r.name for r in self.registrations)
                handlers = []
                for reg in self.registrations:
                    state = states.get(reg.name)
                    if state is None or not state.is_enabled:
                        skipped[reg.name] = ActivationResult(reg.name, skipped="disabled")
                    else:
                        handlers.append((reg, state.handler_id))
                result = service.run_cycle(
                    handlers, stopped=lambda: self._stop_requested, wait=self._waker.wait
                )
        finally:
            self._waker.close()
        result.handlers.update(skipped)
        return CycleResult(dict(sorted(result.handlers.items())))

    def _refresh(
        self, scheduler: Scheduler, states: dict[str, recording.HandlerState]
    ) -> dict[str, recording.HandlerState]:
        try:
            fresh = recording.handler_states(scheduler.names)
        except DatabaseError:
            logger.exception("Could not read the handler rows; retrying")
            return states
        finally:
            release_connections(idle=False)
        scheduler.note_requests({name: s.run_requested_at for name, s in fresh.items()})
        return fresh

    def _apply_events(self, scheduler: Scheduler, now: float) -> None:
        while True:
            try:
                kind, subject = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "request":
                scheduler.request(subject)
                continue
            activation: Activation = subject
            if kind == "fetched":
                scheduler.fetch_finished(
                    activation.name,
                    asked=activation.max_items,
                    fetched=activation.result.fetched,
                    failed=activation.result.fetch_failed or bool(activation.result.skipped),
                    now=now,
                    isolated=activation.result.isolated,
                )
            else:
                scheduler.activation_finished(activation.name)

    def _start_due(
        self,
        service: WorkItemProcessingService,
        scheduler: Scheduler,
        states: dict[str, recording.HandlerState],
        now: float,
    ) -> bool:
        """Start the fetches the scheduler asks for; True when at least one started."""
        channel = service.channel
        started = False
        plan = scheduler.plan(
            now,
            enabled=lambda name: name in states and states[name].is_enabled,
            room=channel.room(),
            queued=channel.queued,
            capacity=channel.capacity,
        )
        for reg, ask in plan:
            activation = service.activate(
                reg, handler_id=states[reg.name].handler_id, max_items=ask
            )
            if activation is not None:
                scheduler.fetch_started(reg.name, now)
                started = True
        return started

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
    if not recording.request_run(name):  # no row yet: no worker has started since it was added
        recording.sync_handlers(registry)
        recording.request_run(name)


def resident_memory_mb() -> float:
    """Resident memory of this process in MB (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
