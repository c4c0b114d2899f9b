"""Is anything working? Live workers, each handler's last success and backlog.

Used by ``manage.py workitems_health``, by :func:`health_view` (mount it for an HTTP probe), and
for the backlogs shown in the admin and GraphQL.

Three questions, for three kinds of probe (see docs/probes.md):

- *Is this process alive?* :func:`liveness_file_age` on the file that ``runworkitems
  --health-file`` touches (:func:`touch_liveness_file`); no database involved.
- *Can this process do its work?* :func:`check_ready`: the database takes the writes the lease
  keeper makes.
- *Is anything working, anywhere?* :func:`check_health`: a worker heartbeated within
  ``LEASE_TIMEOUT``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, connection, transaction
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from .conf import app_settings
from .exceptions import UnknownHandlerError
from .handlers import call_handler
from .models import Handler, Worker, db_now, db_now_plus
from .registry import HandlerRegistry
from .registry import registry as default_registry

logger = logging.getLogger("django_workitems.health")

MAX_WORKERS_LISTED = 100


@dataclass(frozen=True)
class Backlog:
    """What a handler reports as waiting: ``count`` and ``oldest_waiting`` are None if unknown."""

    count: int | None = None
    oldest_waiting: datetime | None = None
    error: str = ""
    """``ExceptionType: message`` when ``backlog()`` or ``oldest_waiting()`` raised."""
    registered: bool = True

    def age(self, now: datetime | None = None) -> timedelta | None:
        """How long the oldest waiting item has waited."""
        if self.oldest_waiting is None:
            return None
        return max(timedelta(0), (now or timezone.now()) - self.oldest_waiting)


def handler_backlog(name: str, registry: HandlerRegistry | None = None) -> Backlog:
    """Ask a fresh instance of handler ``name`` for its backlog; errors are caught and reported.

    This runs the handler's own code (often a query on its own data source), once per call.
    """
    registry = registry if registry is not None else default_registry
    try:
        registration = registry.get(name)
    except UnknownHandlerError:
        return Backlog(registered=False)
    try:
        with registration.instance() as handler:
            count = call_handler(handler.backlog)
            oldest = call_handler(handler.oldest_waiting) if count != 0 else None
        return Backlog(
            count=None if count is None else int(count),
            oldest_waiting=oldest if isinstance(oldest, datetime) else None,
        )
    except Exception as exc:
        logger.warning(
            "Handler %s: its backlog could not be read: %s", name, exc, extra={"handler": name}
        )
        return Backlog(error=f"{type(exc).__name__}: {exc}")


@dataclass
class HealthReport:
    """The state of the deployment; healthy when a worker heartbeated within ``LEASE_TIMEOUT``."""

    healthy: bool
    reason: str
    checked_at: datetime
    lease_timeout: timedelta
    workers_alive: int
    workers: list[Worker] = field(default_factory=list)
    handlers: list[Handler] = field(default_factory=list)
    backlogs: dict[str, Backlog] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The part anyone may see (the anonymous health view): healthy or not, nothing else."""
        return {"healthy": self.healthy}

    def summary(self) -> dict[str, Any]:
        """Status, reason and count, for staff and the command.

        Not for anonymous callers: the reason may name a host and pid ("the last one,
        vm:9840, stopped 15s ago"). They get :meth:`public`.
        """
        return {
            "status": "ok" if self.healthy else "unhealthy",
            "reason": self.reason,
            "checked_at": self.checked_at.isoformat(),
            "workers_alive": self.workers_alive,
        }

    def as_dict(self) -> dict[str, Any]:
        """Everything: workers, handlers, last success and backlog (for staff and the command)."""
        now = self.checked_at
        return {
            **self.summary(),
            "lease_timeout_seconds": self.lease_timeout.total_seconds(),
            "workers": [
                {
                    "hostname": w.hostname,
                    "pid": w.pid,
                    "started_at": w.started_at.isoformat(),
                    "last_heartbeat_at": w.last_heartbeat_at.isoformat(),
                    "heartbeat_age_seconds": _seconds(now - w.last_heartbeat_at),
                    "alive": now - w.last_heartbeat_at <= self.lease_timeout,
                }
                for w in self.workers
            ],
            "handlers": [self._handler_dict(h, now) for h in self.handlers],
        }

    def _handler_dict(self, handler: Handler, now: datetime) -> dict[str, Any]:
        last_run_at: datetime | None = getattr(handler, "last_run_at", None)
        last_success_at: datetime | None = getattr(handler, "last_success_at", None)
        backlog = self.backlogs.get(handler.name, Backlog(registered=handler.is_registered))
        age = backlog.age(now)
        return {
            "name": handler.name,
            "purpose": handler.purpose,
            "enabled": handler.is_enabled,
            "registered": handler.is_registered,
            "last_run_status": getattr(handler, "last_run_status", None),
            "last_run_at": _iso(last_run_at),
            "last_success_at": _iso(last_success_at),
            "last_success_age_seconds": (
                None if last_success_at is None else _seconds(now - last_success_at)
            ),
            "backlog": backlog.count,
            "oldest_waiting_at": _iso(backlog.oldest_waiting),
            "oldest_waiting_age_seconds": None if age is None else _seconds(age),
            # The type only: messages may quote connection strings or data.
            "backlog_error": backlog.error.split(":", 1)[0] if backlog.error else None,
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _seconds(value: timedelta) -> float:
    return round(value.total_seconds(), 3)


_unwritable: set[str] = set()
"""Liveness files whose last touch failed: warned about once, until a touch succeeds again."""


def touch_liveness_file(path: str) -> None:
    """Mark this process alive for a probe that needs no database (``--health-file``).

    Sets the file's mtime to now, creating it if missing: one system call in the usual case.
    Never raises: a path that cannot be written logs a warning once (and once more if it
    recovers and fails again), and the worker goes on; the liveness probe will then fail.
    """
    try:
        try:
            os.utime(path)
        except FileNotFoundError:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
    except Exception as exc:
        if path not in _unwritable:
            _unwritable.add(path)
            logger.warning(
                "The liveness file %s cannot be written (%s: %s); a liveness probe on it will fail",
                path,
                type(exc).__name__,
                exc,
            )
        return
    if _unwritable:
        _unwritable.discard(path)


def liveness_file_age(path: str) -> float | None:
    """Seconds since ``path`` was last touched (0 if its mtime is ahead); None if it is missing.

    Reads the file system only: no database connection is opened.
    """
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    return max(0.0, time.time() - mtime)


@dataclass(frozen=True)
class Readiness:
    """Whether this process could do its work now; ``reason`` says what was proved or failed."""

    ready: bool
    reason: str


READY_PROBE_OWNER = "workitems_health --ready"
"""Written into no row: the probe's UPDATEs match none (``pk=-1``)."""


def check_ready(timeout: float = 5.0) -> Readiness:
    """Is the database reachable and does it take the writes the lease keeper makes?

    In one transaction that is always rolled back, runs the keeper's two statements against a
    row that does not exist: the lease renewal (``UPDATE`` of ``Handler.lease_expires_at`` to
    the database's ``now() + LEASE_TIMEOUT``) and the heartbeat (``UPDATE`` of
    ``Worker.last_heartbeat_at``). Both match zero rows, so nothing changes, yet the database
    must connect, find the tables and columns (migrations applied), grant UPDATE, accept
    writes (a read-only replica, a hot standby or a ``query_only`` SQLite refuses them) and
    evaluate its clock. On PostgreSQL, ``statement_timeout`` and ``lock_timeout`` of
    ``timeout`` seconds bound the wait (a table locked by a migration is "not ready").

    It does not prove that any particular lease is free or held: that is other workers' state,
    not this process's readiness.
    """
    lease_timeout = app_settings.lease_timeout
    try:
        with transaction.atomic():
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    ms = max(1, int(timeout * 1000))
                    cursor.execute(f"SET LOCAL statement_timeout = {ms}")
                    cursor.execute(f"SET LOCAL lock_timeout = {ms}")
            Handler.objects.filter(pk=-1, lease_owner=READY_PROBE_OWNER).update(
                lease_expires_at=db_now_plus(lease_timeout)
            )
            Worker.objects.filter(pk=-1).update(last_heartbeat_at=db_now())
            transaction.set_rollback(True)
    except DatabaseError as exc:
        return Readiness(False, f"the database refused the lease keeper's writes: {exc}".strip())
    return Readiness(
        True,
        f"the database ({connection.vendor}) takes the lease keeper's writes "
        "(lease renewal and heartbeat, rolled back)",
    )


def check_health(*, detail: bool = True, registry: HandlerRegistry | None = None) -> HealthReport:
    """Build the report; with ``detail``, also list workers and handlers and read backlogs.

    Raises ``DatabaseError`` when the database cannot be read, and ``ConfigurationError``
    for a bad ``LEASE_TIMEOUT``.
    """
    lease_timeout = app_settings.lease_timeout
    now = timezone.now()
    alive = Worker.objects.alive(lease_timeout).count()
    reason = (
        f"{alive} worker{'s' if alive != 1 else ''} heartbeated within {lease_timeout}"
        if alive
        else _why_no_worker(lease_timeout, now)
    )
    report = HealthReport(
        healthy=alive > 0,
        reason=reason,
        checked_at=now,
        lease_timeout=lease_timeout,
        workers_alive=alive,
    )
    if detail:
        report.workers = list(
            Worker.objects.filter(stopped_at__isnull=True).order_by("-last_heartbeat_at", "-id")[
                :MAX_WORKERS_LISTED
            ]
        )
        report.handlers = list(Handler.objects.with_last_run().order_by("name"))
        report.backlogs = {
            h.name: handler_backlog(h.name, registry) for h in report.handlers if h.is_registered
        }
    return report


def _why_no_worker(lease_timeout: timedelta, now: datetime) -> str:
    latest = Worker.objects.order_by("-last_heartbeat_at", "-id").first()
    if latest is None:
        return "no worker has ever started (run manage.py runworkitems)"
    if latest.stopped_at is not None:
        return (
            f"no worker is running: the last one, {latest}, stopped "
            f"{_seconds(now - latest.stopped_at):.0f}s ago"
        )
    return (
        f"no worker has heartbeated within {lease_timeout}: the last heartbeat, from {latest}, "
        f"was {_seconds(now - latest.last_heartbeat_at):.0f}s ago"
    )


@never_cache
@require_safe
def health_view(request: HttpRequest) -> JsonResponse:
    """200 when a worker is alive, 503 otherwise; details only for active staff users.

    Anyone else gets ``{"healthy": true}`` or ``{"healthy": false}``: no host, pid, count or
    reason. Mount it where a load balancer or orchestrator can reach it::

        path("workitems/health/", django_workitems.health.health_view)
    """
    user = getattr(request, "user", None)
    staff = bool(user is not None and user.is_active and user.is_staff)
    try:
        report = check_health(detail=staff)
    except DatabaseError:
        logger.exception("Health check: the database could not be read")
        body: dict[str, Any] = (
            {"status": "unhealthy", "reason": "the database could not be read"}
            if staff
            else {"healthy": False}
        )
        return JsonResponse(body, status=503)
    body = report.as_dict() if staff else report.public()
    return JsonResponse(body, status=200 if report.healthy else 503)
