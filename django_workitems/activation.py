"""An activation: one handler instance, its fetches, its items and their outcomes.

The :class:`Activation` is the one owner of its counts: the fetch thread adds what a fetch
returned, pool threads add each item's outcome, and everyone else (the coordinator, the run
recorder) reads them from here. It is finished exactly once, by whichever thread sees that no
fetch is in flight, no more will be made and no item is outstanding.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from .handlers import CancellationToken, WorkItemHandler
from .status import RunStatus

if TYPE_CHECKING:
    from .leases import Lease
    from .registry import Registration

MAX_ID = 255


class ItemOutcome(enum.Enum):
    """How one fetched item ended: every item ends exactly one of these ways."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RELEASED = "released"
    """Given back to its source never started (shutdown, a lost lease, a hung neighbour)."""


class Step(enum.Enum):
    """What the caller of :meth:`Activation.item_ended` or :meth:`Activation.stop_fetching`
    must do next."""

    NONE = "none"
    IDLE = "idle"
    """No item outstanding, but the activation may fetch again: tell the coordinator."""
    FINISH = "finish"
    """Nothing outstanding and no fetch to come: this caller finishes the activation."""


def safe_str(value: object) -> str:
    """``str(value)``, or a stand-in when its ``__str__`` raises."""
    try:
        return str(value)
    except Exception as exc:
        return f"<{type(value).__qualname__} whose str() raised {type(exc).__qualname__}>"


def describe_item(item: object) -> str:
    """The id of an item for logs and failures: ``item.id``, ``item["id"]`` or the item.

    Never raises: an item whose ``id`` or ``__str__`` raises is described by its type.
    """
    try:
        ident = getattr(item, "id", None)
        if ident is None and isinstance(item, Mapping):
            ident = item.get("id")
        return safe_str(item if ident is None else ident)[:MAX_ID]
    except Exception as exc:
        return f"<{type(item).__qualname__} whose id raised {type(exc).__qualname__}>"[:MAX_ID]


def format_exception(exc: BaseException) -> str:
    """The traceback of ``exc`` as text; never raises."""
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return f"{type(exc).__qualname__}: {safe_str(exc)}"


@dataclass(frozen=True)
class Failure:
    """One failed item: in run results, in ``ItemFailure`` rows and in ``run_handler``."""

    item_id: str
    error_type: str
    message: str
    traceback: str
    occurred_at: datetime
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, item_id: str, exc: BaseException, tb: str | None = None) -> Failure:
        return cls(
            item_id=item_id,
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            message=safe_str(exc),
            traceback=tb if tb is not None else format_exception(exc),
            occurred_at=timezone.now(),
            exception=exc,
        )


@dataclass
class ActivationResult:
    """What one activation of a handler did, as ``run_once`` reports it."""

    handler: str
    status: RunStatus | None = None
    """None when it was no run: skipped, or its fetch found nothing."""
    run_id: int | None = None
    fetched: int = 0
    succeeded: int = 0
    failed: int = 0
    released: int = 0
    error: str = ""
    skipped: str = ""
    failures: list[Failure] = field(default_factory=list)

    @property
    def fetch_failed(self) -> bool:
        return self.status == RunStatus.FAILED

    @property
    def cancelled(self) -> int:
        """Items released never started (the older name of ``released``)."""
        return self.released


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


@dataclass(frozen=True)
class RunSnapshot:
    """An activation's counts at one moment, as the run recorder writes them."""

    fetched: int
    succeeded: int
    failed: int
    failures: tuple[Failure, ...]
    status: RunStatus | None
    """Set once the activation has finished: the run's final status."""
    error: str


_serials = itertools.count(1)


class Activation:
    """One activation of a handler: a fresh instance, its fetches and their items."""

    def __init__(
        self,
        registration: Registration,
        *,
        handler_id: int,
        token: CancellationToken,
        allowance: int | None = None,
    ) -> None:
        self.serial = next(_serials)
        self.registration = registration
        self.name = registration.name
        self.handler_id = handler_id
        self.token = token
        self.allowance = allowance if allowance is not None else registration.max_items_per_cycle
        """Items this activation may still fetch."""
        self.handler: WorkItemHandler[Any] | None = None
        self.is_async = False
        self.lease: Lease | None = None
        self.item_timeout: float | None = None
        """Seconds one ``process`` call may take (None: no limit)."""
        self.fetch_timeout: float | None = None
        """Seconds one ``fetch_next`` call may take (None: no limit)."""
        self.fetch_hung = False
        """A fetch was given up: the instance may still be busy in it, so it is not closed."""
        self.run_id: int | None = None
        self.started = time.monotonic()
        self.started_at = timezone.now()
        self.finished = threading.Event()
        """Set once the activation has ended (its run may still be being written)."""
        self.fetch_started = 0.0
        self.asked = 0
        self.last_fetch_full = False
        self.hold = False
        """An item to be processed alone came back: no fetch until every item has ended."""
        self._lock = threading.Lock()
        self._fetching = False
        self._no_more_fetches = False
        self._finishing = False
        self._fetched = 0
        self._succeeded = 0
        self._failed = 0
        self._released = 0
        self._failures: list[Failure] = []
        self._status: RunStatus | None = None
        self._fetch_failed = False
        self._cancelled = False
        self._error = ""
        self.skipped = ""

    def __repr__(self) -> str:
        return f"<Activation #{self.serial} of {self.name}>"

    def log_extra(self, item_id: str | None = None) -> dict[str, object]:
        extra: dict[str, object] = {"handler": self.name}
        if self.run_id is not None:
            extra["run_id"] = self.run_id
        if item_id is not None:
            extra["work_item_id"] = item_id
        return extra

    # -- fetches (the coordinator starts them, a fetch thread ends them) ---------------------

    def begin_fetch(self, ask: int) -> None:
        with self._lock:
            self._fetching = True
            self.asked = ask
            self.fetch_started = time.monotonic()

    def fetch_returned(self, count: int, *, isolated: bool = False) -> Step:
        """A fetch handed ``count`` items over (they are outstanding until each ends).

        A fetch that returned fewer items than asked ends the activation's fetching: its
        source has nothing more for now.
        """
        with self._lock:
            self._fetching = False
            self._fetched += count
            self.allowance -= count
            self.last_fetch_full = count >= self.asked > 0
            if not self.last_fetch_full:
                self._no_more_fetches = True
            self.hold = self.hold or isolated
            return self._next_step()

    def fetch_failed(self, error: str) -> Step:
        """The fetch raised, timed out or could not hand its items over: no more fetches."""
        with self._lock:
            self._fetching = False
            self._fetch_failed = True
            self._no_more_fetches = True
            self._error = f"{self._error}\n{error}" if self._error else error
            return self._next_step()

    def fetch_skipped(self, reason: str) -> Step:
        """The fetch did not run (its lease is held elsewhere, shutdown): no more fetches."""
        with self._lock:
            self._fetching = False
            self._no_more_fetches = True
            self.last_fetch_full = False
            if not self._fetched:
                self.skipped = reason
            return self._next_step()

    @property
    def fetching(self) -> bool:
        return self._fetching

    @property
    def may_fetch(self) -> bool:
        """True while another fetch may be made (the coordinator decides whether to)."""
        return not self._no_more_fetches and not self._fetching and self.allowance > 0

    # -- items (pool threads) -----------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Items fetched that have not ended yet (queued or in process)."""
        return self._fetched - self._succeeded - self._failed - self._released

    def item_ended(self, outcome: ItemOutcome, failure: Failure | None = None) -> Step:
        """Count one item's outcome; says whether the caller must finish the activation."""
        with self._lock:
            if outcome is ItemOutcome.SUCCEEDED:
                self._succeeded += 1
            elif outcome is ItemOutcome.FAILED:
                self._failed += 1
                if failure is not None:
                    self._failures.append(failure)
            else:
                self._released += 1
            return self._next_step()

    def items_released(self, count: int) -> Step:
        with self._lock:
            self._released += count
            return self._next_step()

    def _next_step(self) -> Step:
        if self.outstanding > 0 or self._fetching or self._finishing:
            return Step.NONE
        if self._no_more_fetches or self.allowance <= 0:
            self._finishing = True
            return Step.FINISH
        return Step.IDLE

    def stop_fetching(self, *, cancelled: bool = False) -> Step:
        """No more fetches for this activation; FINISH when nothing is outstanding either."""
        with self._lock:
            self._no_more_fetches = True
            self._cancelled = self._cancelled or cancelled
            return self._next_step()

    def force_finish(self, reason: str) -> bool:
        """Shutdown past its timeout: count what is still outstanding as failed, finish now.

        Returns False when another thread is already finishing it.
        """
        with self._lock:
            if self._finishing:
                return False
            self._finishing = True
            self._no_more_fetches = True
            self._cancelled = True
            left = self.outstanding
            if left > 0:
                self._failed += left
                self._error = f"{self._error}\n{reason}" if self._error else reason
            return True

    # -- the end ------------------------------------------------------------------------

    def conclude(self) -> RunStatus:
        """Fix the run's final status (once the activation is finishing)."""
        with self._lock:
            if self._fetch_failed:
                self._status = RunStatus.FAILED
            elif self._cancelled:
                self._status = RunStatus.CANCELLED
            elif self._failed:
                self._status = RunStatus.PARTIAL
            else:
                self._status = RunStatus.SUCCEEDED
            return self._status

    def add_error(self, message: str) -> None:
        with self._lock:
            self._error = f"{self._error}\n{message}" if self._error else message

    @property
    def drained(self) -> bool:
        """It used its whole allowance with full batches: its source may hold more at once."""
        return (self.last_fetch_full and self.allowance <= 0) or self.hold

    @property
    def is_run(self) -> bool:
        """An activation that fetched nothing (and did not fail) is no run."""
        return self._fetched > 0 or self._fetch_failed

    @property
    def fetched(self) -> int:
        return self._fetched

    def snapshot(self, *, failures_from: int = 0) -> RunSnapshot:
        with self._lock:
            return RunSnapshot(
                fetched=self._fetched,
                succeeded=self._succeeded,
                failed=self._failed,
                failures=tuple(self._failures[failures_from:]),
                status=self._status,
                error=self._error,
            )

    def result(self) -> ActivationResult:
        with self._lock:
            return ActivationResult(
                handler=self.name,
                status=self._status if self.is_run else None,
                run_id=self.run_id,
                fetched=self._fetched,
                succeeded=self._succeeded,
                failed=self._failed,
                released=self._released,
                error=self._error,
                skipped=self.skipped,
                failures=list(self._failures),
            )
