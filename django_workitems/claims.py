"""Database-backed work items: ``QuerySetHandler`` and the claim state of one process.

``QuerySetHandler.fetch_next`` claims rows of a ``WorkItemModel`` atomically; outcomes are
written only where the row still carries the claim's token. Everything that decides a claim
(availability, back-off, whether a claimer died) is computed on the database's clock.

The per-process state of those claims lives in one :class:`ClaimBook`, owned by the processing
service, which hands it to each ``QuerySetHandler`` it creates (``handler.claims``); code outside
a worker (``run_handler``, a test) shares a book of its own. A book holds:

- the suspects: rows taken back from a dead worker and in process alone here;
- when to look for dead workers' rows next, per model;
- writes the database did not confirm: outcomes kept (bounded) to be written when it answers
  again, and claims whose reply was lost, undone by their token without counting an attempt.
  The lease keeper settles them on every heartbeat, so they do not wait for the next fetch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import traceback
import uuid
import weakref
from abc import abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections, router
from django.db.models import F, Q
from django.db.models.query import QuerySet

from .conf import app_settings
from .exceptions import Cancelled
from .handlers import CancellationToken, WorkItemHandler, call_handler, current_worker_id
from .log import plural
from .models import (
    ClaimStatement,
    WorkItemModel,
    WorkItemQuerySet,
    db_now,
    db_now_plus,
    mark_succeeded,
)

logger = logging.getLogger("django_workitems.claims")

M = TypeVar("M", bound=WorkItemModel)

MAX_UNSETTLED = 10_000
"""Outcome writes kept while the database does not answer; beyond that the oldest are dropped
(their rows stay ``processing`` under this worker and are taken back once it stops)."""


@dataclass
class _Write:
    model: type[WorkItemModel]
    fence: Q
    changes: dict[str, Any]
    what: str


class ClaimBook:
    """The claim state of one process (see the module docstring); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._suspects: dict[str, uuid.UUID | None] = {}  # model label -> suspect's token
        self._next_sweep: dict[str, float] = {}
        self._unsettled: deque[_Write] = deque(maxlen=MAX_UNSETTLED)
        self._lost_claims: list[tuple[type[WorkItemModel], uuid.UUID]] = []

    # -- suspects ---------------------------------------------------------------------------

    def start_sweep(self, key: str, now: float) -> bool:
        """True when this fetch should look for dead workers' rows of ``key`` (and it may)."""
        with self._lock:
            if key in self._suspects or now < self._next_sweep.get(key, 0.0):
                return False
            self._suspects[key] = None
            return True

    def end_sweep(self, key: str, token: uuid.UUID | None, now: float, pause: float) -> None:
        """A sweep ended: with a suspect taken back (its claim ``token``) or none; the next
        sweep may start after ``pause`` seconds (at once while a suspect is out)."""
        with self._lock:
            if token is None:
                self._suspects.pop(key, None)
                self._next_sweep[key] = now + pause
            else:
                self._suspects[key] = token
                self._next_sweep[key] = now

    def forget_suspect(self, key: str, token: uuid.UUID | None) -> None:
        with self._lock:
            if key in self._suspects and self._suspects[key] in (token, None):
                del self._suspects[key]

    # -- writes the database did not confirm ----------------------------------------------

    def keep(self, write: _Write) -> None:
        with self._lock:
            if len(self._unsettled) == self._unsettled.maxlen:
                logger.error(
                    "%d outcome writes are waiting for the database; dropping the oldest (%s)",
                    MAX_UNSETTLED,
                    self._unsettled[0].what,
                )
            self._unsettled.append(write)

    def claim_lost(self, model: type[WorkItemModel], token: uuid.UUID) -> None:
        """A claim statement failed: it may have committed; undo it by its token later."""
        with self._lock:
            self._lost_claims.append((model, token))

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._unsettled) + len(self._lost_claims)

    def settle(self, model: type[WorkItemModel] | None = None) -> None:
        """Write what the database did not confirm (for ``model``, or all); raise if it fails.

        Lost claims are undone first: rows still ``processing`` under such a token go back to
        ``queued`` with the attempt not counted (nobody ever started them). The entries are
        taken out under the lock, so two threads settling at once never write one twice;
        what could not be written goes back for the next attempt.
        """

        def mine(entry_model: type[WorkItemModel]) -> bool:
            return model is None or entry_model is model

        with self._lock:
            claims = [c for c in self._lost_claims if mine(c[0])]
            self._lost_claims = [c for c in self._lost_claims if not mine(c[0])]
            writes = [w for w in self._unsettled if mine(w.model)]
            for write in writes:
                self._unsettled.remove(write)
        try:
            while claims:
                claim_model, token = claims[0]
                undone = claim_model._base_manager.filter(
                    claim_token=token, status=WorkItemModel.STATUS.processing
                ).update(**_unclaimed())
                claims.pop(0)
                if undone:
                    logger.warning(
                        "%s: %s of a claim whose reply was lost put back in the queue",
                        claim_model._meta.label,
                        plural(undone, "row"),
                    )
            while writes:
                write = writes[0]
                write.model._base_manager.filter(write.fence).update(**write.changes)
                writes.pop(0)
                logger.info(
                    "%s: wrote %s after the database came back",
                    write.model._meta.label,
                    write.what,
                )
        finally:
            if claims or writes:
                with self._lock:
                    self._lost_claims[:0] = claims
                    self._unsettled.extendleft(reversed(writes))


def _unclaimed() -> dict[str, Any]:
    """The changes that put a claimed row back in the queue, its attempt not counted."""
    return {
        "status": WorkItemModel.STATUS.queued,
        "claimed_by": None,
        "claimed_at": None,
        "claim_token": None,
        "attempts": F("attempts") - 1,
        "modified": db_now(),
    }


_local_book = ClaimBook()


_statements: weakref.WeakKeyDictionary[QuerySet[Any], dict[tuple[Any, ...], ClaimStatement[Any]]]
_statements = weakref.WeakKeyDictionary()
_statements_lock = threading.Lock()
"""Compiled claims by handler ``queryset`` (a class attribute, compiled once per process:
every activation makes a new handler), then by database, worker and kind of claim."""


def claim_book() -> ClaimBook:
    """The book of claims made outside a processing service (which hands out its own)."""
    return _local_book


def reset_local_book() -> None:
    """Forget the state of claims made outside a worker (for tests)."""
    global _local_book
    _local_book = ClaimBook()


RELEASE_CHUNK = 500
"""Rows per release statement: SQLite refuses expressions of more than 1,000 terms."""


class QuerySetHandler(WorkItemHandler[M]):
    """A handler over the rows of a ``WorkItemModel``: set ``queryset``, implement ``handle``.

    ``fetch_next`` claims rows atomically (``SELECT ... FOR UPDATE SKIP LOCKED`` where the
    database has it), so any number of workers can run the handler at once: it is not
    exclusive by default. Claims are fenced by a token per claim; outcomes are written only
    where the row still carries it. Rows of a worker that died are taken back one at a time
    and retried alone (see :meth:`isolate`), each time counting as an attempt; a worker never
    takes back its own rows.
    """

    exclusive_by_default = False
    queryset: QuerySet[Any] | None = None
    """The rows this handler works on (a queryset of a ``WorkItemModel`` subclass)."""
    max_attempts: int = 3
    """Attempts (claims) before a row that keeps failing is marked ``failed``."""
    retry_backoff: float = 10.0
    """Seconds before the first retry; doubled for each attempt after it."""
    success_batch_size: int = 100
    """Successes are written in batches of up to this many rows (and at least once a second)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._succeeded: list[tuple[Any, Any]] = []
        self._last_flush = time.monotonic()
        self._suspect_tokens: set[uuid.UUID | None] = set()
        self._taken_back: set[uuid.UUID | None] = set()
        """Claims of rows taken back from dead workers (processed before rows queued here)."""
        self.claims = claim_book()
        """This process's claim state: the processing service sets its own on each activation."""

    @abstractmethod
    def handle(self, obj: M, cancel: CancellationToken) -> Awaitable[None] | None:
        """Do the work of one row; raise to have it retried (or failed after max_attempts)."""

    def get_queryset(self) -> WorkItemQuerySet[M]:
        """The rows to work on; by default ``queryset``."""
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
        qs = self.get_queryset()
        self.claims.settle(qs.model)
        worker_id = current_worker_id.get()
        lease_timeout = app_settings.lease_timeout
        key = self._model_key(qs)
        rows: list[M] = []
        # Looking for rows of dead workers costs as much as the claim itself; a death is only
        # seen LEASE_TIMEOUT after the fact anyway, so look a few times per LEASE_TIMEOUT, and
        # at once again after a row was taken back (the next one is probably waiting).
        now = time.monotonic()
        if self.claims.start_sweep(key, now):
            suspect: uuid.UUID | None = None
            pause = lease_timeout.total_seconds() / 4
            try:
                rows = self._take_back(qs, max_items, worker_id, lease_timeout)
                if rows:
                    pause = 0.0  # more may be waiting: look again at the next fetch
                    if rows[0].claim_token in self._suspect_tokens:
                        suspect = rows[0].claim_token
            finally:
                self.claims.end_sweep(key, suspect, now, pause)
        if max_items > len(rows):
            try:
                rows.extend(self._claim(qs, max_items - len(rows), worker_id))
            except DatabaseError:
                if not rows:
                    raise
                # The rows taken back are ours now: process them rather than orphan them.
                logger.warning("%s: claim failed after rows were taken back", key, exc_info=True)
        return rows

    def _claim(
        self, qs: WorkItemQuerySet[M], max_items: int, worker_id: int | None, **kw: Any
    ) -> list[M]:
        token = uuid.uuid4()
        try:
            statement = self._statement(qs, worker_id, **kw)
            if statement is not None:
                return statement.run(max_items, worker_id=worker_id, token=token)
            return qs.claim(max_items, worker_id=worker_id, token=token, **kw)
        except DatabaseError:
            # The commit may have happened with its reply lost: those rows would sit
            # ``processing`` under this live worker, where nobody takes them. Undo by token.
            self.claims.claim_lost(qs.model, token)
            raise

    def _statement(
        self, qs: WorkItemQuerySet[M], worker_id: int | None, **kw: Any
    ) -> ClaimStatement[M] | None:
        """The claim's compiled statement, kept as long as the ``queryset`` it came from.

        None where a statement cannot be kept: not PostgreSQL, or ``get_queryset`` overridden
        (its queryset may differ from one fetch to the next).
        """
        if (
            type(self).get_queryset is not QuerySetHandler.get_queryset
            or connections[qs.db].vendor != "postgresql"
        ):
            return None
        if self.queryset is None:
            return None
        key = (qs.db, worker_id, *sorted(kw.items()))
        with _statements_lock:
            statement = _statements.setdefault(self.queryset, {}).get(key)
        if statement is None:
            statement = ClaimStatement(qs.claim_candidates(worker_id=worker_id, **kw))
            with _statements_lock:
                statement = _statements.setdefault(self.queryset, {}).setdefault(key, statement)
        return statement

    def _take_back(
        self,
        qs: WorkItemQuerySet[M],
        max_items: int,
        worker_id: int | None,
        lease_timeout: timedelta,
    ) -> list[M]:
        """Fail rows whose workers died too often; claim other rows of dead workers.

        A row that could die with its worker once more and still have an attempt left is taken
        back in a batch, and processed normally: a worker's death is not the fault of every row
        it held. A row on its last attempt is taken back alone and runs alone (a suspect), so
        if it kills this worker too it is failed without taking any innocent row with it.
        """
        key = self._model_key(qs)
        failed = qs.fail_exhausted_abandoned(lease_timeout, self.max_attempts, worker_id=worker_id)
        if failed:
            logger.error(
                "%s: %s failed: their workers died while processing them %s",
                key,
                plural(failed, "row"),
                plural(self.max_attempts, "time"),
            )
        # After the claim's increment, a batch row has at most max_attempts - 1 attempts.
        last = self.max_attempts - 1
        rows = self._claim(
            qs,
            max_items,
            worker_id,
            reclaim=True,
            lease_timeout=lease_timeout,
            where=Q(attempts__lt=last),
        )
        if rows:
            self._taken_back.add(rows[0].claim_token)
            logger.warning(
                "%s: %s taken back from workers that died; processing them normally",
                key,
                plural(len(rows), "row"),
            )
            return rows
        rows = self._claim(qs, 1, worker_id, reclaim=True, lease_timeout=lease_timeout)
        for row in rows:
            self._suspect_tokens.add(row.claim_token)
            logger.warning(
                "%s %s: taken back from a worker that died; retrying it alone (attempt %d)",
                key,
                row.pk,
                row.attempts,
            )
        return rows

    def isolate(self, item: M) -> bool:
        return item.claim_token in self._suspect_tokens

    def urgent(self, item: M) -> bool:
        return item.claim_token in self._taken_back

    def given_up(self, item: M) -> None:
        """The engine gave up on ``item`` (hung past its timeout): its row stays claimed by
        this live worker (nobody takes it back while it heartbeats), but as a suspect it no
        longer keeps this worker from taking back other dead workers' rows."""
        self._forget(item)

    def _forget(self, item: M) -> None:
        if item.claim_token in self._suspect_tokens:
            self._suspect_tokens.discard(item.claim_token)
            self.claims.forget_suspect(self._model_key(self.get_queryset()), item.claim_token)

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
            self._forget(item)

    async def process_async(self, item: M, cancel: CancellationToken) -> None:
        """:meth:`process` for an ``async def handle``, on the worker's event loop.

        The outcome is written through ``sync_to_async``; an item cancelled for hanging past
        its ``item_timeout`` (or the shutdown timeout) is recorded failed and retried.
        """
        try:
            await self.handle(item, cancel)  # type: ignore[misc]
        except Cancelled:
            if not cancel.cancelled:
                await sync_to_async(self._failed)(item, "Cancelled by the handler")
            raise
        except asyncio.CancelledError:
            await sync_to_async(self._failed)(item, "Cancelled: it did not finish in time")
            raise
        except Exception as exc:
            error = "".join(traceback.format_exception(exc))
            await sync_to_async(self._failed)(item, error, retry=self.should_retry(item, exc))
            raise
        else:
            await sync_to_async(self._done)(item)
        finally:
            self._forget(item)

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
        with self._lock:
            batch, self._succeeded = self._succeeded, []
            self._last_flush = time.monotonic()
        if not batch:
            return
        model = self.get_queryset().model
        using = router.db_for_write(model)
        for chunk in _by_token(batch):
            pks, token = [pk for pk, _ in chunk], chunk[0][1]
            written = self._write(
                Q(pk__in=pks, claim_token=token, status=WorkItemModel.STATUS.processing),
                {"status": WorkItemModel.STATUS.succeeded, "last_error": "", "modified": db_now()},
                plural(len(pks), "success", "successes"),
                # On PostgreSQL the same UPDATE with the keys as one array: no compiling and
                # binding of every key (a retry later goes the ORM's way, with the same fence).
                first_try=(
                    functools.partial(mark_succeeded, model, pks, token, using=using)
                    if connections[using].vendor == "postgresql"
                    else None
                ),
            )
            if written is not None and written < len(pks):
                logger.warning(
                    "%d of %s had been claimed by another worker meanwhile; "
                    "their outcome was left to it",
                    len(pks) - written,
                    plural(len(pks), "succeeded row"),
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
        if not retry or item.attempts >= self.max_attempts:
            changes: dict[str, Any] = {"status": WorkItemModel.STATUS.failed}
        else:
            delay = timedelta(seconds=min(self.retry_delay(item.attempts), 366 * 86400.0))
            changes = {
                "status": WorkItemModel.STATUS.queued,
                "available_at": db_now_plus(delay),  # back-off on the database's clock
                "claimed_by": None,
                "claimed_at": None,
                "claim_token": None,
            }
        written = self._write(
            item.outcome_filter(),
            {"last_error": error[-10_000:], "modified": db_now(), **changes},
            f"the failure of {item.pk}",
        )
        if written == 0:
            logger.warning("%s: claim lost before its failure could be written", item.pk)

    def _write(
        self,
        fence: Q,
        changes: dict[str, Any],
        what: str,
        *,
        first_try: Callable[[], int] | None = None,
    ) -> int | None:
        """Write an outcome where ``fence`` holds; None when the database failed (kept for later).

        ``first_try``: an equivalent write to make instead of the ORM's ``update`` (a kept write
        is retried through the ORM). A row whose outcome cannot be written stays ``processing``
        under a live claim, where no other worker would take it: so the write is kept and
        retried on the next heartbeat.
        """
        model = self.get_queryset().model
        try:
            if first_try is not None:
                return first_try()
            return int(model._base_manager.filter(fence).update(**changes))
        except DatabaseError:
            logger.warning(
                "%s: could not write %s; will retry", model._meta.label, what, exc_info=True
            )
            self.claims.keep(_Write(model, fence, changes, what))
            return None

    def release(self, items: Sequence[M]) -> None:
        """Un-claim rows never started: back to ``queued``, and the attempt is not counted."""
        if not items:
            return
        for chunk in _by_token([(item.pk, item.claim_token) for item in items]):
            token = chunk[0][1]
            self._write(
                Q(
                    pk__in=[pk for pk, _ in chunk],
                    claim_token=token,
                    status=WorkItemModel.STATUS.processing,
                ),
                _unclaimed(),
                f"the release of {plural(len(chunk), 'row')}",
            )
        for item in items:
            self._forget(item)

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


def _by_token(pairs: list[tuple[Any, Any]]) -> list[list[tuple[Any, Any]]]:
    """(pk, token) pairs grouped by token, in chunks of at most :data:`RELEASE_CHUNK`."""
    groups: dict[Any, list[tuple[Any, Any]]] = {}
    for pair in pairs:
        groups.setdefault(pair[1], []).append(pair)
    return [
        group[i : i + RELEASE_CHUNK]
        for group in groups.values()
        for i in range(0, len(group), RELEASE_CHUNK)
    ]
