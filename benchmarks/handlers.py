"""Handlers the workloads run, in worker subprocesses and in this process."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.db.models import F

import django_workitems as workitems

from . import census
from .models import BenchItem

IO_SECONDS = 0.02
"""How long an I/O-bound item waits (workload 2), as an HTTP call would."""


def emit(*fields: object) -> None:
    """One line on stdout for the process that started this worker (flushed at once)."""
    sys.stdout.write(" ".join(str(f) for f in fields) + "\n")
    sys.stdout.flush()


def resident_memory_mb() -> float:
    """Resident memory of this process in MB (Linux)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class DrainHandler(workitems.QuerySetHandler[BenchItem]):
    """Workload 1: items that cost nothing, so claiming and recording is all there is."""

    queryset = BenchItem.objects.all()

    def handle(self, obj: BenchItem, cancel: workitems.CancellationToken) -> None:
        pass


def orm_work(pk: int) -> None:
    """The work of one item of workloads 13 and 14: one ORM UPDATE (engine and plain loop)."""
    started = census.started()
    BenchItem.objects.filter(pk=pk).update(handled=F("handled") + 1)
    census.ended(started)


class OrmHandler(DrainHandler):
    """Workloads 13 and 14: each item is one ORM UPDATE of its own row (``handled + 1``)."""

    def handle(self, obj: BenchItem, cancel: workitems.CancellationToken) -> None:
        orm_work(obj.pk)


class IoHandler(DrainHandler):
    """Workload 2: each item waits like an HTTP call."""

    def handle(self, obj: BenchItem, cancel: workitems.CancellationToken) -> None:
        time.sleep(IO_SECONDS)


class WakeHandler(DrainHandler):
    """Workload 4: says when processing started (CLOCK_MONOTONIC is system-wide on Linux)."""

    def handle(self, obj: BenchItem, cancel: workitems.CancellationToken) -> None:
        emit("bench-wake", obj.pk, f"{time.monotonic():.6f}")


class RecoverHandler(DrainHandler):
    """Workload 12: 50 ms items (the rows a dead worker held)."""

    def handle(self, obj: BenchItem, cancel: workitems.CancellationToken) -> None:
        time.sleep(0.05)


class SlowHandler(DrainHandler):
    """Workload 11: slow items; says when each started and ended, and in which process."""

    seconds = 0.5

    def handle(self, obj: BenchItem, cancel: workitems.CancellationToken) -> None:
        started = time.monotonic()
        time.sleep(self.seconds)
        emit("bench-slow", os.getpid(), f"{started:.6f}", f"{time.monotonic():.6f}")


@dataclass(frozen=True)
class Ticket:
    """An in-memory work item."""

    id: int


class EndlessHandler(workitems.WorkItemHandler[Ticket]):
    """Workload 6: always has a full batch; reports resident memory at checkpoints.

    The checkpoints (numbers of finished activations) come from ``BENCH_MEMORY_CHECKPOINTS``.
    A new activation of this exclusive handler starts only once the previous one has finished,
    so the n-th fetch sees n - 1 finished activations.
    """

    _fetches = itertools.count(1)
    _ids = itertools.count(1)

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[Ticket]:
        finished = next(self._fetches) - 1
        checkpoints = os.environ.get("BENCH_MEMORY_CHECKPOINTS", "")
        if str(finished) in checkpoints.split(","):
            emit("bench-rss", finished, f"{resident_memory_mb():.3f}")
        return [Ticket(next(self._ids)) for _ in range(max_items)]

    def process(self, item: Ticket, cancel: workitems.CancellationToken) -> None:
        pass


class StaticHandler(workitems.WorkItemHandler[Ticket]):
    """Workload 3: hands out a prepared list of items once; ``process`` does nothing."""

    def __init__(self, items: list[Ticket]) -> None:
        self.items = items

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[Ticket]:
        batch, self.items[:] = self.items[:max_items], self.items[max_items:]
        return batch

    def process(self, item: Ticket, cancel: workitems.CancellationToken) -> None:
        pass


class Stopwatch:
    """Thread-safe record of when fetches started and items finished, per handler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.first_fetch: dict[str, float] = {}
        self.first_item_fetch: dict[str, float] = {}
        self.done: dict[str, list[float]] = {}
        self.watchers: list[tuple[str, int, threading.Event]] = []

    def fetched(self, name: str, at: float, count: int) -> None:
        with self._lock:
            self.first_fetch.setdefault(name, at)
            if count:
                self.first_item_fetch.setdefault(name, at)

    def finished(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            times = self.done.setdefault(name, [])
            times.append(now)
            for watched, count, event in self.watchers:
                if watched == name and len(times) >= count:
                    event.set()

    def when_done(self, name: str, count: int) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self.watchers.append((name, count, event))
            if len(self.done.get(name, ())) >= count:
                event.set()
        return event


class ListHandler(workitems.WorkItemHandler[Ticket]):
    """Workload 5: takes items from a shared list under a lock (an atomic claim)."""

    def __init__(self, name: str, source: list[Ticket], seconds: float, watch: Stopwatch) -> None:
        self.name, self.source, self.seconds, self.watch = name, source, seconds, watch

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[Ticket]:
        at = time.monotonic()
        with self.watch._lock:
            batch = self.source[:max_items]
            del self.source[:max_items]
        self.watch.fetched(self.name, at, len(batch))
        return batch

    def process(self, item: Ticket, cancel: workitems.CancellationToken) -> None:
        time.sleep(self.seconds)
        self.watch.finished(self.name)


def list_factory(
    name: str, source: list[Ticket], seconds: float, watch: Stopwatch
) -> Callable[[], ListHandler]:
    """A zero-argument factory over one shared list, as ``add_handler`` wants."""

    def factory() -> ListHandler:
        return ListHandler(name, source, seconds, watch)

    factory.__qualname__ = f"ListHandler[{name}]"
    return factory


class AsyncSleepHandler(StaticHandler):
    """Workload 10: hands out a prepared list once; ``process`` awaits ``ASYNC_SLEEP`` seconds."""

    seconds = 0.02

    async def process(self, item: Ticket, cancel: workitems.CancellationToken) -> None:  # type: ignore[override]
        await asyncio.sleep(self.seconds)


def tickets(count: int) -> list[Ticket]:
    return [Ticket(i) for i in range(count)]


__all__: Sequence[str] = [
    "AsyncSleepHandler",
    "DrainHandler",
    "EndlessHandler",
    "IoHandler",
    "ListHandler",
    "OrmHandler",
    "RecoverHandler",
    "SlowHandler",
    "StaticHandler",
    "Stopwatch",
    "Ticket",
    "WakeHandler",
    "orm_work",
]
