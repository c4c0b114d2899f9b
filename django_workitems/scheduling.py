"""Which handlers are due for a fetch, and how many items each may ask for.

Pure bookkeeping, owned by the coordinator thread: no locks, no database, no clock of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from .registry import Registration


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
        # Every pending demand exceeds an equal split: give each the split, then the remainder
        # (fewer slots than pending demands) one slot each, largest demands first.
        for i in pending:
            shares[i] = each
        left -= each * len(pending)
        for i in sorted(pending, key=lambda i: (-wants[i], i))[:left]:
            shares[i] += 1
        break
    return shares


@dataclass
class _HandlerSchedule:
    registration: Registration
    poll_interval: timedelta
    next_due: float = 0.0
    drain: bool = False
    fetching: bool = False
    fetch_started: float = 0.0
    active: int = 0
    requested: bool = False
    seen_request: datetime | None = None
    hold: bool = False  # an isolated item is pending: wait for the activations to finish


class Scheduler:
    """Decides, each time the coordinator wakes, which handlers to fetch and how much.

    - Every handler is due at start, then every poll interval after its last fetch started.
    - Drain mode: a fetch that returned a full batch makes the handler due again at once.
    - An exclusive handler is not fetched while an activation of it is unfinished here.
    - A non-exclusive handler is fetched again, in drain mode, as soon as the channel has room
      for half a batch of it, so the pool never idles between batches.
    - A fetch that returned an item to be processed alone (a suspect taken back from a dead
      worker) holds the handler until its activations finish, then it is due again at once:
      suspects are retried one after another, without waiting for the poll interval.
    - The channel is shared fairly: each handler with items queued or due gets an equal share.
    """

    def __init__(
        self, registrations: Iterable[Registration], *, poll_interval: timedelta | None = None
    ) -> None:
        self._states = {
            r.name: _HandlerSchedule(
                r,
                r.poll_interval
                if r.poll_interval is not None
                else (poll_interval or r.effective_poll_interval()),
            )
            for r in registrations
        }
        self._requests_seeded = False

    @property
    def names(self) -> list[str]:
        return list(self._states)

    def note_requests(self, requested_at: dict[str, datetime | None]) -> None:
        """Feed ``Handler.run_requested_at`` values; a newer one than last seen makes it due."""
        for name, at in requested_at.items():
            state = self._states.get(name)
            if state is None or at is None:
                continue
            if self._requests_seeded and (state.seen_request is None or at > state.seen_request):
                state.requested = True
            state.seen_request = at
        self._requests_seeded = True

    def request(self, name: str) -> None:
        """Make a handler due now (a wake-up from ``notify``)."""
        if name in self._states:
            self._states[name].requested = True

    def plan(
        self,
        now: float,
        *,
        enabled: Callable[[str], bool],
        room: int,
        queued: Callable[[str], int],
        capacity: int,
    ) -> list[tuple[Registration, int]]:
        """The fetches to start now, as (registration, max_items) pairs."""
        candidates = []
        for state in self._states.values():
            reg = state.registration
            if state.fetching or not enabled(reg.name):
                continue
            if (reg.exclusive or state.hold) and state.active:
                continue
            if state.requested or state.drain or now >= state.next_due:
                candidates.append(state)
        if not candidates:
            return []
        contending = {s.registration.name for s in candidates}
        contending.update(name for name in self._states if queued(name) > 0)
        share = max(1, capacity // len(contending))
        demands: list[tuple[_HandlerSchedule, int]] = []
        for state in candidates:
            reg = state.registration
            batch = min(reg.max_items_per_cycle, share)
            want = min(reg.max_items_per_cycle, share - queued(reg.name))
            if reg.max_concurrency is not None:
                # Hold no more than it can soon start: other workers may take the rest.
                batch = min(batch, 2 * reg.max_concurrency)
                want = min(want, 2 * reg.max_concurrency - queued(reg.name))
            timer_due = state.requested or now >= state.next_due
            # A backlog is claimed in real batches, not one item per freed slot.
            if not reg.exclusive and state.drain and not timer_due and want < max(1, batch // 2):
                continue
            if want >= 1:
                demands.append((state, want))
        asks = fair_shares(room, [want for _, want in demands])
        return [
            (state.registration, ask) for (state, _), ask in zip(demands, asks, strict=True) if ask
        ]

    def fetch_started(self, name: str, now: float) -> None:
        state = self._states[name]
        state.fetching = True
        state.fetch_started = now
        state.active += 1
        state.requested = False

    def fetch_finished(
        self, name: str, *, asked: int, fetched: int, failed: bool, now: float, isolated: int = 0
    ) -> None:
        state = self._states[name]
        state.fetching = False
        state.hold = isolated > 0 and state.active > 0
        state.drain = not failed and ((asked > 0 and fetched >= asked) or isolated > 0)
        start = now if failed else state.fetch_started
        state.next_due = start + state.poll_interval.total_seconds()

    def activation_finished(self, name: str) -> None:
        state = self._states[name]
        state.active = max(0, state.active - 1)
        if not state.active:
            state.hold = False

    def seconds_until_due(self, now: float) -> float | None:
        """Time until the next timer-due handler (None when none is waiting on a timer).

        Handlers already due that :meth:`plan` did not start are not waiting on the timer but
        on something else (room in the channel, being enabled, their activation finishing), and
        every one of those wakes the coordinator: counting them would make it spin.
        """
        waits = [
            s.next_due - now
            for s in self._states.values()
            if not s.fetching
            and not ((s.registration.exclusive or s.hold) and s.active)
            and s.next_due > now
        ]
        return min(waits) if waits else None

    def busy(self) -> bool:
        """True while any fetch or activation is unfinished."""
        return any(s.fetching or s.active for s in self._states.values())
