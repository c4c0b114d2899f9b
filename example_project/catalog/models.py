"""A product catalogue fed by a scraper and by CSV files, and the work items that feed it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any, ClassVar

from django.db import models
from django.utils import timezone

from django_workitems.models import WorkItemModel, WorkItemQuerySet


@dataclass(frozen=True)
class ProductRecord:
    """One product as a source describes it: a scraped page or a CSV row."""

    sku: str
    name: str
    price: Decimal
    category: str = ""
    in_stock: bool = True
    url: str = ""


@dataclass(frozen=True)
class UpsertResult:
    created: int
    updated: int


class StagingBatchQuerySet(WorkItemQuerySet["StagingBatch"]):
    def finished(self) -> StagingBatchQuerySet:
        return self.filter(status__in=[StagingBatch.STATUS.succeeded, StagingBatch.STATUS.failed])

    def to_notify(self, max_attempts: int) -> StagingBatchQuerySet:
        """Finished batches whose webhook has not been delivered yet (nor given up on)."""
        return self.finished().filter(notified_at=None, webhook_attempts__lt=max_attempts)

    def stale(self, retention: timedelta) -> StagingBatchQuerySet:
        """Finished batches last touched more than ``retention`` ago: the clean-up's work."""
        return self.finished().filter(modified__lt=timezone.now() - retention)


class StagingBatch(WorkItemModel):
    """One scrape of a shop's listing (all its pages): the scraper's work item.

    ``status``, ``attempts``, ``last_error`` and the claim fields come from ``WorkItemModel``;
    ``StoreBatchHandler`` claims queued batches and records what it found here.
    """

    source_url = models.URLField("source URL", max_length=500)
    category = models.CharField(max_length=100, blank=True)
    pages_fetched = models.PositiveIntegerField(default=0)
    products_found = models.PositiveIntegerField(default=0)
    products_created = models.PositiveIntegerField(default=0)
    products_updated = models.PositiveIntegerField(default=0)
    scraped_at = models.DateTimeField(null=True, blank=True)
    notified_at = models.DateTimeField(
        null=True, blank=True, help_text="When the webhook about this batch was delivered."
    )
    webhook_attempts = models.PositiveSmallIntegerField(default=0)

    # StoreBatchHandler's name: a batch saved queued (in the admin, say) wakes the workers.
    notify_handler: ClassVar[str | None] = "catalog.scrape-store"

    objects = StagingBatchQuerySet.as_manager()  # type: ignore[misc]  # django-stubs: a ClassVar

    class Meta(WorkItemModel.Meta):
        ordering = ["-created", "-id"]
        verbose_name_plural = "staging batches"

    def __str__(self) -> str:
        return f"batch {self.pk} {self.category or self.source_url}"

    @property
    def reason(self) -> str:
        """Why the last attempt failed in one line, ``ScrapeError: HTTP 500 from ...``.

        ``last_error`` holds the whole traceback; its last line names the exception.
        """
        lines = [line.strip() for line in self.last_error.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        kind, colon, message = last.partition(": ")
        if colon and kind.replace(".", "").replace("_", "").isalnum():
            return f"{kind.rsplit('.', 1)[-1]}: {message}"
        return last

    def queue_again(self) -> None:
        """Queue a finished batch for a fresh scrape (and a fresh webhook)."""
        StagingBatch.objects.filter(pk=self.pk).update(
            status=StagingBatch.STATUS.queued,
            attempts=0,
            available_at=timezone.now(),
            last_error="",
            notified_at=None,
            webhook_attempts=0,
            modified=timezone.now(),
        )


class ProductQuerySet(models.QuerySet["Product"]):
    def upsert(
        self, records: Iterable[ProductRecord], *, source: str, batch: StagingBatch | None = None
    ) -> UpsertResult:
        """Insert or update products by SKU in one statement; count new and changed ones.

        Idempotent: doing the same records twice leaves the same rows, so an item retried after
        a crash does no harm.
        """
        by_sku = {record.sku: record for record in records}
        if not by_sku:
            return UpsertResult(0, 0)
        existing = set(self.filter(sku__in=by_sku).values_list("sku", flat=True))
        now = timezone.now()
        self.bulk_create(
            [
                Product(  # type: ignore[misc]  # django-stubs: QuerySet["Product"] vs _Model
                    sku=r.sku,
                    name=r.name,
                    price=r.price,
                    category=r.category,
                    in_stock=r.in_stock,
                    url=r.url,
                    source=source,
                    batch=batch,
                    updated=now,
                )
                for r in by_sku.values()
            ],
            update_conflicts=True,
            unique_fields=["sku"],
            update_fields=[
                "name",
                "price",
                "category",
                "in_stock",
                "url",
                "source",
                "batch",
                "updated",
            ],
        )
        return UpsertResult(created=len(by_sku) - len(existing), updated=len(existing))


class Product(models.Model):
    class Source(models.TextChoices):
        SHOP = "shop", "Scraped from the shop"
        CSV = "csv", "Imported from a CSV file"

    sku = models.CharField("SKU", max_length=40, unique=True)
    name = models.CharField(max_length=200)
    category = models.CharField(max_length=100, blank=True)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    in_stock = models.BooleanField(default=True)
    url = models.URLField("URL", max_length=500, blank=True)
    source = models.CharField(max_length=10, choices=Source.choices)
    batch = models.ForeignKey(
        StagingBatch,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="products",
        help_text="The batch that last scraped it.",
    )
    created = models.DateTimeField(default=timezone.now, editable=False)
    updated = models.DateTimeField(default=timezone.now)

    objects = ProductQuerySet.as_manager()

    class Meta:
        ordering = ["sku"]

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"


class CsvImport(models.Model):
    """What became of one CSV file from the inbox (the file itself was the work item)."""

    class Status(models.TextChoices):
        IMPORTED = "imported", "Imported"
        PARTIAL = "partial", "Imported, some rows rejected"
        REJECTED = "rejected", "Rejected"

    file_name = models.CharField(max_length=255)
    checksum = models.CharField("SHA-256", max_length=64)
    status = models.CharField(max_length=10, choices=Status.choices)
    rows_total = models.PositiveIntegerField(default=0)
    rows_imported = models.PositiveIntegerField(default=0)
    rows_rejected = models.PositiveIntegerField(default=0)
    errors = models.TextField(blank=True, help_text="One line per rejected row.")
    imported_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-imported_at", "-id"]
        constraints = [
            # The same file imported twice (a retry after a crash) updates its one record.
            models.UniqueConstraint(fields=["file_name", "checksum"], name="catalog_csv_once")
        ]

    def __str__(self) -> str:
        return self.file_name


def count_by_status(queryset: models.QuerySet[Any]) -> dict[str, int]:
    """``{status: count}`` in one query."""
    return dict(queryset.order_by().values_list("status").annotate(n=models.Count("pk")))
