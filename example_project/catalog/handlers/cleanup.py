"""Internal: delete staging batches that finished long ago (their products stay)."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings

import django_workitems as workitems

from ..models import StagingBatch, StagingBatchQuerySet

logger = logging.getLogger(__name__)

PURGE_HANDLER = "catalog.purge-stale-batches"


class PurgeStaleBatchesHandler(workitems.WorkItemHandler[StagingBatch]):
    """Deletes finished batches older than ``CATALOG_BATCH_RETENTION_DAYS``.

    A plain handler: ``fetch_next`` only reads, so it is registered exclusive, and deleting a
    row twice is harmless.
    """

    def __init__(self) -> None:
        self.retention = timedelta(days=settings.CATALOG_BATCH_RETENTION_DAYS)

    def _stale(self) -> StagingBatchQuerySet:
        return StagingBatch.objects.stale(self.retention)

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[StagingBatch]:
        return list(self._stale().only("pk", "category", "source_url").order_by("pk")[:max_items])

    def process(self, item: StagingBatch, cancel: workitems.CancellationToken) -> None:
        deleted, _ = StagingBatch.objects.filter(pk=item.pk).delete()
        if deleted:
            logger.info(
                "Deleted stale %s",
                item,
                extra={"handler": PURGE_HANDLER, "work_item_id": item.pk},
            )

    def backlog(self) -> int:
        return self._stale().count()
