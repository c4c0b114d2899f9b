"""Log set-up for the worker command: structured ``extra`` fields, level from verbosity."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

LOGGER = "django_workitems"


FIELDS = ("handler", "run_id", "work_item_id")

log_context: ContextVar[tuple[str | None, int | None, str | None]] = ContextVar(
    "workitems_log_context", default=(None, None, None)
)
"""The handler, run and work item the current thread is busy with, set by the worker."""


class ContextFilter(logging.Filter):
    """Gives every record ``handler``, ``run_id`` and ``work_item_id``, so formats can use them.

    Values passed in ``extra`` win; otherwise they come from what the worker is doing in this
    thread, so a handler's own log lines carry them without passing ``extra``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in zip(FIELDS, log_context.get(), strict=True):
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def configure_logging(verbosity: int) -> None:
    """Log to stderr at a level from ``--verbosity``, unless the project configured logging."""
    logger = logging.getLogger(LOGGER)
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logger.setLevel(level)
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"
            " (handler=%(handler)s run=%(run_id)s item=%(work_item_id)s)"
        )
    )
    logger.addHandler(handler)
