"""Built-in handlers that keep the app's own tables in shape; registered by ``ready()``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from .conf import app_settings
from .handlers import CancellationToken, Purpose, WorkItemHandler
from .log import plural
from .models import HandlerRun, HandlerRunQuerySet, Worker
from .registry import HandlerRegistry
from .registry import registry as default_registry

logger = logging.getLogger("django_workitems.housekeeping")

PRUNE_RUNS_HANDLER = "django_workitems.prune-runs"
"""Registered name of :class:`PruneRunsHandler`."""


@dataclass(frozen=True)
class ExpiredRuns:
    """One bounded batch of runs to delete, oldest first."""

    run_ids: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"runs {self.run_ids[0]}..{self.run_ids[-1]} ({len(self.run_ids)})"


class PruneRunsHandler(WorkItemHandler[ExpiredRuns]):
    """Deletes finished runs older than ``RUN_RETENTION``, with their item failures.

    Each work item is a batch of at most ``batch_size`` runs, deleted by a few statements
    bounded by that size, so pruning a long history never takes one giant delete (nor its
    locks). The handlers' all-time totals live on the ``Handler`` rows and are not touched.
    Worker rows silent for longer than the retention are forgotten too (every process start
    adds one), so looking for the claims of dead workers stays cheap.
    """

    batch_size = 500

    def __init__(self) -> None:
        self.retention: timedelta = app_settings.run_retention
        self.now = timezone.now()

    def _expired(self) -> HandlerRunQuerySet:
        return HandlerRun.objects.expired(self.retention, self.now)

    def fetch_next(self, max_items: int, cancel: CancellationToken) -> list[ExpiredRuns]:
        ids = list(
            self._expired()
            .order_by("started_at", "id")
            .values_list("pk", flat=True)[: max_items * self.batch_size]
        )
        return [
            ExpiredRuns(tuple(ids[start : start + self.batch_size]))
            for start in range(0, len(ids), self.batch_size)
        ]

    def process(self, item: ExpiredRuns, cancel: CancellationToken) -> None:
        _, deleted = HandlerRun.objects.filter(pk__in=item.run_ids).delete()
        logger.debug(
            "Pruned %s: %s",
            item.id,
            deleted,
            extra={"handler": PRUNE_RUNS_HANDLER, "work_item_id": item.id},
        )

    def close(self) -> None:
        """Also forget workers silent for longer than the retention (one bounded delete)."""
        silent = list(
            Worker.objects.filter(last_heartbeat_at__lt=self.now - self.retention).values_list(
                "pk", flat=True
            )[: self.batch_size]
        )
        if silent:
            # Their runs keep their history (worker set to NULL), as do rows they once claimed.
            Worker.objects.filter(pk__in=silent).delete()
            logger.info(
                "Forgot %s silent for over %s", plural(len(silent), "worker"), self.retention
            )

    def backlog(self) -> int:
        return self._expired().count()

    def oldest_waiting(self) -> datetime | None:
        """When the oldest expired run passed the retention period."""
        started = self._expired().order_by("started_at").values_list("started_at", flat=True)
        first = started.first()
        return None if first is None else first + self.retention


def register(registry: HandlerRegistry | None = None) -> None:
    """Add the built-in handlers to ``registry`` (the default one), once."""
    registry = registry if registry is not None else default_registry
    if PRUNE_RUNS_HANDLER not in registry:
        registry.add_handler(
            PruneRunsHandler,
            name=PRUNE_RUNS_HANDLER,
            purpose=Purpose.INTERNAL,
            max_items_per_cycle=10,
            poll_interval=timedelta(hours=1),
        )
