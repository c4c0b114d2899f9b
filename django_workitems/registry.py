"""The registry of handlers, filled in ``AppConfig.ready()`` through :func:`add_handler`."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Self

from .conf import MIN_POLL_INTERVAL, app_settings, max_wait, parse_duration
from .exceptions import ConfigurationError, UnknownHandlerError
from .handlers import Purpose, WorkItemHandler
from .schedules import SCHEDULE_MAX_LENGTH, CronSchedule, ScheduleError

logger = logging.getLogger("django_workitems.registry")

MAX_STORED_INT = 2**31 - 1
"""The largest ``max_items_per_cycle`` the ``Handler`` table stores (an integer column)."""

HANDLER_CLASS_MAX_LENGTH = 255
"""The longest dotted path of a handler class the ``Handler`` table stores."""

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,100}")  # used with fullmatch: no "\n" past $

HandlerFactory = Callable[[], WorkItemHandler[Any]]


@dataclass(frozen=True)
class Registration:
    """A registered handler and its options."""

    name: str
    factory: HandlerFactory
    max_items_per_cycle: int
    purpose: Purpose
    exclusive: bool
    poll_interval: timedelta | None
    max_concurrency: int | None
    item_timeout: timedelta | None = None
    """How long one ``process`` call may take; None: the ``ITEM_TIMEOUT`` setting."""
    fetch_timeout: timedelta | None = None
    """How long one ``fetch_next`` call may take; None: the ``FETCH_TIMEOUT`` setting."""
    schedule: str | None = None
    """A cron expression: the handler is due once per slot instead of every poll interval."""
    schedule_catch_up: timedelta | None = None
    """How old a missed slot may be and still run at start; None: one slot period."""

    @property
    def handler_class(self) -> str:
        """Dotted path of the handler class or factory, as stored on the ``Handler`` row."""
        return _dotted_path(self.factory)

    def effective_poll_interval(self) -> timedelta:
        """The handler's own poll interval, or the global ``POLL_INTERVAL``."""
        return self.poll_interval if self.poll_interval is not None else app_settings.poll_interval

    def effective_item_timeout(self) -> timedelta | None:
        """The handler's own ``item_timeout``, or ``ITEM_TIMEOUT`` (None: never)."""
        return self.item_timeout if self.item_timeout is not None else app_settings.item_timeout

    def effective_fetch_timeout(self) -> timedelta | None:
        """The handler's own ``fetch_timeout``, or ``FETCH_TIMEOUT`` (None: never)."""
        if self.fetch_timeout is not None:
            return self.fetch_timeout
        return app_settings.fetch_timeout

    def cron(self) -> CronSchedule | None:
        """The parsed ``schedule`` (None for an interval handler)."""
        return CronSchedule(self.schedule) if self.schedule is not None else None

    def catch_up(self, slot: datetime) -> timedelta:
        """How old a missed ``slot`` may be and still run: ``schedule_catch_up`` or a period."""
        if self.schedule_catch_up is not None:
            return self.schedule_catch_up
        cron = self.cron()
        return cron.period(slot) if cron is not None else timedelta(0)

    def create_handler(self) -> WorkItemHandler[Any]:
        """A fresh handler instance for one activation."""
        handler = self.factory()
        _check_handler_api(self.name, type(handler), f"the factory {self.handler_class} returned")
        return handler

    @contextlib.contextmanager
    def instance(self) -> Iterator[WorkItemHandler[Any]]:
        """A fresh handler for a one-off call (its backlog, its metrics), closed afterwards.

        An error of ``close()`` is logged, never raised over what the caller did.
        """
        handler = self.create_handler()
        try:
            yield handler
        finally:
            try:
                handler.close()
            except Exception:
                logger.exception(
                    "Handler %s: close() raised", self.name, extra={"handler": self.name}
                )


def _dotted_path(factory: object) -> str:
    """``module.qualname`` of a class or function; partials and callable objects included."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    target = factory if hasattr(factory, "__qualname__") else type(factory)
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', type(target).__name__)}"


def _implements(cls: type, method: str) -> bool:
    """True when ``cls`` has ``method`` as a callable that is not left abstract."""
    return callable(getattr(cls, method, None)) and method not in getattr(
        cls, "__abstractmethods__", ()
    )


def _check_handler_api(name: str, cls: type, what: str) -> None:
    missing = [m for m in ("fetch_next", "process") if not _implements(cls, m)]
    if not missing:
        return
    if "fetch_next" in missing and _implements(cls, "fetch_work_items"):
        raise ConfigurationError(
            f"Handler {name!r}: {what} {cls.__qualname__} defines fetch_work_items(), which was "
            "renamed to fetch_next(max_items, cancel); rename the method."
        )
    raise ConfigurationError(
        f"Handler {name!r}: {what} {cls.__qualname__} does not implement "
        f"{' / '.join(missing)}; "
        "handlers implement fetch_next(max_items, cancel) and process(item, cancel) "
        "(subclass django_workitems.WorkItemHandler)."
    )


def _check_no_arguments(name: str, handler: Any) -> None:
    """A handler class or factory is called with no arguments for each activation."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # some builtins and C types have no signature: trust them
        return
    try:
        signature.bind()
    except TypeError as exc:
        raise ConfigurationError(
            f"Handler {name!r}: {_dotted_path(handler)} must be callable with no arguments "
            f"(it is called once per activation): {exc}."
        ) from None


class HandlerRegistry:
    """Registered handlers by name. ``django_workitems.registry`` is the default instance."""

    def __init__(self) -> None:
        self._registrations: dict[str, Registration] = {}
        self._lock = threading.Lock()

    def add_handler(
        self,
        handler: type[WorkItemHandler[Any]] | HandlerFactory,
        *,
        name: str,
        max_items_per_cycle: int = 10,
        purpose: Purpose | str = Purpose.INTERNAL,
        exclusive: bool | None = None,
        poll_interval: timedelta | str | float | None = None,
        max_concurrency: int | None = None,
        item_timeout: timedelta | str | float | None = None,
        fetch_timeout: timedelta | str | float | None = None,
        schedule: str | None = None,
        schedule_catch_up: timedelta | str | float | None = None,
    ) -> Self:
        """Register a handler class (or zero-argument factory); returns the registry to chain."""
        registration = self._validate(
            handler,
            name=name,
            max_items_per_cycle=max_items_per_cycle,
            purpose=purpose,
            exclusive=exclusive,
            poll_interval=poll_interval,
            max_concurrency=max_concurrency,
            item_timeout=item_timeout,
            fetch_timeout=fetch_timeout,
            schedule=schedule,
            schedule_catch_up=schedule_catch_up,
        )
        with self._lock:
            existing = self._registrations.get(name)
            if existing == registration:
                # ready() may run twice (tests that rebuild the app registry): the very same
                # registration again is harmless.
                return self
            if existing is not None:
                raise ConfigurationError(
                    f"Handler {name!r} is already registered (by {existing.handler_class}); "
                    "handler names must be unique."
                )
            self._registrations[name] = registration
        return self

    @staticmethod
    def _validate(
        handler: Any,
        *,
        name: Any,
        max_items_per_cycle: Any,
        purpose: Any,
        exclusive: Any,
        poll_interval: Any,
        max_concurrency: Any,
        item_timeout: Any = None,
        fetch_timeout: Any = None,
        schedule: Any = None,
        schedule_catch_up: Any = None,
    ) -> Registration:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigurationError(
                f"Handler name {name!r} is invalid: use 1-100 letters, digits, '_', '.' or '-'."
            )
        if inspect.isclass(handler):
            _check_handler_api(name, handler, "the class")
            abstract = sorted(getattr(handler, "__abstractmethods__", ()))
            if abstract:
                raise ConfigurationError(
                    f"Handler {name!r}: {handler.__qualname__} leaves abstract methods "
                    f"unimplemented: {', '.join(abstract)}."
                )
        elif not callable(handler):
            raise ConfigurationError(
                f"Handler {name!r}: {handler!r} is neither a handler class nor a factory callable."
            )
        _check_no_arguments(name, handler)
        path = _dotted_path(handler)
        if len(path) > HANDLER_CLASS_MAX_LENGTH:
            raise ConfigurationError(
                f"Handler {name!r}: the dotted path of {path[:60]!r}... is longer than "
                f"{HANDLER_CLASS_MAX_LENGTH} characters, more than the Handler table stores."
            )
        if isinstance(max_items_per_cycle, bool) or not isinstance(max_items_per_cycle, int):
            raise ConfigurationError(
                f"Handler {name!r}: max_items_per_cycle must be an int >= 1, "
                f"got {max_items_per_cycle!r}."
            )
        if not 1 <= max_items_per_cycle <= MAX_STORED_INT:
            raise ConfigurationError(
                f"Handler {name!r}: max_items_per_cycle must be from 1 to {MAX_STORED_INT}, "
                f"got {max_items_per_cycle!r}."
            )
        try:
            purpose = Purpose(purpose)
        except ValueError:
            raise ConfigurationError(
                f"Handler {name!r}: unknown purpose {purpose!r}; use one of "
                f"{', '.join(p.value for p in Purpose)}."
            ) from None
        if exclusive is None:
            exclusive = bool(getattr(handler, "exclusive_by_default", True))
        elif not isinstance(exclusive, bool):
            raise ConfigurationError(
                f"Handler {name!r}: exclusive must be a bool, got {exclusive!r}."
            )
        interval = None
        if poll_interval is not None:
            try:
                interval = parse_duration(
                    poll_interval, minimum=MIN_POLL_INTERVAL, maximum=max_wait()
                )
            except ValueError as exc:
                raise ConfigurationError(
                    f"Handler {name!r}: poll_interval {poll_interval!r} {exc}."
                ) from None
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or not 1 <= max_concurrency <= MAX_STORED_INT
        ):
            raise ConfigurationError(
                f"Handler {name!r}: max_concurrency must be None or an int from 1 to "
                f"{MAX_STORED_INT}, got {max_concurrency!r}."
            )
        timeouts: dict[str, timedelta | None] = {}
        for option, value in (
            ("item_timeout", item_timeout),
            ("fetch_timeout", fetch_timeout),
            ("schedule_catch_up", schedule_catch_up),
        ):
            timeouts[option] = None
            if value is not None:
                try:
                    timeouts[option] = parse_duration(value, maximum=max_wait())
                except ValueError as exc:
                    raise ConfigurationError(
                        f"Handler {name!r}: {option} {value!r} {exc}."
                    ) from None
        if schedule is not None:
            if not isinstance(schedule, str):
                raise ConfigurationError(
                    f"Handler {name!r}: schedule must be a cron expression string, "
                    f"got {schedule!r}."
                )
            if len(schedule) > SCHEDULE_MAX_LENGTH:
                raise ConfigurationError(
                    f"Handler {name!r}: schedule {schedule[:40]!r}... is longer than "
                    f"{SCHEDULE_MAX_LENGTH} characters."
                )
            try:
                schedule = CronSchedule.parse(schedule).expression
            except ScheduleError as exc:
                raise ConfigurationError(
                    f"Handler {name!r}: schedule {schedule!r} {exc}."
                ) from None
            if interval is not None:
                raise ConfigurationError(
                    f"Handler {name!r}: give a schedule ({schedule!r}) or a poll_interval "
                    f"({poll_interval!r}), not both."
                )
        elif timeouts["schedule_catch_up"] is not None:
            raise ConfigurationError(
                f"Handler {name!r}: schedule_catch_up {schedule_catch_up!r} needs a schedule."
            )
        return Registration(
            name=name,
            factory=handler,
            max_items_per_cycle=max_items_per_cycle,
            purpose=purpose,
            exclusive=exclusive,
            poll_interval=interval,
            max_concurrency=max_concurrency,
            item_timeout=timeouts["item_timeout"],
            fetch_timeout=timeouts["fetch_timeout"],
            schedule=schedule,
            schedule_catch_up=timeouts["schedule_catch_up"],
        )

    def get(self, name: str) -> Registration:
        """The registration called ``name``; :class:`UnknownHandlerError` if there is none."""
        try:
            return self._registrations[name]
        except KeyError:
            raise UnknownHandlerError(name, self.names()) from None

    def names(self, purpose: Purpose | str | None = None) -> list[str]:
        """Registered names, sorted, optionally only those of one purpose."""
        return [r.name for r in self.select(purpose=purpose)]

    def select(
        self, handlers: Iterable[str] | None = None, purpose: Purpose | str | None = None
    ) -> list[Registration]:
        """Registrations by name (all when ``handlers`` is None) and purpose, sorted by name."""
        if purpose is not None:
            try:
                purpose = Purpose(purpose)
            except ValueError:
                raise ConfigurationError(
                    f"Unknown purpose {purpose!r}; "
                    f"use one of {', '.join(p.value for p in Purpose)}."
                ) from None
        if handlers is None:
            chosen = list(self._registrations.values())
        else:
            chosen = [self.get(name) for name in dict.fromkeys(handlers)]
        return sorted(
            (r for r in chosen if purpose is None or r.purpose == purpose), key=lambda r: r.name
        )

    def remove(self, name: str) -> None:
        """Forget a registration (for tests and for code that registers conditionally)."""
        with self._lock:
            if self._registrations.pop(name, None) is None:
                raise UnknownHandlerError(name, self.names())

    def __iter__(self) -> Iterator[Registration]:
        return iter(sorted(self._registrations.values(), key=lambda r: r.name))

    def __len__(self) -> int:
        return len(self._registrations)

    def __contains__(self, name: object) -> bool:
        return name in self._registrations

    def __repr__(self) -> str:
        return f"<HandlerRegistry {self.names()}>"


registry = HandlerRegistry()


def add_handler(
    handler: type[WorkItemHandler[Any]] | HandlerFactory,
    *,
    name: str,
    max_items_per_cycle: int = 10,
    purpose: Purpose | str = Purpose.INTERNAL,
    exclusive: bool | None = None,
    poll_interval: timedelta | str | float | None = None,
    max_concurrency: int | None = None,
    item_timeout: timedelta | str | float | None = None,
    fetch_timeout: timedelta | str | float | None = None,
    schedule: str | None = None,
    schedule_catch_up: timedelta | str | float | None = None,
) -> HandlerRegistry:
    """Register a handler in the default registry; returns it, so calls chain."""
    return registry.add_handler(
        handler,
        name=name,
        max_items_per_cycle=max_items_per_cycle,
        purpose=purpose,
        exclusive=exclusive,
        poll_interval=poll_interval,
        max_concurrency=max_concurrency,
        item_timeout=item_timeout,
        fetch_timeout=fetch_timeout,
        schedule=schedule,
        schedule_catch_up=schedule_catch_up,
    )


def get_handlers(purpose: Purpose | str | None = None) -> list[str]:
    """Registered handler names, sorted, optionally of one purpose."""
    return registry.names(purpose)
