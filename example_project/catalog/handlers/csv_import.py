"""Ingestion: CSV files dropped into a folder, each file a work item.

Suppliers (or people) drop ``*.csv`` files into ``CATALOG_INBOX_DIR``; write them under another
name and rename them into place, so that a half-written file is never picked up. Each file is
imported and moved to ``done/`` (with a ``.errors.txt`` report beside it when rows were
rejected), or to ``rejected/`` when it cannot be read as a product CSV at all.

The work items live in the file system, not in the database: ``fetch_next`` lists the folder
and claims nothing, so the handler is registered exclusive (one process at a time).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

import django_workitems as workitems

from ..models import CsvImport, Product, ProductRecord

logger = logging.getLogger(__name__)

CSV_IMPORT_HANDLER = "catalog.import-csv"
REQUIRED_COLUMNS = ("sku", "name", "price")
TRUE_WORDS = {"", "1", "yes", "y", "true", "in stock"}
FALSE_WORDS = {"0", "no", "n", "false", "sold out"}


class CsvFormatError(ValueError):
    """The file as a whole is not a product CSV (no header, missing columns, not UTF-8)."""


@dataclass(frozen=True)
class InboxFile:
    """A CSV file waiting in the inbox; its name is its id in the run history."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name


@dataclass
class ParsedCsv:
    records: list[ProductRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rows: int = 0


def parse_csv(text: str) -> ParsedCsv:
    """Products of a ``sku,name,price[,category,in_stock]`` CSV; bad rows become errors."""
    reader = csv.DictReader(io.StringIO(text))
    columns = [name.strip().lower() for name in reader.fieldnames or ()]
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise CsvFormatError(
            f"the header must name the columns {', '.join(REQUIRED_COLUMNS)}; "
            f"missing {', '.join(missing)} (header: {','.join(columns) or 'none'})"
        )
    reader.fieldnames = columns
    parsed = ParsedCsv()
    seen: dict[str, int] = {}
    for row in reader:
        parsed.rows += 1
        line = reader.line_num
        try:
            record = _record(row)
        except ValueError as exc:
            parsed.errors.append(f"line {line}: {exc}")
            continue
        if record.sku in seen:
            parsed.errors.append(
                f"line {line}: SKU {record.sku} already on line {seen[record.sku]}"
            )
            continue
        seen[record.sku] = line
        parsed.records.append(record)
    return parsed


def _record(row: dict[str, str | None]) -> ProductRecord:
    def value(name: str) -> str:
        return (row.get(name) or "").strip()

    if None in row:
        raise ValueError("more fields than the header has")
    sku, name, raw_price = value("sku"), value("name"), value("price")
    if not sku or not name:
        raise ValueError("sku and name are required")
    try:
        price = Decimal(raw_price)
    except InvalidOperation:
        raise ValueError(f"price {raw_price!r} is not a number") from None
    if not price.is_finite() or price < 0:
        raise ValueError(f"price {raw_price!r} must be a number >= 0")
    stock = value("in_stock").lower()
    if stock not in TRUE_WORDS | FALSE_WORDS:
        raise ValueError(f"in_stock {stock!r} is not yes or no")
    return ProductRecord(
        sku=sku,
        name=name,
        price=price.quantize(Decimal("0.01")),
        category=value("category"),
        in_stock=stock in TRUE_WORDS,
    )


class CsvImportHandler(workitems.WorkItemHandler[InboxFile]):
    """Imports the valid rows of each file in one transaction and reports the bad ones."""

    def __init__(self) -> None:
        self.inbox = Path(settings.CATALOG_INBOX_DIR)

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[InboxFile]:
        if not self.inbox.is_dir():
            return []
        waiting = []
        for path in self.inbox.glob("*.csv"):
            try:
                if path.is_file():
                    waiting.append((path.stat().st_mtime, path.name, path))
            except FileNotFoundError:  # taken away while we looked
                continue
        return [InboxFile(path) for _, _, path in sorted(waiting)[:max_items]]

    def process(self, item: InboxFile, cancel: workitems.CancellationToken) -> None:
        extra = {"handler": CSV_IMPORT_HANDLER, "work_item_id": item.id}
        data = item.path.read_bytes()
        checksum = hashlib.sha256(data).hexdigest()
        try:
            parsed = parse_csv(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, CsvFormatError) as exc:
            reason = str(exc) if isinstance(exc, CsvFormatError) else "not UTF-8 text"
            CsvImport.objects.update_or_create(
                file_name=item.id,
                checksum=checksum,
                defaults={"status": CsvImport.Status.REJECTED, "errors": reason},
            )
            self._move(item.path, "rejected")
            # Raising records the file as a failed item of the run, with this reason.
            raise CsvFormatError(f"{item.id} rejected: {reason}") from exc

        cancel.raise_if_cancelled()  # last point where leaving the file in the inbox is free
        with transaction.atomic():
            result = Product.objects.upsert(parsed.records, source=Product.Source.CSV)
            CsvImport.objects.update_or_create(
                file_name=item.id,
                checksum=checksum,
                defaults={
                    "status": CsvImport.Status.PARTIAL
                    if parsed.errors
                    else CsvImport.Status.IMPORTED,
                    "rows_total": parsed.rows,
                    "rows_imported": len(parsed.records),
                    "rows_rejected": len(parsed.errors),
                    "errors": "\n".join(parsed.errors),
                    "imported_at": timezone.now(),
                },
            )
        # After the commit: a crash in between imports the file again, which is harmless.
        moved = self._move(item.path, "done")
        if parsed.errors:
            report = moved.with_name(moved.name + ".errors.txt")
            report.write_text("\n".join(parsed.errors) + "\n", encoding="utf-8")
            for error in parsed.errors:
                logger.warning("%s: rejected %s", item.id, error, extra=extra)
        logger.info(
            "%s: %d rows, %d imported (%d new, %d updated), %d rejected",
            item.id,
            parsed.rows,
            len(parsed.records),
            result.created,
            result.updated,
            len(parsed.errors),
            extra=extra,
        )

    def _move(self, path: Path, folder: str) -> Path:
        """Move a processed file out of the inbox, so it is not fetched again."""
        target_dir = self.inbox / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / path.name
        if target.exists():  # the same name dropped again later: keep both
            target = target_dir / f"{path.stem}-{timezone.now():%Y%m%d%H%M%S%f}{path.suffix}"
        os.replace(path, target)
        return target

    def backlog(self) -> int:
        return len(list(self.inbox.glob("*.csv"))) if self.inbox.is_dir() else 0
