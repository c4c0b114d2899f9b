"""End to end: the flow of ``make demo``, with a real ``runworkitems`` process and the shop."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from catalog.demo import DemoError, run_demo
from catalog.models import CsvImport, Product, StagingBatch
from demo_shop import CATEGORIES, MALFORMED_PRODUCT, generate_catalogue

from django_workitems.models import HandlerRun, ItemFailure, RunStatus, Worker

from .conftest import database_url


@pytest.mark.django_db(transaction=True)  # the worker process must see what the test writes
def test_the_demo_drains_its_work_and_records_the_history(tmp_path: Path) -> None:
    out = io.StringIO()

    result = run_demo(
        out,
        http_timeout=2.0,  # generous: a loaded machine must not time out by accident
        timeout=120,
        worker_env={"DATABASE_URL": database_url()},
        log_path=tmp_path / "worker.log",
    )

    log = (tmp_path / "worker.log").read_text()
    assert result.worker_exit_code == 0, log

    # Products: every category but the two that fail, and the good rows of the CSV files.
    catalogue = generate_catalogue(42)
    scraped = {p.sku: p for slug, items in catalogue.items() for p in items}
    expected = {sku for sku, p in scraped.items() if p.category not in ("clearance", "vintage")}
    assert set(Product.objects.filter(source="shop").values_list("sku", flat=True)) == expected
    sample = Product.objects.get(sku="OUT-0013")  # on the outdoor page that failed once
    assert (sample.name, sample.price) == (scraped["OUT-0013"].name, scraped["OUT-0013"].price)
    assert Product.objects.filter(source="csv").count() == 12 + 5

    # Batches: two recovered on their retry, two failed for good, with their reasons.
    batches = {b.category: b for b in StagingBatch.objects.all()}
    assert set(batches) == set(CATEGORIES), "the stale batches were purged"
    assert {c for c, b in batches.items() if b.status == "failed"} == {"clearance", "vintage"}
    assert batches["outdoor"].status == batches["electronics"].status == "succeeded"
    assert batches["outdoor"].attempts == batches["electronics"].attempts == 2
    assert batches["kitchen"].attempts == 1
    assert batches["clearance"].attempts == batches["vintage"].attempts == 3
    assert batches["clearance"].reason.endswith("/c/clearance/?page=3")
    assert batches["vintage"].reason.endswith(
        f"malformed page, no .price: {_url(batches)}/p/{MALFORMED_PRODUCT}"
    )
    assert all(b.notified_at is not None for b in batches.values())
    assert sorted(p["batch"] for p in result.webhooks) == sorted(b.pk for b in batches.values())

    # CSV files: one partial, one rejected.
    imports = dict(CsvImport.objects.values_list("file_name", "status"))
    assert imports == {
        "supplier-a.csv": "imported",
        "supplier-b.csv": "partial",
        "legacy-export.csv": "rejected",
    }

    # Run history: nothing left running, the failures recorded per item.
    runs = HandlerRun.objects.filter(started_at__gte=result.started)
    assert not runs.filter(status__in=[RunStatus.RUNNING, RunStatus.FAILED]).exists()
    per_handler = {
        name: sum(r.items_failed for r in runs if r.handler.name == name)
        for name in runs.values_list("handler__name", flat=True).distinct()
    }
    assert per_handler == {
        "catalog.scrape-store": 2 + 3 + 3,  # outdoor, electronics once; clearance, vintage 3x
        "catalog.import-csv": 1,
        "catalog.notify-batches": 0,
        "catalog.purge-stale-batches": 0,
    }
    scrape_failures = ItemFailure.objects.filter(run__handler__name="catalog.scrape-store")
    assert set(scrape_failures.values_list("error_type", flat=True)) == {
        "catalog.handlers.store.ScrapeError"
    }
    assert ItemFailure.objects.get(run__handler__name="catalog.import-csv").item_id == (
        "legacy-export.csv"
    )
    workers = Worker.objects.all()
    assert workers and all(w.stopped_at is not None for w in workers), "each drain exited cleanly"

    # What make demo prints.
    text = out.getvalue()
    assert "Drained: the worker exited 0 after" in text
    assert "stopping the worker with SIGTERM" not in text, "--drain ends by itself"
    assert "catalog.scrape-store" in text and "admin / password admin" in text


def _url(batches: dict[str, StagingBatch]) -> str:
    return batches["kitchen"].source_url.removesuffix("/c/kitchen/")


@pytest.mark.django_db(transaction=True)
def test_a_demo_that_runs_out_of_time_still_stops_its_worker_cleanly(tmp_path: Path) -> None:
    out = io.StringIO()

    with pytest.raises(DemoError, match="not drained within 3s"):
        run_demo(
            out,
            timeout=3,
            worker_env={"DATABASE_URL": database_url()},
            log_path=tmp_path / "worker.log",
        )

    assert "Giving up: stopping the worker with SIGTERM" in out.getvalue()
    # Whatever it was doing, SIGTERM gave it back: nothing stays claimed or running.
    assert not StagingBatch.objects.filter(status=StagingBatch.STATUS.processing).exists()
    assert not HandlerRun.objects.filter(status=RunStatus.RUNNING).exists()
