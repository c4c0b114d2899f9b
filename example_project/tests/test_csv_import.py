"""CsvImportHandler, alone: files in a temporary inbox, run_handler."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest
from catalog.handlers.csv_import import CsvFormatError, CsvImportHandler, parse_csv
from catalog.models import CsvImport, Product

from django_workitems.testing import run_handler

from .factories import ProductFactory

pytestmark = pytest.mark.django_db

HEADER = "sku,name,price,category,in_stock\n"


def drop(inbox: Path, name: str, text: str | bytes, mtime: float | None = None) -> Path:
    path = inbox / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


# -- parsing ------------------------------------------------------------------------------


def test_parse_csv_reports_each_bad_row_and_keeps_the_good_ones() -> None:
    parsed = parse_csv(
        HEADER
        + "A-1,Apple,1.5,fruit,yes\n"
        + "A-2,Pear,cheap,fruit,yes\n"
        + ",Nameless,1,fruit,yes\n"
        + "A-3,Plum,-1,fruit,yes\n"
        + "A-4,Fig,NaN,fruit,yes\n"
        + "A-5,Kiwi,2,fruit,perhaps\n"
        + "A-1,Apple again,1,fruit,yes\n"
        + "A-6,Lime,1,fruit,yes,extra\n"
        + 'A-7,"Lemon, unwaxed",0.99,,no\n'
    )
    assert parsed.rows == 9
    assert [(r.sku, r.name, r.price, r.in_stock) for r in parsed.records] == [
        ("A-1", "Apple", Decimal("1.50"), True),
        ("A-7", "Lemon, unwaxed", Decimal("0.99"), False),
    ]
    assert parsed.errors == [
        "line 3: price 'cheap' is not a number",
        "line 4: sku and name are required",
        "line 5: price '-1' must be a number >= 0",
        "line 6: price 'NaN' must be a number >= 0",
        "line 7: in_stock 'perhaps' is not yes or no",
        "line 8: SKU A-1 already on line 2",
        "line 9: more fields than the header has",
    ]


@pytest.mark.parametrize("text", ["", "sku;name;price\nA;B;1\n", "sku,name\nA,B\n"])
def test_parse_csv_rejects_a_file_without_the_required_columns(text: str) -> None:
    with pytest.raises(CsvFormatError, match="the header must name the columns sku, name, price"):
        parse_csv(text)


def test_parse_csv_takes_the_header_in_any_case_and_order() -> None:
    parsed = parse_csv(" Price ,SKU,Name\n3.00,B-1,Bolt\n")
    assert [(r.sku, r.name, r.price) for r in parsed.records] == [("B-1", "Bolt", Decimal("3.00"))]


# -- handling -----------------------------------------------------------------------------


def test_a_clean_file_is_imported_and_moved_to_done(inbox: Path) -> None:
    drop(inbox, "fruit.csv", HEADER + "A-1,Apple,1.50,fruit,yes\nA-2,Pear,2,fruit,no\n")

    result = run_handler(CsvImportHandler)

    assert [item.id for item in result.items] == ["fruit.csv"]
    assert result.succeeded == 1
    assert sorted(Product.objects.values_list("sku", "price", "in_stock", "source")) == [
        ("A-1", Decimal("1.50"), True, "csv"),
        ("A-2", Decimal("2.00"), False, "csv"),
    ]
    record = CsvImport.objects.get()
    assert (record.file_name, record.status, record.rows_total, record.rows_imported) == (
        "fruit.csv",
        CsvImport.Status.IMPORTED,
        2,
        2,
    )
    assert not (inbox / "fruit.csv").exists()
    assert (inbox / "done" / "fruit.csv").exists()
    assert not (inbox / "done" / "fruit.csv.errors.txt").exists()


def test_bad_rows_are_reported_not_fatal(inbox: Path) -> None:
    drop(inbox, "mixed.csv", HEADER + "A-1,Apple,1.50,fruit,yes\nA-2,Pear,cheap,fruit,yes\n")

    result = run_handler(CsvImportHandler)

    assert (result.succeeded, result.failed) == (1, 0)
    assert list(Product.objects.values_list("sku", flat=True)) == ["A-1"]
    record = CsvImport.objects.get()
    assert (record.status, record.rows_imported, record.rows_rejected) == ("partial", 1, 1)
    assert record.errors == "line 3: price 'cheap' is not a number"
    report = inbox / "done" / "mixed.csv.errors.txt"
    assert report.read_text() == "line 3: price 'cheap' is not a number\n"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("sku;name;price\nA;B;1\n", "the header must name the columns"),
        (b"sku,name,price\nA,\xff\xfe,1\n", "not UTF-8 text"),
    ],
)
def test_an_unreadable_file_fails_its_item_and_is_set_aside(
    inbox: Path, content: str | bytes, reason: str
) -> None:
    drop(inbox, "bad.csv", content, mtime=1_000)
    drop(inbox, "good.csv", HEADER + "A-1,Apple,1,fruit,yes\n", mtime=2_000)

    result = run_handler(CsvImportHandler)

    assert (result.succeeded, result.failed) == (1, 1)
    assert result.failures[0].item_id == "bad.csv"
    assert isinstance(result.failures[0].exception, CsvFormatError)
    assert reason in str(result.failures[0].exception)
    assert (inbox / "rejected" / "bad.csv").exists()
    rejected = CsvImport.objects.get(file_name="bad.csv")
    assert rejected.status == CsvImport.Status.REJECTED
    assert reason in rejected.errors
    assert run_handler(CsvImportHandler).items == [], "neither file is fetched again"


def test_fetches_the_oldest_files_first_and_only_csv_files(inbox: Path) -> None:
    for index, name in enumerate(["c.csv", "a.csv", "b.csv"]):
        drop(inbox, name, HEADER, mtime=1_000 + index)
    drop(inbox, "notes.txt", "not a CSV")
    drop(inbox, "upload.csv.part", HEADER)
    (inbox / "done").mkdir()
    drop(inbox / "done", "old.csv", HEADER)

    handler = CsvImportHandler()
    assert [item.id for item in run_handler(handler, max_items=2).items] == ["c.csv", "a.csv"]
    assert handler.backlog() == 1


def test_an_updated_file_dropped_again_updates_products_and_keeps_both_files(
    inbox: Path,
) -> None:
    ProductFactory(sku="A-1", name="Apple", price=Decimal("9.99"))
    drop(inbox, "daily.csv", HEADER + "A-1,Apple,1.00,fruit,yes\n")
    run_handler(CsvImportHandler)
    drop(inbox, "daily.csv", HEADER + "A-1,Apple,1.25,fruit,yes\n")

    assert run_handler(CsvImportHandler).succeeded == 1

    assert Product.objects.get(sku="A-1").price == Decimal("1.25")
    assert CsvImport.objects.filter(file_name="daily.csv").count() == 2
    assert len(list((inbox / "done").glob("daily*.csv"))) == 2


def test_no_inbox_means_nothing_to_do(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings.CATALOG_INBOX_DIR = tmp_path / "missing"
    handler = CsvImportHandler()
    assert run_handler(handler).items == []
    assert handler.backlog() == 0
