"""StoreBatchHandler, alone: run_handler against the loopback shop."""

from __future__ import annotations

from decimal import Decimal

import pytest
from catalog.handlers.store import (
    ScrapeError,
    StoreBatchHandler,
    parse_listing,
    parse_product,
)
from catalog.models import Product, StagingBatch
from demo_shop import HANGING_PRODUCT, MALFORMED_PRODUCT, DemoShop

import django_workitems as workitems
from django_workitems.testing import run_handler

from .factories import StagingBatchFactory

pytestmark = pytest.mark.django_db


def batch_for(shop: DemoShop, category: str) -> StagingBatch:
    return StagingBatchFactory(category=category, shop_url=shop.url)


# -- parsing ------------------------------------------------------------------------------


def test_parse_listing_makes_links_absolute() -> None:
    html = (
        '<ul><li class="product"><a href="/p/A-1">A</a></li>'
        '<li class="product"><a href="/p/A-2">B &amp; C</a></li></ul>'
        '<a rel="next" href="?page=3">Next</a>'
    )
    page = parse_listing(html, "http://127.0.0.1:9/c/x/?page=2")
    assert page.product_urls == ["http://127.0.0.1:9/p/A-1", "http://127.0.0.1:9/p/A-2"]
    assert page.next_url == "http://127.0.0.1:9/c/x/?page=3"


def test_parse_listing_last_page_has_no_next() -> None:
    assert parse_listing("<ul></ul>", "http://127.0.0.1:9/c/x/").next_url is None


def test_parse_product_reads_every_field() -> None:
    html = (
        '<h1 class="product-name">Salt &amp; Pepper Set</h1><span class="sku">KIT-0001</span>'
        '<p class="price">12.50</p><p class="stock">Sold out</p>'
    )
    record = parse_product(html, "http://127.0.0.1:9/p/KIT-0001", "kitchen")
    assert (record.sku, record.name, record.price, record.in_stock, record.category) == (
        "KIT-0001",
        "Salt & Pepper Set",
        Decimal("12.50"),
        False,
        "kitchen",
    )


@pytest.mark.parametrize(
    ("html", "message"),
    [
        ('<h1 class="product-name">Lamp</h1><div class="', "no .price"),
        ('<p class="price">cheap</p><span class="sku">X</span>', "price 'cheap'"),
    ],
)
def test_parse_product_rejects_malformed_pages(html: str, message: str) -> None:
    with pytest.raises(ScrapeError, match=message):
        parse_product(html, "http://127.0.0.1:9/p/X")


# -- handling -----------------------------------------------------------------------------


def test_scrapes_every_page_and_upserts_products(shop: DemoShop) -> None:
    batch = batch_for(shop, "kitchen")

    result = run_handler(StoreBatchHandler)

    assert [item.pk for item in result.items] == [batch.pk]
    assert (result.succeeded, result.failed) == (1, 0)
    batch.refresh_from_db()
    expected = shop.catalogue["kitchen"]
    assert batch.status == StagingBatch.STATUS.succeeded
    assert (batch.pages_fetched, batch.products_found) == (
        shop.page_count("kitchen"),
        len(expected),
    )
    assert (batch.products_created, batch.products_updated) == (len(expected), 0)
    assert batch.scraped_at is not None
    products = {p.sku: p for p in Product.objects.all()}
    assert set(products) == {p.sku for p in expected}
    sample = expected[5]
    assert (products[sample.sku].name, products[sample.sku].price) == (sample.name, sample.price)
    assert products[sample.sku].in_stock == sample.in_stock
    assert products[sample.sku].url == f"{shop.url}/p/{sample.sku}"
    assert products[sample.sku].batch_id == batch.pk
    assert products[sample.sku].source == Product.Source.SHOP


def test_scraping_again_updates_instead_of_duplicating(shop: DemoShop) -> None:
    batch_for(shop, "office")
    run_handler(StoreBatchHandler)
    again = batch_for(shop, "office")

    assert run_handler(StoreBatchHandler).succeeded == 1

    again.refresh_from_db()
    assert (again.products_created, again.products_updated) == (0, len(shop.catalogue["office"]))
    assert Product.objects.count() == len(shop.catalogue["office"])
    assert set(Product.objects.values_list("batch", flat=True)) == {again.pk}


def test_batches_of_one_activation_share_one_session_closed_at_the_end(shop: DemoShop) -> None:
    batch_for(shop, "toys")
    batch_for(shop, "garden")
    handler = StoreBatchHandler()

    result = run_handler(handler)

    assert result.succeeded == 2
    client = handler._client
    assert client is not None and client.is_closed
    assert set(StagingBatch.objects.values_list("status", flat=True)) == {"succeeded"}


def test_an_activation_with_nothing_to_do_opens_no_session() -> None:
    handler = StoreBatchHandler()
    assert run_handler(handler).items == []
    assert handler._client is None


def test_a_server_error_requeues_the_batch_and_the_retry_recovers(shop: DemoShop) -> None:
    batch = batch_for(shop, "outdoor")  # listing page 2 answers 500 once

    first = run_handler(StoreBatchHandler)

    assert first.failed == 1
    assert first.failures[0].item_id == str(batch.pk)
    assert isinstance(first.failures[0].exception, ScrapeError)
    batch.refresh_from_db()
    assert (batch.status, batch.attempts) == (StagingBatch.STATUS.queued, 1)
    assert batch.reason.endswith(f"HTTP 500 from {shop.url}/c/outdoor/?page=2")
    assert not Product.objects.exists(), "a failed batch writes no product"

    second = run_handler(StoreBatchHandler)

    assert second.succeeded == 1
    batch.refresh_from_db()
    assert (batch.status, batch.attempts) == (StagingBatch.STATUS.succeeded, 2)
    assert Product.objects.count() == len(shop.catalogue["outdoor"])


def test_the_retry_waits_for_the_back_off(shop: DemoShop, settings) -> None:  # type: ignore[no-untyped-def]
    settings.CATALOG_SCRAPE_RETRY_BACKOFF = 60
    batch_for(shop, "outdoor")

    assert run_handler(StoreBatchHandler).failed == 1

    assert run_handler(StoreBatchHandler).items == [], "not available before its back-off"


def test_a_page_past_the_timeout_fails_the_attempt(shop: DemoShop) -> None:
    batch = batch_for(shop, "electronics")  # HANGING_PRODUCT hangs once, past the 1 s

    result = run_handler(StoreBatchHandler)

    assert result.failed == 1
    batch.refresh_from_db()
    assert batch.reason.endswith(f"timed out after 1.0s: {shop.url}/p/{HANGING_PRODUCT}")
    assert run_handler(StoreBatchHandler).succeeded == 1


@pytest.mark.parametrize(
    ("category", "reason"),
    [
        ("clearance", "HTTP 500 from {url}/c/clearance/?page=3"),
        ("vintage", "malformed page, no .price: {url}/p/" + MALFORMED_PRODUCT),
    ],
)
def test_a_batch_that_keeps_failing_ends_failed_with_its_reason(
    shop: DemoShop, category: str, reason: str
) -> None:
    batch = batch_for(shop, category)

    outcomes = [
        run_handler(StoreBatchHandler).failed for _ in range(StoreBatchHandler.max_attempts)
    ]

    assert outcomes == [1, 1, 1]
    batch.refresh_from_db()
    assert (batch.status, batch.attempts) == (StagingBatch.STATUS.failed, 3)
    assert batch.reason == "ScrapeError: " + reason.format(url=shop.url)
    assert run_handler(StoreBatchHandler).items == [], "a failed batch is not fetched again"


def test_a_host_outside_the_allow_list_is_never_contacted() -> None:
    batch = StagingBatchFactory(source_url="http://shop.example.com/c/kitchen/")

    result = run_handler(StoreBatchHandler)

    assert result.failed == 1
    assert "'shop.example.com' is not in CATALOG_SCRAPE_HOSTS" in str(result.failures[0].exception)
    batch.refresh_from_db()
    assert batch.attempts == 1


def test_an_endless_listing_is_cut_off(shop: DemoShop) -> None:
    batch_for(shop, "books")
    handler = StoreBatchHandler()
    handler.max_pages = 2

    result = run_handler(handler)

    assert "more than 2 listing pages" in str(result.failures[0].exception)


def test_a_cancelled_activation_gives_the_batch_back_untouched(shop: DemoShop) -> None:
    batch = batch_for(shop, "kitchen")
    cancel = workitems.CancellationToken()
    cancel.cancel()

    result = run_handler(StoreBatchHandler, cancel=cancel)

    # As on a worker's shutdown: nothing started, the claimed batch is handed back.
    assert (result.succeeded, result.failed) == (0, 0)
    assert [b.pk for b in result.released] == [batch.pk]
    assert not shop.hits, "no request was made"
    batch.refresh_from_db()
    assert batch.last_error == "", "a cancellation is not a failure"
    assert (batch.status, batch.attempts) == (StagingBatch.STATUS.queued, 0)


def test_backlog_counts_queued_batches(shop: DemoShop) -> None:
    StagingBatchFactory.create_batch(2)
    StagingBatchFactory(finished=True)
    assert StoreBatchHandler().backlog() == 2
