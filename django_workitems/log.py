"""Log set-up for the worker command: structured ``extra`` fields, level from verbosity."""

from __future__ import annotations

import logging
import sys

LOGGER = "django_workitems"


class ContextFilter(logging.Filter):
    """Gives every record ``handler``, ``run_id`` and ``work_item_id``, so formats can use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in ("handler", "run_id", "work_item_id"):
            if not hasattr(record, name):
                setattr(record, name, None)
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
