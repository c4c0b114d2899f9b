"""Export: tell a partner about every finished batch, with a JSON webhook.

``CATALOG_WEBHOOK_URL`` is where to POST (the demo shop's ``/webhooks/catalog`` in the demo);
when it is empty the handler has nothing to do.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx
from django.conf import settings
from django.db.models import F
from django.utils import timezone

import django_workitems as workitems

from ..models import StagingBatch, StagingBatchQuerySet

logger = logging.getLogger(__name__)

WEBHOOK_HANDLER = "catalog.notify-batches"


class WebhookError(Exception):
    """The receiver did not accept the notification."""


def batch_payload(batch: StagingBatch) -> dict[str, Any]:
    """What the partner is told about a finished batch (with its products when it succeeded)."""
    payload: dict[str, Any] = {
        "event": f"batch.{batch.status}",
        "batch": batch.pk,
        "source_url": batch.source_url,
        "category": batch.category,
        "attempts": batch.attempts,
    }
    if batch.status == StagingBatch.STATUS.succeeded:
        payload["products"] = [
            {"sku": sku, "name": name, "price": str(price), "in_stock": in_stock}
            for sku, name, price, in_stock in batch.products.order_by("sku").values_list(
                "sku", "name", "price", "in_stock"
            )
        ]
    else:
        payload["reason"] = batch.reason
    return payload


class BatchWebhookHandler(workitems.WorkItemHandler[StagingBatch]):
    """POSTs one notification per finished batch; gives up on a batch after ``max_attempts``.

    ``fetch_next`` only reads, so the handler is registered exclusive. Delivery is
    at-least-once: the receiver deduplicates with the ``Idempotency-Key`` header.
    """

    max_attempts = 5

    def __init__(self) -> None:
        self.url: str = settings.CATALOG_WEBHOOK_URL
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

    def _pending(self) -> StagingBatchQuerySet:
        return StagingBatch.objects.to_notify(self.max_attempts)

    @property
    def client(self) -> httpx.Client:
        """One HTTP session per activation, created on first use."""
        with self._client_lock:
            if self._client is None:
                self._client = httpx.Client(timeout=settings.CATALOG_HTTP_TIMEOUT)
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[StagingBatch]:
        if not self.url:
            return []
        return list(self._pending().order_by("modified", "pk")[:max_items])

    def process(self, item: StagingBatch, cancel: workitems.CancellationToken) -> None:
        StagingBatch.objects.filter(pk=item.pk).update(webhook_attempts=F("webhook_attempts") + 1)
        try:
            response = self.client.post(
                self.url,
                json=batch_payload(item),
                headers={"Idempotency-Key": f"batch-{item.pk}-{item.status}-{item.attempts}"},
            )
        except httpx.HTTPError as exc:
            raise WebhookError(f"{type(exc).__name__} ({exc}): {self.url}") from exc
        if not response.is_success:
            raise WebhookError(f"HTTP {response.status_code} from {self.url}")
        StagingBatch.objects.filter(pk=item.pk).update(notified_at=timezone.now())
        logger.info(
            "Notified %s (%s)",
            item,
            item.status,
            extra={"handler": WEBHOOK_HANDLER, "work_item_id": item.pk},
        )

    def backlog(self) -> int | None:
        return self._pending().count() if self.url else None
