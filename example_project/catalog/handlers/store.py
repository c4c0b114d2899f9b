"""Ingestion: scrape a shop's listing into products, one staging batch at a time.

``StoreBatchHandler`` is the real-world example of the README: a ``QuerySetHandler`` over
``StagingBatch`` rows, so claiming, retries with back-off and the final ``failed`` come from
the framework, and this module only knows about HTTP and HTML.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from urllib.parse import urljoin, urlsplit

import httpx
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from selectolax.lexbor import LexborHTMLParser

import django_workitems as workitems

from ..models import Product, ProductRecord, StagingBatch

logger = logging.getLogger(__name__)

STORE_HANDLER = "catalog.scrape-store"
USER_AGENT = "django-workitems-example/1.0 (+https://example.invalid/bot)"


class ScrapeError(Exception):
    """A batch cannot be scraped now: a bad status, a time-out, a page without its data."""


@dataclass(frozen=True)
class ListingPage:
    """One page of a category: links to its products, and to the next page if any."""

    product_urls: list[str]
    next_url: str | None


def parse_listing(html: str, url: str) -> ListingPage:
    """Product links (``li.product a``) and the ``rel="next"`` link, made absolute."""
    tree = LexborHTMLParser(html)
    links = [node.attributes.get("href") for node in tree.css("li.product a[href]")]
    next_link = tree.css_first('a[rel="next"][href]')
    return ListingPage(
        product_urls=[urljoin(url, href) for href in links if href],
        next_url=urljoin(url, next_link.attributes["href"] or "") if next_link else None,
    )


def parse_product(html: str, url: str, category: str = "") -> ProductRecord:
    """The product on a product page; :class:`ScrapeError` when the page lacks a field."""
    tree = LexborHTMLParser(html)

    def text(selector: str) -> str:
        node = tree.css_first(selector)
        value = node.text(strip=True) if node is not None else ""
        if not value:
            raise ScrapeError(f"malformed page, no {selector}: {url}")
        return value

    raw_price = text(".price")
    try:
        price = Decimal(raw_price)
    except InvalidOperation:
        raise ScrapeError(f"malformed page, price {raw_price!r}: {url}") from None
    return ProductRecord(
        sku=text(".sku"),
        name=text(".product-name"),
        price=price,
        category=category,
        in_stock=text(".stock").lower() == "in stock",
        url=url,
    )


class StoreBatchHandler(workitems.QuerySetHandler[StagingBatch]):
    """Scrapes each claimed batch: every page of its listing, then every product page.

    The products are written in one transaction at the end, so a batch that fails half-way
    writes nothing and its retry starts clean. Raising re-queues the batch with back-off;
    after ``max_attempts`` it is ``failed``, with the reason in ``last_error``.
    """

    queryset = StagingBatch.objects.all()
    max_attempts = 3
    max_pages = 100
    """A listing whose ``next`` links never end is an error, not an endless scrape."""

    def retry_delay(self, attempts: int) -> float:
        """Back-off from settings (CATALOG_SCRAPE_RETRY_BACKOFF), doubled per attempt."""
        return float(settings.CATALOG_SCRAPE_RETRY_BACKOFF) * 2 ** max(0, attempts - 1)

    def __init__(self) -> None:
        super().__init__()
        # Settings are read per activation, so override_settings works in tests.
        self.allowed_hosts = set(settings.CATALOG_SCRAPE_HOSTS)
        self.timeout = httpx.Timeout(settings.CATALOG_HTTP_TIMEOUT, connect=5.0)
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        """One HTTP session per activation, shared by the pool threads doing its batches.

        Created on first use (an activation with nothing to do opens no connection); an
        ``httpx.Client`` is thread-safe and keeps connections alive between requests.
        """
        with self._client_lock:
            if self._client is None:
                self._client = httpx.Client(
                    timeout=self.timeout,
                    headers={"User-Agent": USER_AGENT},
                    follow_redirects=True,
                )
            return self._client

    def close(self) -> None:
        try:
            super().close()  # writes the buffered successes
        finally:
            if self._client is not None:
                self._client.close()

    def get(self, url: str) -> str:
        """GET a page of an allowed host; :class:`ScrapeError` for anything but a 2xx."""
        host = urlsplit(url).hostname
        if host not in self.allowed_hosts:
            raise ScrapeError(f"host {host!r} is not in CATALOG_SCRAPE_HOSTS: {url}")
        try:
            response = self.client.get(url)
        except httpx.TimeoutException:
            raise ScrapeError(f"timed out after {self.timeout.read}s: {url}") from None
        except httpx.HTTPError as exc:
            raise ScrapeError(f"{type(exc).__name__} ({exc}): {url}") from exc
        if not response.is_success:
            raise ScrapeError(f"HTTP {response.status_code} from {url}")
        return response.text

    def handle(self, batch: StagingBatch, cancel: workitems.CancellationToken) -> None:
        extra = {"handler": STORE_HANDLER, "work_item_id": batch.pk}
        logger.info(
            "Batch %s: scraping %s (attempt %d)",
            batch.pk,
            batch.source_url,
            batch.attempts,
            extra=extra,
        )
        products: dict[str, ProductRecord] = {}
        pages = 0
        url: str | None = batch.source_url
        while url is not None:
            # The token cannot interrupt a request in flight; the timeout bounds that.
            cancel.raise_if_cancelled()
            if pages >= self.max_pages:
                raise ScrapeError(f"more than {self.max_pages} listing pages: {batch.source_url}")
            listing = parse_listing(self.get(url), url)
            pages += 1
            for product_url in listing.product_urls:
                cancel.raise_if_cancelled()
                record = parse_product(self.get(product_url), product_url, batch.category)
                products[record.sku] = record
            logger.debug(
                "Batch %s: page %d, %d products so far", batch.pk, pages, len(products), extra=extra
            )
            url = listing.next_url

        with transaction.atomic():
            result = Product.objects.upsert(
                products.values(), source=Product.Source.SHOP, batch=batch
            )
            # Fenced by the claim: a worker wrongly presumed dead records nothing.
            StagingBatch.objects.filter(batch.outcome_filter()).update(
                pages_fetched=pages,
                products_found=len(products),
                products_created=result.created,
                products_updated=result.updated,
                scraped_at=timezone.now(),
            )
        logger.info(
            "Batch %s: %d pages, %d products (%d new, %d updated)",
            batch.pk,
            pages,
            len(products),
            result.created,
            result.updated,
            extra=extra,
        )
