"""Instant wake-ups on PostgreSQL: ``NOTIFY`` from ``notify()`` (in the same statement as the
request, see ``models.request_run``), ``LISTEN`` in every worker.

Elsewhere workers see ``Handler.run_requested_at`` within a second, so this is an
accelerator, never the only path: a lost notification costs at most that second.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from django.db import DEFAULT_DB_ALIAS, connections

logger = logging.getLogger("django_workitems.wakeups")

CHANNEL = "django_workitems"


class Listener:
    """A thread holding a dedicated connection that ``LISTEN``s and calls ``on_wake(name)``.

    It reconnects after errors (a restarted server, a terminated backend) until stopped.
    """

    def __init__(self, on_wake: Callable[[str], None], using: str = DEFAULT_DB_ALIAS) -> None:
        self._on_wake = on_wake
        self._using = using
        self._stop = threading.Event()
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workitems-listener", daemon=True)

    @staticmethod
    def supported(using: str = DEFAULT_DB_ALIAS) -> bool:
        """PostgreSQL through psycopg 3.2 or later (``notifies(timeout=)``); otherwise workers
        see requests through their once-a-second read of the handler rows."""
        if connections[using].vendor != "postgresql":
            return False
        if not _psycopg_has_notify_timeout():
            logger.warning(
                "psycopg %s has no notifies(timeout=): no LISTEN, so workers see notify() "
                "within their one-second refresh; install psycopg>=3.2 for wake-ups in "
                "milliseconds",
                _psycopg_version(),
            )
            return False
        return True

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            # A wrapper of our own: the LISTEN session must not be shared or recycled.
            wrapper = connections.create_connection(self._using)
            try:
                wrapper.connect()
                raw = wrapper.connection
                raw.execute(f"LISTEN {CHANNEL}")
                self.listening.set()
                logger.info("Listening for wake-ups on channel %s", CHANNEL)
                delay = 0.5
                while not self._stop.is_set():
                    for notification in raw.notifies(timeout=0.5):
                        self._on_wake(notification.payload)
            except Exception:
                self.listening.clear()
                if self._stop.is_set():
                    break
                logger.warning(
                    "LISTEN connection lost; reconnecting in %.1fs", delay, exc_info=True
                )
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
            finally:
                try:
                    wrapper.close()
                except Exception:  # the connection is already broken
                    logger.debug("closing the LISTEN connection failed", exc_info=True)


def _psycopg_version() -> str:
    try:
        import psycopg
    except ImportError:  # psycopg2: no notifies() of this kind either
        return "(not installed)"
    return str(psycopg.__version__)


def _psycopg_has_notify_timeout() -> bool:
    """psycopg 3.2 added ``Connection.notifies(timeout=...)``, which the listener needs."""
    parts = _psycopg_version().split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (3, 2)
    except (ValueError, IndexError):
        return False
