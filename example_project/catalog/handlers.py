"""The catalogue's work item handlers, registered in ``CatalogConfig.ready()``.

Each handler only reads in ``fetch_next`` (it claims nothing), so each is registered exclusive
(the default): one process in the deployment runs it at a time, and a process never fetches it
again while items of its previous fetch are still queued or in process.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

import django_workitems as workitems

from .models import Product, ProductExport, ProductImport, Status

logger = logging.getLogger(__name__)

IMPORT_HANDLER = "catalog.import-products"
EXPORT_HANDLER = "catalog.export-products"
PURGE_HANDLER = "catalog.purge-old-imports"


def parse_payload(payload: str) -> Iterator[tuple[str, str, Decimal]]:
    """Yield ``(sku, name, price)`` per ``sku,name,price`` line; skip blank and ``#`` lines."""
    for number, row in enumerate(csv.reader(payload.splitlines()), start=1):
        if not row or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 3:
            raise ValueError(f"line {number}: expected sku,name,price, got {len(row)} fields")
        sku, name, raw_price = (field.strip() for field in row)
        try:
            price = Decimal(raw_price)
        except InvalidOperation:
            raise ValueError(f"line {number}: price {raw_price!r} is not a number") from None
        if not sku or not name or price < 0:
            raise ValueError(f"line {number}: sku and name are required, price must be >= 0")
        yield sku, name, price


def request_export() -> None:
    """Queue one export (unless one is already waiting) and wake the workers to run it."""
    # The partial unique constraint makes this safe when two imports finish at once.
    ProductExport.objects.get_or_create(status=Status.QUEUED)
    workitems.notify(EXPORT_HANDLER)


class ImportProductsHandler(workitems.WorkItemHandler[ProductImport]):
    """Loads queued imports into products; a bad line fails the whole import."""

    def fetch_next(
        self, max_items: int, cancel: workitems.CancellationToken
    ) -> list[ProductImport]:
        return list(ProductImport.objects.filter(status=Status.QUEUED)[:max_items])

    def process(self, item: ProductImport, cancel: workitems.CancellationToken) -> None:
        try:
            with transaction.atomic():
                count = 0
                for sku, name, price in parse_payload(item.payload):
                    cancel.raise_if_cancelled()
                    Product.objects.update_or_create(
                        sku=sku, defaults={"name": name, "price": price, "source": item}
                    )
                    count += 1
                ProductImport.objects.filter(pk=item.pk).update(
                    status=Status.DONE,
                    products_imported=count,
                    error="",
                    finished_at=timezone.now(),
                )
        except workitems.Cancelled:
            raise  # shutting down: the import stays queued and is done next time
        except Exception as exc:
            # Outside the rolled-back transaction, so the failure sticks and the import is not
            # fetched again; re-raising records the failure on the run.
            ProductImport.objects.filter(pk=item.pk).update(
                status=Status.FAILED, error=str(exc), finished_at=timezone.now()
            )
            raise
        logger.info(
            "Imported %d products from %s",
            count,
            item,
            extra={"handler": IMPORT_HANDLER, "work_item_id": item.pk},
        )
        request_export()

    def backlog(self) -> int:
        return ProductImport.objects.filter(status=Status.QUEUED).count()


class PurgeOldImportsHandler(workitems.WorkItemHandler[ProductImport]):
    """Deletes finished imports older than ``keep``; their products stay."""

    keep = timedelta(days=30)

    def _old_imports(self) -> QuerySet[ProductImport]:
        return ProductImport.objects.filter(
            status=Status.DONE, finished_at__lt=timezone.now() - self.keep
        )

    def fetch_next(
        self, max_items: int, cancel: workitems.CancellationToken
    ) -> list[ProductImport]:
        return list(self._old_imports().only("pk", "name")[:max_items])

    def process(self, item: ProductImport, cancel: workitems.CancellationToken) -> None:
        item.delete()

    def backlog(self) -> int:
        return self._old_imports().count()


class ExportProductsHandler(workitems.WorkItemHandler[ProductExport]):
    """Writes the whole catalogue to ``CATALOG_EXPORT_DIR`` as JSON, one file per export."""

    chunk_size = 500

    def fetch_next(
        self, max_items: int, cancel: workitems.CancellationToken
    ) -> list[ProductExport]:
        return list(ProductExport.objects.filter(status=Status.QUEUED)[:max_items])

    def process(self, item: ProductExport, cancel: workitems.CancellationToken) -> None:
        export_dir = Path(settings.CATALOG_EXPORT_DIR)
        export_dir.mkdir(parents=True, exist_ok=True)
        started = timezone.now()
        path = export_dir / f"products-{started:%Y%m%d-%H%M%S}-{item.pk}.json"
        partial = path.with_name(path.name + ".partial")
        count = 0
        try:
            with partial.open("w", encoding="utf-8") as out:
                out.write("[")
                products = Product.objects.order_by("sku").values_list("sku", "name", "price")
                for sku, name, price in products.iterator(chunk_size=self.chunk_size):
                    if count % self.chunk_size == 0:
                        cancel.raise_if_cancelled()
                    record = {"sku": sku, "name": name, "price": str(price)}
                    out.write(("," if count else "") + "\n  " + json.dumps(record))
                    count += 1
                out.write("\n]\n")
            os.replace(partial, path)  # readers never see a half-written export
        except workitems.Cancelled:
            partial.unlink(missing_ok=True)
            raise  # the export stays queued
        except Exception as exc:
            partial.unlink(missing_ok=True)
            ProductExport.objects.filter(pk=item.pk).update(
                status=Status.FAILED, error=str(exc), finished_at=timezone.now()
            )
            raise
        item.status = Status.DONE
        item.file = str(path)
        item.product_count = count
        item.finished_at = timezone.now()
        item.save(update_fields=["status", "file", "product_count", "finished_at"])

    def backlog(self) -> int:
        return ProductExport.objects.filter(status=Status.QUEUED).count()
