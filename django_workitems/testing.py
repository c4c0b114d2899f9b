"""Helpers for testing handlers in a project's own unit tests."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .activation import Failure, describe_item
from .exceptions import Cancelled
from .handlers import CancellationToken, WorkItemHandler, call_handler

__all__ = ["Failure", "HandlerResult", "run_handler"]


@dataclass
class HandlerResult:
    """What :func:`run_handler` saw: the fetched items and each item's outcome."""

    items: list[Any] = field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    failures: list[Failure] = field(default_factory=list)
    released: list[Any] = field(default_factory=list)
    """Items given back through ``release()`` after ``cancel`` was set, as the worker does."""


def run_handler(
    handler_or_class: WorkItemHandler[Any]
    | type[WorkItemHandler[Any]]
    | Callable[[], WorkItemHandler[Any]],
    max_items: int = 10,
    *,
    cancel: CancellationToken | None = None,
) -> HandlerResult:
    """Fetch up to ``max_items`` and process each, synchronously in this thread.

    Nothing is recorded and nothing is raised for a failed item: the result lists it.
    ``close()`` is called at the end, as the worker does.
    """
    if isinstance(handler_or_class, WorkItemHandler):
        handler = handler_or_class
    elif inspect.isclass(handler_or_class) or callable(handler_or_class):
        handler = handler_or_class()
    else:
        raise TypeError(
            f"run_handler() needs a handler, a handler class or a factory, got {handler_or_class!r}"
        )
    token = cancel or CancellationToken()
    result = HandlerResult()
    try:
        result.items = list(call_handler(handler.fetch_next, max_items, token) or ())
        for index, item in enumerate(result.items):
            if token.cancelled:  # like a shutdown: what was not started goes back
                result.released.extend(result.items[index:])
                break
            try:
                call_handler(handler.process, item, token)
            except Exception as exc:
                if isinstance(exc, Cancelled) and token.cancelled:
                    result.released.append(item)
                    continue
                result.failed += 1
                result.failures.append(Failure.of(describe_item(item), exc))
            else:
                result.succeeded += 1
        if result.released:
            handler.release(result.released)
    finally:
        handler.close()
    return result
