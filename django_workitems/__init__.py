"""django_workitems: background work for Django, driven by handlers that fetch their own work.

``import django_workitems as workitems``; register handlers in ``AppConfig.ready()`` with
:func:`add_handler` and run them with ``manage.py runworkitems``.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from .exceptions import Cancelled, ConfigurationError, UnknownHandlerError, WorkItemsError
from .handlers import CancellationToken, Purpose, WorkItem, WorkItemHandler
from .registry import HandlerRegistry, Registration, add_handler, get_handlers, registry

if TYPE_CHECKING:
    from .activation import CycleResult
    from .claims import QuerySetHandler


def __getattr__(name: str) -> object:
    # ``QuerySetHandler`` needs the models, which must not load with the package (settings
    # import it before the app registry is ready).
    if name == "QuerySetHandler":
        from .claims import QuerySetHandler

        return QuerySetHandler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


try:
    __version__ = version("django-workitems")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "CancellationToken",
    "Cancelled",
    "ConfigurationError",
    "HandlerRegistry",
    "Purpose",
    "QuerySetHandler",
    "Registration",
    "UnknownHandlerError",
    "WorkItem",
    "WorkItemHandler",
    "WorkItemsError",
    "__version__",
    "add_handler",
    "get_handlers",
    "notify",
    "registry",
    "run_once",
]


def run_once(
    handlers: Iterable[str] | None = None, purpose: Purpose | str | None = None
) -> CycleResult:
    """Run one full cycle of the selected handlers (all by default), blocking.

    Syncs the ``Handler`` rows from the registry first, records the runs, and returns the
    per-handler fetched / succeeded / failed counts and errors.
    """
    from .background import run_once as _run_once

    return _run_once(handlers, purpose)


def notify(name: str) -> None:
    """Ask running workers to activate handler ``name`` now."""
    from .background import notify as _notify

    _notify(name)
