"""Logging of the worker: context fields, formatters, and the defaults of ``runworkitems``.

The project's ``LOGGING`` setting always wins. ``runworkitems`` adds a handler of its own (INFO
to stderr, with :class:`ContextFormatter`) only when nothing would print the app's records, and
changes the level of the ``django_workitems`` logger only when ``-v``/``--verbosity`` is given
on its command line. See ``docs/logging.md``.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

LOGGER = "django_workitems"

FIELDS = ("handler", "run_id", "work_item_id")
"""The context attributes of a record, in the order of :data:`log_context`."""

LABELS = {"handler": "handler", "run_id": "run", "work_item_id": "item"}
"""How :class:`ContextFormatter` names each context field."""

DEFAULT_FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"

VERBOSITY_LEVELS = {0: logging.WARNING, 1: logging.INFO}
"""Level of the ``django_workitems`` logger for an explicit ``-v``; 2 and 3 mean DEBUG."""

log_context: ContextVar[tuple[str | None, int | None, str | None]] = ContextVar(
    "workitems_log_context", default=(None, None, None)
)
"""The handler, run and work item the current thread is busy with, set by the worker."""


class ContextFilter(logging.Filter):
    """Gives every record ``handler``, ``run_id`` and ``work_item_id``, so formats can use them.

    Values passed in ``extra`` win; otherwise they come from what the worker is doing in this
    thread, so a handler's own log lines carry them without passing ``extra``. A field the
    worker is not busy with is ``None``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in zip(FIELDS, log_context.get(), strict=True):
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The context fields of ``record`` that are set, by attribute name (``FIELDS`` order).

    A field comes from the record (``extra`` or :class:`ContextFilter`) or, failing that, from
    what the worker is doing in the formatting thread; fields that are ``None`` are left out.
    """
    current = dict(zip(FIELDS, log_context.get(), strict=True))
    fields = {}
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is None:
            value = current[name]
        if value is not None:
            fields[name] = value
    return fields


class ContextFormatter(logging.Formatter):
    """A ``logging.Formatter`` that appends the context fields that are set to the message.

    ``... message (handler=catalog.import run=12 item=34)``: only the fields that are set, and
    no suffix at all outside any handler. The traceback, if any, follows the suffix. Without a
    format it uses ``DEFAULT_FORMAT``.
    """

    def __init__(self, fmt: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(fmt or DEFAULT_FORMAT, *args, **kwargs)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = context_of(record)
        if not fields:
            return text
        return f"{text} ({' '.join(f'{LABELS[name]}={value}' for name, value in fields.items())})"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``timestamp``, ``level``, ``logger``, ``thread``, ``message``.

    Then the context fields that are set (``handler``, ``run_id``, ``work_item_id``), and
    ``exc_info`` (the formatted traceback) and ``stack_info`` when the record has them. The
    timestamp is ISO 8601 in UTC with its offset, to the microsecond. Any format string given
    is ignored; values JSON cannot encode are written with ``str()``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        entry.update(context_of(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _level_for(verbosity: int) -> int:
    return VERBOSITY_LEVELS.get(verbosity, logging.DEBUG)


def configure_logging(verbosity: int | None = None) -> None:
    """Set up the worker's logging without overriding the project's ``LOGGING``.

    ``verbosity`` is the ``-v`` given on the command line, or ``None`` if none was: only an
    explicit one sets the level of the ``django_workitems`` logger (0 WARNING, 1 INFO, 2 and 3
    DEBUG). If no handler would receive the app's records (no ``LOGGING`` for it or the root
    logger), a stderr handler with :class:`ContextFilter` and :class:`ContextFormatter` is
    added, at INFO unless ``-v`` says otherwise or the project set the logger's level.
    """
    logger = logging.getLogger(LOGGER)
    source = "the LOGGING setting"
    if not logger.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(ContextFilter())
        handler.setFormatter(ContextFormatter())
        logger.addHandler(handler)
        if verbosity is None and logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
            source = "the default of runworkitems"
    if verbosity is not None:
        logger.setLevel(_level_for(verbosity))
        source = f"--verbosity {verbosity}"
    logger.debug("Logging at %s, from %s", logging.getLevelName(logger.getEffectiveLevel()), source)


def plural(count: int, word: str, many: str | None = None) -> str:
    """``"1 row"``, ``"2 rows"``: a count with its noun (``many``: an irregular plural)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"
