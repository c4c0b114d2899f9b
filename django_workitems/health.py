"""Is anything working? Live workers, each handler's last success and backlog.

Used by ``manage.py workitems_health``, by :func:`health_view` (mount it for an HTTP probe), and
for the backlogs shown in the admin and GraphQL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from .conf import app_settings
from .exceptions import UnknownHandlerError
from .handlers import call_handler
from .models import Handler, Worker
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
    handler = None
    try:
        handler = registration.create_handler()
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
    finally:
        if handler is not None:
            try:
                handler.close()
            except Exception:
                logger.exception("Handler %s: close() raised", name, extra={"handler": name})


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

    def summary(self) -> dict[str, Any]:
        """The part anyone may see: no host names, no handler names, no error messages."""
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


def touch_liveness_file(path: str) -> None:
    """Mark this process alive for a probe that needs no database (``--health-file``).

    (Implementation pending: the loop calls this at least once a second.)
    """


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

    Mount it where a load balancer or orchestrator can reach it::

        path("workitems/health/", django_workitems.health.health_view)
    """
    user = getattr(request, "user", None)
    staff = bool(user is not None and user.is_active and user.is_staff)
    try:
        report = check_health(detail=staff)
    except DatabaseError:
        logger.exception("Health check: the database could not be read")
        return JsonResponse(
            {"status": "unhealthy", "reason": "the database could not be read"}, status=503
        )
    body = report.as_dict() if staff else report.summary()
    return JsonResponse(body, status=200 if report.healthy else 503)
