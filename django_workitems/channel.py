"""The bounded channel between fetches and the pool, fair across handlers."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from .pool import Waker

E = TypeVar("E")


class FairChannel(Generic[E]):
    """A bounded queue of entries keyed by handler, handed out round-robin across keys.

    Capacity is counted in entries queued plus slots *reserved* for fetches in flight, so
    items fetched but not yet started never exceed ``capacity`` (the handlers are asked for no
    more than they were given room for). ``take`` skips keys at their concurrency limit.
    An entry put with ``solo=True`` is handed out only when nothing else is in process, and
    nothing else is handed out while it is: a suspect item runs alone.
    One condition variable guards all state; the waker (told when room is freed, so the
    coordinator plans the next fetches) is woken outside it.
    """

    def __init__(self, capacity: int, waker: Waker | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self.capacity = capacity
        self._cond = threading.Condition()
        self._queues: dict[str, deque[tuple[E, bool]]] = {}
        self._ring: deque[str] = deque()  # keys with queued entries, in turn order
        self._reserved: Counter[str] = Counter()
        self._reserved_total = 0  # sum of _reserved, kept so that room costs no sum per take
        self._in_process: Counter[str] = Counter()
        self._limits: dict[str, int] = {}
        self._size = 0
        self._busy = 0  # entries in process, all keys
        self._solo_running = False
        self._closed = False
        self._waker = waker
        self._low_water = max(1, capacity // 2)

    # -- producers --------------------------------------------------------------------------

    def room(self) -> int:
        """Free slots: capacity less entries queued and slots reserved (never below zero)."""
        with self._cond:
            return max(0, self._room())

    def _room(self) -> int:
        return self.capacity - self._size - self._reserved_total

    def queued(self, key: str) -> int:
        """Entries of ``key`` queued or reserved (not those in process)."""
        with self._cond:
            return len(self._queues.get(key, ())) + self._reserved[key]

    def in_process(self, key: str) -> int:
        with self._cond:
            return self._in_process[key]

    def reserve(self, key: str, count: int) -> int:
        """Reserve up to ``count`` slots for a fetch of ``key``; returns how many were granted."""
        with self._cond:
            granted = max(0, min(count, self._room()))
            if granted:
                self._reserved[key] += granted
                self._reserved_total += granted
            return granted

    def unreserve(self, key: str, count: int) -> None:
        """Return reserved slots that a fetch did not fill."""
        with self._cond:
            self._release_reservation(key, count)
        self._room_freed()

    def _release_reservation(self, key: str, count: int) -> None:
        held = self._reserved[key]
        left = held - count
        if left > 0:
            self._reserved[key] = left
            self._reserved_total -= count
        else:
            self._reserved.pop(key, None)
            self._reserved_total -= held

    def put(
        self,
        key: str,
        entries: Sequence[E],
        reserved: int,
        solo: Sequence[bool] | None = None,
        urgent: int = 0,
    ) -> bool:
        """Queue ``entries`` of ``key`` in place of ``reserved`` slots; False once closed.

        Entries beyond the reservation are still accepted (a handler that returns more than it
        was asked for must not lose items), which is the only way past ``capacity``. The first
        ``urgent`` entries go before the entries of ``key`` already queued.
        """
        with self._cond:
            self._release_reservation(key, reserved)
            if self._closed:
                return False
            freed = reserved > len(entries)  # a short batch gives back part of its reservation
            if entries:
                queue = self._queues.get(key)
                if queue is None:
                    queue = self._queues[key] = deque()
                if not queue:
                    self._ring.append(key)
                flags = solo if solo is not None else [False] * len(entries)
                pairs = list(zip(entries, flags, strict=True))
                queue.extendleft(reversed(pairs[:urgent]))
                queue.extend(pairs[urgent:])
                self._size += len(entries)
                self._cond.notify(len(entries))
        if freed:
            self._room_freed()
        return True

    def set_limit(self, key: str, limit: int | None) -> None:
        """At most ``limit`` entries of ``key`` in process at once (None: no limit)."""
        if limit is not None and (isinstance(limit, bool) or limit < 1):
            raise ValueError(f"limit must be None or >= 1, got {limit!r}")
        with self._cond:
            if limit is None:
                self._limits.pop(key, None)
            else:
                self._limits[key] = limit
            self._cond.notify_all()

    # -- consumers --------------------------------------------------------------------------

    def take(self, timeout: float | None = None, done: str | None = None) -> tuple[str, E] | None:
        """Next entry in round-robin order; None on time-out or once the channel is closed.

        ``done``: the key of an entry this consumer took earlier and has now processed, as
        with :meth:`task_done`, in the same turn of the lock (one acquisition per item).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        notify_room = False
        with self._cond:
            if done is not None:
                self._done(done)
            while True:
                if self._closed:
                    return None
                found = self._next()
                if found is not None:
                    room = self._room()
                    emptied = found[0] not in self._ring
                    notify_room = emptied or room == self._low_water
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
        if notify_room:
            self._room_freed()
        return found

    def _next(self) -> tuple[str, E] | None:
        if self._solo_running:
            return None
        for _ in range(len(self._ring)):
            key = self._ring[0]
            self._ring.rotate(-1)  # key is now last: the next take starts with its successor
            limit = self._limits.get(key)
            if limit is not None and self._in_process[key] >= limit:
                continue
            queue = self._queues[key]
            if queue[0][1]:
                if self._busy:
                    # Hold everything back until the pool is empty, or the suspect would
                    # wait forever behind a steady stream of other items.
                    self._ring.rotate(1)
                    return None
                self._solo_running = True
            entry, _solo = queue.popleft()
            if not queue:
                self._ring.pop()
            self._size -= 1
            self._busy += 1
            self._in_process[key] += 1
            return key, entry
        return None

    def task_done(self, key: str) -> None:
        """An entry of ``key`` taken earlier has been processed."""
        with self._cond:
            self._done(key)

    def _done(self, key: str) -> None:
        left = self._in_process[key] - 1
        if left > 0:
            self._in_process[key] = left
        else:
            del self._in_process[key]
        self._busy -= 1
        if self._busy == 0:
            self._solo_running = False
            self._cond.notify_all()
        elif key in self._limits:
            self._cond.notify_all()

    # -- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new entries and wake every consumer; queued entries stay for :meth:`drain`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def drain(self) -> list[tuple[str, E]]:
        """Remove and return every queued entry (those never started)."""
        with self._cond:
            drained = [(key, entry) for key, queue in self._queues.items() for entry, _ in queue]
            self._queues.clear()
            self._ring.clear()
            self._size = 0
            return drained

    def make_way(self, key: str, count: int, movable: Callable[[E], bool]) -> list[E]:
        """Take out up to ``count`` of the newest queued entries of ``key`` that ``movable``
        accepts (never a solo one), so that as many urgent entries can take their place without
        the key holding more than before. Returns them, newest first (never started)."""
        removed: list[E] = []
        with self._cond:
            queue = self._queues.get(key)
            if not queue or count < 1:
                return removed
            skipped: list[tuple[E, bool]] = []
            while queue and len(removed) < count:
                entry, solo = queue.pop()
                if solo or not movable(entry):
                    skipped.append((entry, solo))
                else:
                    removed.append(entry)
            queue.extend(reversed(skipped))
            self._size -= len(removed)
            if not queue:
                with contextlib.suppress(ValueError):
                    self._ring.remove(key)
        if removed:
            self._room_freed()
        return removed

    def remove(self, key: str, predicate: Callable[[E], bool]) -> list[E]:
        """Take out the queued entries of ``key`` that ``predicate`` picks (never started)."""
        with self._cond:
            queue = self._queues.get(key)
            if not queue:
                return []
            kept: deque[tuple[E, bool]] = deque()
            removed = []
            for entry, solo in queue:
                if predicate(entry):
                    removed.append(entry)
                else:
                    kept.append((entry, solo))
            self._queues[key] = kept
            self._size -= len(removed)
            if not kept:
                with contextlib.suppress(ValueError):
                    self._ring.remove(key)
        if removed:
            self._room_freed()
        return removed

    def __len__(self) -> int:
        with self._cond:
            return self._size

    def _room_freed(self) -> None:
        if self._waker is not None:
            self._waker.wake()
