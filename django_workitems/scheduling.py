"""When each handler is due, and who gets the channel's room: pure bookkeeping, no threads.

Two decisions live here, both owned by the coordinator thread:

- :class:`Scheduler`: when a handler gets a new activation (at start, every poll interval or
  schedule slot, at once after an activation that used its whole allowance with full batches,
  or when asked to run now).
- :func:`plan_fetches`: which live activations fetch now and how many items each asks for:
  the channel's room goes round the handlers in turn (whoever was served longest ago first),
  each asking at most its fair share of the channel and no more than its pool will start
  within about a second (no hoarding of claims).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from .registry import Registration

HORIZON = 1.0
"""Seconds of work a process may hold claimed but not started, judged from item durations."""


def fair_shares(capacity: int, demands: Sequence[int]) -> list[int]:
    """Split ``capacity`` among ``demands`` max-min fairly (water-filling).

    Nobody gets more than it asked for; what a small demand leaves is shared by the others, and
    the whole capacity is handed out while some demand is unmet (the remainder of an uneven
    split goes one by one to the earliest of the largest demands). Negative demands count as 0.
    """
    wants = [max(0, demand) for demand in demands]
    shares = [0] * len(wants)
    pending = sorted((i for i, want in enumerate(wants) if want > 0), key=lambda i: wants[i])
    left = max(0, capacity)
    while pending and left > 0:
        each = left // len(pending)
        i = pending[0]
        if each >= 1 and wants[i] <= each:
            shares[i] = wants[i]
            left -= wants[i]
            pending.pop(0)
            continue
        for i in pending:
            shares[i] = each
        left -= each * len(pending)
        for i in sorted(pending, key=lambda i: (-wants[i], i))[:left]:
            shares[i] += 1
        break
    return shares


class Fetchable(Protocol):
    """What :func:`plan_fetches` needs to know of a live activation."""

    @property
    def name(self) -> str: ...

    @property
    def serial(self) -> int: ...

    @property
    def allowance(self) -> int: ...

    @property
    def outstanding(self) -> int: ...

    @property
    def hold(self) -> bool: ...

    @property
    def registration(self) -> Registration: ...


@dataclass(frozen=True)
class FetchPlan:
    """One fetch to start: ``activation`` asks for ``ask`` items."""

    activation: Fetchable
    ask: int


def claim_limit(
    registration: Registration,
    *,
    workers: int,
    item_seconds: float | None,
    is_async: bool = False,
    async_concurrency: int = 100,
) -> int:
    """How many items of this handler may wait unstarted in this process (at least 1).

    About what the pool starts within ``HORIZON`` seconds at the handler's recent item
    duration; with no duration known yet, as many as can start at once (a slow start, so a
    first fetch of slow items never hoards what another worker's idle threads could take).
    """
    parallel = async_concurrency if is_async else workers
    if registration.max_concurrency is not None:
        parallel = min(parallel, registration.max_concurrency)
    if item_seconds is None:
        return max(1, parallel)
    return max(1, math.ceil(parallel * HORIZON / max(item_seconds, 1e-6)))


def plan_fetches(
    candidates: Iterable[Fetchable],
    *,
    room: int,
    capacity: int,
    queued: Callable[[str], int],
    limit: Callable[[Fetchable], int],
    served: Callable[[str], int],
    busy: Iterable[str] = (),
) -> list[FetchPlan]:
    """The fetches to start now, given ``room`` free slots in a channel of ``capacity``.

    ``candidates`` are activations that may fetch (the caller has excluded those fetching, out
    of allowance, or exclusive with items outstanding). Each handler is one contender; so is
    every handler in ``busy`` (items queued, a fetch in flight). The share of each is
    ``capacity // contenders`` (at least 1), and what it asks for is also bounded by its
    allowance and by ``limit`` (claims not to hoard) less what it has queued already. A
    handler with items still queued waits until at most half its limit is left, so a backlog
    is claimed in real batches, not one item per freed slot.

    The room goes to the handlers in the order they were last served (``served``: a sequence
    number, smaller is longer ago). The next in turn takes what is left once at least half its
    ask fits; when not even that fits, nobody behind it is served either, so no handler is
    served twice while another waits.
    """
    wanting: dict[str, tuple[Fetchable, int]] = {}
    for activation in sorted(candidates, key=lambda a: a.serial):
        if activation.name in wanting:
            continue
        waiting = queued(activation.name)
        cap = limit(activation)
        if waiting > 0 and waiting > cap // 2:
            continue
        want = min(activation.allowance, cap - waiting)
        if want >= 1:
            wanting[activation.name] = (activation, want)
    if not wanting:
        return []
    contenders = len(set(wanting) | set(busy))
    share = max(1, capacity // contenders)
    plans = []
    left = room
    for name in sorted(wanting, key=lambda n: (served(n), wanting[n][0].serial)):
        activation, want = wanting[name]
        ask = min(want, share)
        if ask > left:
            if left < max(1, (ask + 1) // 2):
                break
            # At least half its ask fits: it takes the rest now rather than waiting until the
            # channel is empty (the pool would idle at every batch boundary).
            ask = left
        plans.append(FetchPlan(activation, ask))
        left -= ask
    return plans


@dataclass
class _Timer:
    registration: Registration
    poll_interval: float
    next_due: float = 0.0
    requested: bool = False
    drain: bool = False
    open: int = 0
    """Activations started and not finished."""
    fetching: bool = False
    """An activation that may still fetch is open: no second one is started beside it."""
    hold: bool = False
    seen_request: datetime | None = None


class Scheduler:
    """Decides when each handler gets a new activation.

    - Every handler is due at start, then every poll interval after its last activation
      started (after a failed fetch: one interval after the failure).
    - Drain mode: an activation that used its whole allowance with full batches makes the
      handler due again as soon as it stops fetching (a non-exclusive handler: its items may
      still be in process), or as soon as it finished (an exclusive one, whose fetch would
      return its unfinished items again).
    - A request (``notify``, "run now") makes it due at once.
    - Disabled handlers are never due; a handler with a ``schedule`` has no interval: it is
      due when a slot was taken for it, which arrives as a request.
    """

    def __init__(
        self, registrations: Iterable[Registration], *, poll_interval: timedelta | None = None
    ) -> None:
        self._timers = {
            r.name: _Timer(
                r,
                (
                    r.poll_interval
                    if r.poll_interval is not None
                    else (poll_interval or r.effective_poll_interval())
                ).total_seconds(),
            )
            for r in registrations
        }
        self._enabled: dict[str, bool] = {}
        self._requests_seeded = False

    @property
    def names(self) -> list[str]:
        return list(self._timers)

    def registration(self, name: str) -> Registration:
        return self._timers[name].registration

    # -- inputs -------------------------------------------------------------------------

    def set_enabled(self, enabled: dict[str, bool]) -> None:
        """Which handlers are enabled (from their rows); unknown ones count as disabled."""
        self._enabled = dict(enabled)

    def enabled(self, name: str) -> bool:
        return self._enabled.get(name, False)

    def note_requests(self, requested_at: dict[str, datetime | None]) -> None:
        """Feed ``Handler.run_requested_at`` values; a newer one than last seen makes it due."""
        for name, at in requested_at.items():
            timer = self._timers.get(name)
            if timer is None or at is None:
                continue
            if self._requests_seeded and (timer.seen_request is None or at > timer.seen_request):
                timer.requested = True
            timer.seen_request = at
        self._requests_seeded = True

    def request(self, name: str) -> None:
        """Make a handler due now (a wake-up from ``notify``, a slot, a dead worker's work)."""
        timer = self._timers.get(name)
        if timer is not None:
            timer.requested = True

    # -- decisions ----------------------------------------------------------------------

    def _startable(self, timer: _Timer) -> bool:
        reg = timer.registration
        if timer.fetching or not self.enabled(reg.name):
            return False
        return not ((reg.exclusive or timer.hold) and timer.open)

    def _timer_due(self, timer: _Timer, now: float) -> bool:
        if timer.registration.schedule is not None:
            return False  # slots, not intervals, make it due
        return now >= timer.next_due

    def due(self, now: float) -> list[Registration]:
        """Handlers to activate now."""
        return [
            t.registration
            for t in self._timers.values()
            if self._startable(t) and (t.requested or t.drain or self._timer_due(t, now))
        ]

    def seconds_until_due(self, now: float) -> float | None:
        """Time until the next handler that waits on its timer (None when none does)."""
        waits = [
            t.next_due - now
            for t in self._timers.values()
            if self._startable(t) and t.registration.schedule is None and t.next_due > now
        ]
        return min(waits) if waits else None

    def busy(self) -> bool:
        """True while any activation is open."""
        return any(t.open for t in self._timers.values())

    # -- activation events --------------------------------------------------------------

    def activated(self, name: str, now: float) -> None:
        timer = self._timers[name]
        timer.open += 1
        timer.fetching = True
        timer.requested = False
        timer.drain = False
        timer.hold = False
        timer.next_due = now + timer.poll_interval

    def fetching_ended(
        self, name: str, *, drained: bool, failed: bool, now: float, hold: bool = False
    ) -> None:
        """The handler's activation will fetch no more (it may still have items in process)."""
        timer = self._timers[name]
        timer.fetching = False
        timer.drain = drained and not failed
        timer.hold = hold
        if failed:
            timer.next_due = now + timer.poll_interval

    def finished(self, name: str) -> None:
        timer = self._timers[name]
        timer.open = max(0, timer.open - 1)
        if not timer.open:
            timer.hold = False
