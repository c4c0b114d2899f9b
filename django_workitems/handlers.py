"""The handler contract: what a developer writes to give the workers something to do."""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from asgiref.sync import async_to_sync
from django.db import models
from django.utils.translation import gettext_lazy as _

from .exceptions import Cancelled

if TYPE_CHECKING:
    pass

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


_links = threading.Lock()
"""Guards every token's cancelled flag, event and children (cancelling and linking are rare)."""


class CancellationToken:
    """Cooperative cancellation, set on shutdown and when a run is cancelled.

    Tokens form a tree: cancelling a token cancels every token created from it with
    :meth:`child`, so one shutdown reaches every activation without a registry of them.
    A token is cheap until it is waited on (one is made per item): ``cancelled`` looks up the
    chain of parents, and only a token that :meth:`wait` sleeps on gets an event and is linked
    into its parents, so that cancelling one of them wakes it.
    """

    __slots__ = ("__weakref__", "_cancelled", "_children", "_event", "_parent")

    def __init__(self, parent: CancellationToken | None = None) -> None:
        self._parent = parent
        self._cancelled = False
        self._event: threading.Event | None = None
        self._children: weakref.WeakSet[CancellationToken] | None = None

    def child(self) -> CancellationToken:
        """A token that is cancelled with this one, and may be cancelled on its own."""
        return CancellationToken(parent=self)

    @property
    def cancelled(self) -> bool:
        """True once cancellation was requested, of this token or of one it was made from."""
        token: CancellationToken | None = self
        while token is not None:
            if token._cancelled:
                return True
            token = token._parent
        return False

    def cancel(self) -> None:
        """Request cancellation of this token and of all its children."""
        with _links:
            self._cancelled = True
            event = self._event
            children = list(self._children) if self._children else []
        if event is not None:
            event.set()
        for child in children:
            child.cancel()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self.cancelled:
            raise Cancelled("The work was cancelled")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True at once when cancelled, False on time-out."""
        if self.cancelled:
            return True
        return self._waitable().wait(max(0.0, seconds))

    def _waitable(self) -> threading.Event:
        """This token's event, linked into its parents so that their cancel sets it."""
        with _links:
            event = self._event
            if event is None:
                event = self._event = threading.Event()
                child, parent = self, self._parent
                while parent is not None:
                    if parent._children is None:
                        parent._children = weakref.WeakSet()
                    elif child in parent._children:
                        break  # linked already, and so are its parents
                    parent._children.add(child)
                    child, parent = parent, parent._parent
        if self.cancelled:  # cancelled before the link: nobody will set it
            event.set()
        return event

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

    def urgent(self, item: T) -> bool:
        """True to process ``item`` before this handler's items queued earlier in this worker.

        For work that already waited elsewhere: rows taken back from a worker that died.
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
    if result is None:  # the common case of ``process``: no awaitable to look for
        return None
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
