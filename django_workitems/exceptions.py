"""Exceptions raised by django_workitems."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


class WorkItemsError(Exception):
    """Base class of every error this app raises on purpose."""


class Cancelled(WorkItemsError):
    """Raised by ``CancellationToken.raise_if_cancelled()`` once the token is set."""


class ConfigurationError(WorkItemsError, ImproperlyConfigured):
    """A bad setting or a bad handler registration."""


class UnknownHandlerError(WorkItemsError, LookupError):
    """A handler name that no registration (or no ``Handler`` row) has."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.name = name
        message = f"Unknown work item handler {name!r}"
        if known is not None:
            message += f"; registered handlers: {', '.join(known) or '(none)'}"
        super().__init__(message)
