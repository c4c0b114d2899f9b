"""Connection hygiene of the worker's threads: one place that knows the rules.

Every thread the worker starts owns its Django connections. While work keeps coming it keeps
them from one unit of work to the next (even with ``CONN_MAX_AGE = 0``, reconnecting for every
item would dominate fast items); when it runs out of work it applies Django's
``close_old_connections`` semantics; when it exits it closes them. A unit of work that leaves a
transaction open is rolled back and its connection closed, so the next unit on that thread
starts clean.
"""

from __future__ import annotations

import logging
import threading

from django.db import connections, reset_queries
from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django_workitems.hygiene")


_local = threading.local()


def _mine() -> list[BaseDatabaseWrapper]:
    """This thread's connection objects, looked up once.

    Django gives a thread one wrapper per alias for the thread's whole life, so a worker thread
    need not go through ``connections`` (an asgiref ``Local``) after every unit of work.
    """
    mine: list[BaseDatabaseWrapper] | None = getattr(_local, "connections", None)
    if mine is None:
        mine = _local.connections = [connections[alias] for alias in connections]
    return mine


def after_work(*, idle: bool) -> None:
    """After a unit of work (``idle=False``) or once out of work (``idle=True``).

    Closes this thread's connections that are broken, obsolete, left with autocommit off or,
    when ``idle``, stale under ``CONN_MAX_AGE``; clears ``connection.queries`` (DEBUG).
    """
    for conn in _mine():
        if conn.queries_log:  # not ``queries_logged``: reading settings.DEBUG costs more
            conn.queries_log.clear()
        if conn.connection is None:
            continue
        if idle or _needs_check(conn) or not _autocommit_as_configured(conn):
            conn.close_if_unusable_or_obsolete()


def after_item() -> list[str]:
    """After one item, in one pass: :func:`open_transactions`, then ``after_work(idle=False)``.

    Returns the aliases left inside a transaction (now rolled back and closed).
    """
    leaked: list[str] = []
    for conn in _mine():
        if conn.queries_log:  # not ``queries_logged``: reading settings.DEBUG costs more
            conn.queries_log.clear()
        if conn.connection is None:
            continue
        if _in_transaction(conn):
            leaked.append(conn.alias)
            _discard(conn)
        elif _needs_check(conn):
            conn.close_if_unusable_or_obsolete()
    return leaked


def close_all() -> None:
    """When a thread exits: close every connection it opened, whatever their state."""
    reset_queries()
    for conn in connections.all(initialized_only=True):
        try:
            conn.close()
        except Exception:  # a connection broken beyond closing: nothing more to do
            logger.debug("closing %s failed", conn.alias, exc_info=True)


def open_transactions() -> list[str]:
    """Aliases of this thread's connections left inside a transaction, now rolled back.

    A handler that entered ``atomic()`` without leaving it, or switched autocommit off, would
    otherwise make every later query on this thread part of one transaction that never commits.
    """
    leaked = []
    for conn in _mine():
        if conn.connection is not None and _in_transaction(conn):
            leaked.append(conn.alias)
            _discard(conn)
    return leaked


def _needs_check(conn: BaseDatabaseWrapper) -> bool:
    return conn.errors_occurred or conn.settings_dict.get("CONN_MAX_AGE", 0) != 0


def _autocommit_as_configured(conn: BaseDatabaseWrapper) -> bool:
    try:
        return bool(conn.get_autocommit() == conn.settings_dict.get("AUTOCOMMIT", True))
    except Exception:
        return False


def _in_transaction(conn: BaseDatabaseWrapper) -> bool:
    try:
        return bool(conn.in_atomic_block or not conn.get_autocommit())
    except Exception:
        return True


def _discard(conn: BaseDatabaseWrapper) -> None:
    """Throw away a connection left inside a transaction: nothing of it is committed.

    The atomic() bookkeeping of a block that was never exited cannot be unwound from outside:
    forget it, then close the connection, which discards the transaction on the server; the
    next unit reconnects cleanly.
    """
    conn.in_atomic_block = False
    conn.savepoint_ids = []
    conn.atomic_blocks = []
    conn.needs_rollback = False
    conn.closed_in_transaction = False
    conn.run_on_commit = []
    try:
        conn.close()
    except Exception:
        logger.debug("closing %s failed", conn.alias, exc_info=True)
        conn.connection = None


def apply_connection_timeouts(lease_timeout_seconds: float) -> None:
    """Make the worker's PostgreSQL connections notice a dead peer within about a lease.

    Fills in, where the project has not set them, libpq's ``connect_timeout``, TCP keepalives
    and ``tcp_user_timeout``, so a half-open connection (a database host that vanished without
    a reset) raises instead of blocking a thread for the kernel's default of many minutes.
    Applies to connections opened from now on.
    """
    for alias in connections:
        settings = connections.settings[alias]
        if "postgresql" not in settings.get("ENGINE", ""):
            continue
        options = settings.setdefault("OPTIONS", {})
        seconds = max(1, int(lease_timeout_seconds))
        options.setdefault("connect_timeout", max(2, min(seconds, 30)))
        options.setdefault("keepalives", 1)
        options.setdefault("keepalives_idle", max(1, seconds // 3))
        options.setdefault("keepalives_interval", max(1, seconds // 9))
        options.setdefault("keepalives_count", 3)
        options.setdefault("tcp_user_timeout", seconds * 1000)
