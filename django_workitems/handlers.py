"""The handler contract: what a developer writes to give the workers something to do."""

from __future__ import annotations

import inspect
import logging
import threading
import time
import traceback
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, models
from django.db.models import Q
from django.db.models.query import QuerySet
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .exceptions import Cancelled

if TYPE_CHECKING:
    from .models import WorkItemModel, WorkItemQuerySet

T = TypeVar("T")
_logger = logging.getLogger("django_workitems.handlers")

current_worker_id: ContextVar[int | None] = ContextVar("workitems_worker_id", default=None)
"""The ``Worker`` row of the process running the current fetch (None outside a worker)."""


class Purpose(models.TextChoices):
    """What a handler is for; used to filter handlers in the admin, GraphQL and the command."""

    INGESTION = "ingestion", _("Ingestion")
    INTERNAL = "internal", _("Internal")
    EXPORT = "export", _("Export")


@runtime_checkable
class WorkItem(Protocol):
    """Any object with an ``id`` (a UUID, an int, a string...)."""

    id: Any


class CancellationToken:
    """Cooperative cancellation, set on shutdown and when a run is cancelled.

    Tokens form a tree: cancelling a token cancels every token created from it with
    :meth:`child`, so one shutdown reaches every activation without a registry of them.
    """

    def __init__(self, parent: CancellationToken | None = None) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._children: weakref.WeakSet[CancellationToken] = weakref.WeakSet()
        if parent is not None:
            parent._adopt(self)

    def _adopt(self, child: CancellationToken) -> None:
        with self._lock:
            self._children.add(child)
            cancelled = self._event.is_set()
        if cancelled:
            child.cancel()

    def child(self) -> CancellationToken:
        """A token that is cancelled with this one, and may be cancelled on its own."""
        return CancellationToken(parent=self)

    @property
    def cancelled(self) -> bool:
        """True once cancellation was requested."""
        return self._event.is_set()

    def cancel(self) -> None:
        """Request cancellation of this token and of all its children."""
        with self._lock:
            self._event.set()
            children = list(self._children)
        for child in children:
            child.cancel()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled("The work was cancelled")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True at once when cancelled, False on time-out."""
        return self._event.wait(max(0.0, seconds))

    def __repr__(self) -> str:
        return f"<CancellationToken cancelled={self.cancelled}>"


class WorkItemHandler(ABC, Generic[T]):
    """Base class of handlers: pull pending work with ``fetch_next``, do one item in ``process``.

    A new instance is created for every activation (one fetch and the processing of what it
    returned), so per-activation state such as an HTTP session may live on ``self``. Items of one
    activation may be processed concurrently by several pool threads.
    Either method may be ``async def``; the framework runs the coroutine to completion.
    """

    exclusive_by_default: ClassVar[bool] = True
    """Default of the ``exclusive`` registration option for this class."""

    @abstractmethod
    def fetch_next(
        self, max_items: int, cancel: CancellationToken
    ) -> Sequence[T] | Awaitable[Sequence[T]]:
        """Return up to ``max_items`` pending work items (an empty sequence when there are none)."""

    @abstractmethod
    def process(self, item: T, cancel: CancellationToken) -> Awaitable[None] | None:
        """Do the work of one item; raise to record it as failed."""

    def close(self) -> None:
        """Called once when the activation ends, after its last item."""

    def backlog(self) -> int | None:
        """How many items are waiting, for the admin and GraphQL; None when unknown."""
        return None

    def oldest_waiting(self) -> datetime | None:
        """When the oldest waiting item was created, so lag shows; None when unknown."""
        return None

    def isolate(self, item: T) -> bool:
        """True to process ``item`` with nothing else in process in this worker.

        For suspects: an item taken back from a worker that died is retried alone, so that if
        it kills this worker too, no innocent item was in process beside it.
        """
        return False

    def release(self, items: Sequence[T]) -> None:
        """Give back items that were fetched but never started (on shutdown).

        Handlers whose ``fetch_next`` only reads need nothing here: the items were never touched.
        Handlers that claim items in ``fetch_next`` undo the claim.
        """


def call_handler(method: Callable[..., Any], *args: Any) -> Any:
    """Call a handler method; if it is ``async def``, run the coroutine to completion.

    ``async_to_sync`` runs thread-sensitive ORM calls back on this thread, so an async handler
    uses the calling pool thread's own connection.
    """
    result = method(*args)
    if inspect.isawaitable(result):
        return async_to_sync(_await)(result)
    return result


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def describe_item(item: object) -> str:
    """The id of an item for logs and failures: ``item.id``, ``item["id"]`` or the item."""
    ident = getattr(item, "id", None)
    if ident is None and isinstance(item, Mapping):
        ident = item.get("id")
    return str(item if ident is None else ident)[:255]


M = TypeVar("M", bound="WorkItemModel")


class QuerySetHandler(WorkItemHandler[M]):
    """A handler over the rows of a ``WorkItemModel``: set ``queryset``, implement ``handle``.

    ``fetch_next`` claims rows atomically (``SELECT ... FOR UPDATE SKIP LOCKED`` where the
    database has it), so any number of workers can run the handler at once: it is not
    exclusive by default. Claims are fenced by a token per claim; outcomes are written only
    where the row still carries it. Rows of a worker that died are taken back one at a time
    and retried alone (see :meth:`isolate`), each time counting as an attempt.
    """

    exclusive_by_default = False
    queryset: ClassVar[QuerySet[Any] | None] = None
    """The rows this handler works on (a queryset of a ``WorkItemModel`` subclass)."""
    max_attempts: ClassVar[int] = 3
    """Attempts (claims) before a row that keeps failing is marked ``failed``."""
    retry_backoff: ClassVar[float] = 10.0
    """Seconds before the first retry; doubled for each attempt after it."""
    success_batch_size: ClassVar[int] = 100
    """Successes are written in batches of up to this many rows (and at least once a second)."""

    _suspects_lock = threading.Lock()
    _suspects: ClassVar[set[str]] = set()  # models for which this process holds a suspect
    _next_sweep: ClassVar[dict[str, float]] = {}  # per model: when to look for dead claims
    _unsettled: ClassVar[list[tuple[type[Any], Q, dict[str, Any], str]]] = []
    """Outcome writes that failed (the database went away); retried before the next claim."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._succeeded: list[tuple[Any, Any]] = []
        self._last_flush = time.monotonic()

    @abstractmethod
    def handle(self, obj: M, cancel: CancellationToken) -> Awaitable[None] | None:
        """Do the work of one row; raise to have it retried (or failed after max_attempts)."""

    def get_queryset(self) -> WorkItemQuerySet[M]:
        """The rows to work on; by default ``queryset``."""
        from .models import WorkItemQuerySet

        if self.queryset is None:
            raise ImproperlyConfigured(
                f"{type(self).__qualname__} must set `queryset` or override get_queryset()."
            )
        qs = self.queryset.all()
        if not isinstance(qs, WorkItemQuerySet):
            qs = WorkItemQuerySet(model=qs.model, query=qs.query.chain(), using=qs.db)
        return qs

    def _model_key(self, qs: QuerySet[Any]) -> str:
        return str(qs.model._meta.label)

    # -- fetching -------------------------------------------------------------------------

    def fetch_next(self, max_items: int, cancel: CancellationToken) -> list[M]:
        from .conf import app_settings

        qs = self.get_queryset()
        self._settle(qs.model)
        worker_id = current_worker_id.get()
        lease_timeout = app_settings.lease_timeout
        key = self._model_key(qs)
        rows: list[M] = []
        # Looking for rows of dead workers costs as much as the claim itself; a death is only
        # seen LEASE_TIMEOUT after the fact anyway, so look a few times per LEASE_TIMEOUT, and
        # at once again after a row was taken back (the next one is probably waiting).
        now = time.monotonic()
        with self._suspects_lock:
            sweep = key not in self._suspects and now >= self._next_sweep.get(key, 0.0)
            if sweep:
                self._suspects.add(key)
        if sweep:
            try:
                rows = self._take_back_one(qs, worker_id, lease_timeout)
            finally:
                with self._suspects_lock:
                    if not rows:
                        self._suspects.discard(key)
                    pause = 0.0 if rows else lease_timeout.total_seconds() / 4
                    self._next_sweep[key] = now + pause
        if max_items > len(rows):
            rows.extend(qs.claim(max_items - len(rows), worker_id=worker_id))
        return rows

    def _take_back_one(
        self, qs: WorkItemQuerySet[M], worker_id: int | None, lease_timeout: timedelta
    ) -> list[M]:
        """Fail rows whose workers died too often; claim one other row of a dead worker."""
        key = self._model_key(qs)
        failed = qs.fail_exhausted_abandoned(lease_timeout, self.max_attempts)
        if failed:
            _logger.error(
                "%s: %d rows failed: their workers died while processing them %d times",
                key,
                failed,
                self.max_attempts,
            )
        rows = qs.claim(1, worker_id=worker_id, reclaim=True, lease_timeout=lease_timeout)
        for row in rows:
            row._workitems_suspect = True  # type: ignore[attr-defined]
            _logger.warning(
                "%s %s: taken back from a worker that died; retrying it alone (attempt %d)",
                key,
                row.pk,
                row.attempts,
            )
        return rows

    def _forget_suspect(self, key: str) -> None:
        with self._suspects_lock:
            self._suspects.discard(key)

    def isolate(self, item: M) -> bool:
        return bool(getattr(item, "_workitems_suspect", False))

    # -- processing -----------------------------------------------------------------------

    def process(self, item: M, cancel: CancellationToken) -> None:
        try:
            call_handler(self.handle, item, cancel)
        except Cancelled:
            # On shutdown the worker releases the row (un-claims it); otherwise it is a failure.
            if not cancel.cancelled:
                self._failed(item, "Cancelled by the handler")
            raise
        except Exception as exc:
            self._failed(
                item, "".join(traceback.format_exception(exc)), retry=self.should_retry(item, exc)
            )
            raise
        else:
            self._done(item)
        finally:
            if self.isolate(item):
                self._forget_suspect(self._model_key(self.get_queryset()))

    def _done(self, item: M) -> None:
        with self._lock:
            self._succeeded.append((item.pk, item.claim_token))
            due = (
                len(self._succeeded) >= self.success_batch_size
                or time.monotonic() - self._last_flush >= 1.0
            )
        if due:
            self._flush()

    def _flush(self) -> None:
        """Mark the buffered successes ``succeeded`` in one UPDATE, fenced by their claims."""
        from .models import WorkItemModel

        with self._lock:
            batch, self._succeeded = self._succeeded, []
            self._last_flush = time.monotonic()
        if not batch:
            return
        pks = [pk for pk, _ in batch]
        tokens = {token for _, token in batch}
        written = self._write(
            Q(pk__in=pks, claim_token__in=tokens, status=WorkItemModel.STATUS.processing),
            {
                "status": WorkItemModel.STATUS.succeeded,
                "last_error": "",
                "modified": timezone.now(),
            },
            f"{len(batch)} successes",
        )
        if written is not None and written < len(batch):
            _logger.warning(
                "%d of %d succeeded rows had been claimed by another worker meanwhile; "
                "their outcome was left to it",
                len(batch) - written,
                len(batch),
            )

    def should_retry(self, obj: M, exc: Exception) -> bool:
        """Whether a row whose ``handle`` raised ``exc`` is tried again (within ``max_attempts``).

        Override to fail rows at once on errors that no retry can mend (a malformed page).
        """
        return True

    def retry_delay(self, attempts: int) -> float:
        """Seconds before a row that failed its ``attempts``-th attempt is available again."""
        return float(self.retry_backoff * 2 ** max(0, attempts - 1))

    def _failed(self, item: M, error: str, *, retry: bool = True) -> None:
        from .models import WorkItemModel

        now = timezone.now()
        if not retry or item.attempts >= self.max_attempts:
            changes: dict[str, Any] = {"status": WorkItemModel.STATUS.failed}
        else:
            delay = self.retry_delay(item.attempts)
            changes = {
                "status": WorkItemModel.STATUS.queued,
                "available_at": now + timedelta(seconds=delay),
                "claimed_by": None,
                "claimed_at": None,
                "claim_token": None,
            }
        written = self._write(
            item.outcome_filter(),
            {"last_error": error[-10_000:], "modified": now, **changes},
            f"the failure of {item.pk}",
        )
        if written == 0:
            _logger.warning("%s: claim lost before its failure could be written", item.pk)

    def _write(self, fence: Q, changes: dict[str, Any], what: str) -> int | None:
        """Write an outcome where ``fence`` holds; None when the database failed (kept for later).

        A row whose outcome cannot be written stays ``processing`` under a live claim, where no
        other worker would take it: so the write is kept and retried before the next claim.
        """
        model = self.get_queryset().model
        try:
            return int(model._base_manager.filter(fence).update(**changes))
        except DatabaseError:
            _logger.warning(
                "%s: could not write %s; will retry", model._meta.label, what, exc_info=True
            )
            with self._suspects_lock:
                self._unsettled.append((model, fence, changes, what))
            return None

    def _settle(self, model: type[Any]) -> None:
        """Retry the outcome writes that failed earlier for ``model``; raise if they still fail."""
        with self._suspects_lock:
            pending = [entry for entry in self._unsettled if entry[0] is model]
            self._unsettled[:] = [entry for entry in self._unsettled if entry[0] is not model]
        for index, (_model, fence, changes, what) in enumerate(pending):
            try:
                model._base_manager.filter(fence).update(**changes)
            except DatabaseError:
                with self._suspects_lock:
                    self._unsettled.extend(pending[index:])
                raise
            _logger.info("%s: wrote %s after the database came back", model._meta.label, what)

    def release(self, items: Sequence[M]) -> None:
        """Un-claim rows never started: back to ``queued``, and the attempt is not counted."""
        from django.db.models import F

        from .models import WorkItemModel

        if not items:
            return
        fence = Q()
        for item in items:
            fence |= item.outcome_filter()
        self._write(
            fence,
            {
                "status": WorkItemModel.STATUS.queued,
                "claimed_by": None,
                "claimed_at": None,
                "claim_token": None,
                "attempts": F("attempts") - 1,
                "modified": timezone.now(),
            },
            f"the release of {len(items)} rows",
        )
        if any(self.isolate(item) for item in items):
            self._forget_suspect(self._model_key(self.get_queryset()))

    def close(self) -> None:
        self._flush()

    # -- reporting ------------------------------------------------------------------------

    def backlog(self) -> int:
        """Queued rows."""
        return self.get_queryset().queued().count()

    def oldest_waiting(self) -> datetime | None:
        """Creation time of the oldest queued row."""
        row = self.get_queryset().queued().order_by("created").values_list("created", flat=True)
        return row.first()
