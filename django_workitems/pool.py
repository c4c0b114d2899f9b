"""The threads of a processing service, and what each is doing.

- :class:`FetchPool`: threads for fetches and finishing work, one more whenever all are busy;
- :class:`FetchJob`: one ``fetch_next`` call in flight, ended once (returned or given up);
- :class:`Slot`: what one pool thread is processing now, shared with the watchdog;
- :class:`DurationStats`: recent item durations per handler, to size claims.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from . import hygiene
from .handlers import CancellationToken, current_worker_id

if TYPE_CHECKING:
    from .activation import Activation

logger = logging.getLogger("django_workitems.processing")

IDLE_AFTER = 1.0
"""Seconds without work after which a thread applies ``close_old_connections`` semantics."""

FETCHER_IDLE_EXIT = 30.0
"""Seconds a spare fetch thread waits for work before it ends."""


class FetchJob:
    """One ``fetch_next`` call in flight; ended exactly once, by its thread or by its time-out."""

    __slots__ = ("_lock", "_state", "activation", "ask", "deadline", "started")

    def __init__(self, activation: Activation, ask: int, timeout: float | None) -> None:
        self.activation = activation
        self.ask = ask
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self._lock = threading.Lock()
        self._state = "running"

    def complete(self) -> bool:
        """The fetch returned: False when it had been given up meanwhile."""
        with self._lock:
            if self._state != "running":
                return False
            self._state = "done"
            return True

    def give_up(self) -> bool:
        with self._lock:
            if self._state != "running":
                return False
            self._state = "given up"
            return True


class Taken(NamedTuple):
    """An item taken away from a pool thread that did not return from it in time."""

    activation: Activation
    item: Any
    key: str
    started: float


class Slot:
    """What one pool thread is processing now; shared with the coordinator's watchdog."""

    __slots__ = (
        "_lock",
        "activation",
        "deadline",
        "given_up",
        "grace_until",
        "item",
        "key",
        "started",
        "thread",
        "thread_name",
        "token",
    )

    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self.thread: threading.Thread | None = None
        self.activation: Activation | None = None
        self.item: Any = None
        self.key = ""
        self.token: CancellationToken | None = None
        self.started = 0.0
        self.deadline: float | None = None
        self.grace_until: float | None = None
        self.given_up = False
        self._lock = threading.Lock()

    def begin(
        self,
        activation: Activation,
        item: Any,
        key: str,
        token: CancellationToken,
        timeout: float | None,
    ) -> None:
        with self._lock:
            self.activation, self.item, self.key, self.token = activation, item, key, token
            self.started = time.monotonic()
            self.deadline = None if timeout is None else self.started + timeout
            self.grace_until = None

    def end(self) -> bool:
        """The item returned; False when it had been given up (its outcome is recorded)."""
        with self._lock:
            if self.given_up:
                return False
            self.activation = None
            self.item = None
            self.token = None
            return True

    def give_up(self) -> Taken | None:
        """Take the item away from this thread; None when it has just returned."""
        with self._lock:
            if self.given_up or self.activation is None:
                return None
            self.given_up = True
            return Taken(self.activation, self.item, self.key, self.started)


class FetchPool:
    """Threads for fetches and finishing work: one more is started whenever all are busy."""

    def __init__(self, worker_id: int | None) -> None:
        self._worker_id = worker_id
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._waiting = 0
        self._threads: set[threading.Thread] = set()
        self._serial = 0
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._waiting += 1
            spawn = self._waiting > self._idle and not self._closed
            if spawn:
                self._serial += 1
                thread = threading.Thread(
                    target=self._run, name=f"workitems-fetch-{self._serial}", daemon=True
                )
                self._threads.add(thread)
        self._jobs.put(job)
        if spawn:
            thread.start()

    def _run(self) -> None:
        me = threading.current_thread()
        current_worker_id.set(self._worker_id)
        try:
            while True:
                with self._lock:
                    self._idle += 1
                try:
                    try:
                        job = self._jobs.get(timeout=IDLE_AFTER)
                    except queue.Empty:
                        hygiene.after_work(idle=True)
                        try:
                            job = self._jobs.get(timeout=FETCHER_IDLE_EXIT)
                        except queue.Empty:
                            return
                finally:
                    with self._lock:
                        self._idle -= 1
                if job is None:
                    return
                with self._lock:
                    self._waiting -= 1
                try:
                    job()
                except BaseException:
                    logger.exception("A fetch thread's job raised")
                finally:
                    hygiene.after_work(idle=False)
        finally:
            with self._lock:
                self._threads.discard(me)
            hygiene.close_all()

    def stop(self, timeout: float) -> None:
        """Ask every thread to exit and wait up to ``timeout`` seconds for them to close."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        join_all(threads, timeout)

    def alive(self) -> int:
        with self._lock:
            return len(self._threads)


class DurationStats:
    """Recent item duration per handler (an exponential average), to size claims."""

    WEIGHT = 0.2

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    def observe(self, name: str, seconds: float) -> None:
        # A lost update between two pool threads only makes the estimate a little staler.
        previous = self._seconds.get(name)
        self._seconds[name] = (
            seconds if previous is None else previous + self.WEIGHT * (seconds - previous)
        )

    def get(self, name: str) -> float | None:
        return self._seconds.get(name)


class Waker(Protocol):
    """Wakes a coordinator blocked in :meth:`wait`; ``wake`` is thread-safe and never blocks.

    Threads that have news for the coordinator post it where the coordinator looks (its event
    queue, the channel, the lease keeper's orphaned handlers) and wake it: nothing calls back
    into the coordinator's state.
    """

    def wake(self) -> None: ...

    def wait(self, timeout: float | None) -> None: ...


class EventWaker:
    """Wakes a coordinator blocked in :meth:`wait` (used when no socket waker is given)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout: float | None) -> None:
        self._event.wait(timeout)
        self._event.clear()


def join_all(threads: Iterable[threading.Thread], timeout: float) -> None:
    """Wait for threads to end, all together at most ``timeout`` seconds (never the caller)."""
    deadline = time.monotonic() + timeout
    me = threading.current_thread()
    for thread in threads:
        if thread is not me and thread.ident is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
