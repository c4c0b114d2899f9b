"""BatchWebhookHandler, alone: notifications to the demo shop's webhook endpoint."""

from __future__ import annotations

import pytest
from catalog.handlers.webhook import BatchWebhookHandler, WebhookError
from catalog.models import StagingBatch
from demo_shop import DemoShop

from django_workitems.testing import run_handler

from .factories import ProductFactory, StagingBatchFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def webhook(shop: DemoShop, settings) -> DemoShop:  # type: ignore[no-untyped-def]
    settings.CATALOG_WEBHOOK_URL = shop.webhook_url
    return shop


def test_posts_one_notification_per_finished_batch(webhook: DemoShop) -> None:
    done = StagingBatchFactory(finished=True, category="kitchen")
    ProductFactory(sku="KIT-1", name="Knife", price="9.50", batch=done)
    failed = StagingBatchFactory(failed=True, category="clearance")
    StagingBatchFactory()  # queued: nothing to tell yet

    result = run_handler(BatchWebhookHandler)

    assert sorted(item.pk for item in result.items) == sorted([done.pk, failed.pk])
    assert result.succeeded == 2
    received = {payload["batch"]: payload for payload in webhook.webhooks}
    assert received[done.pk]["event"] == "batch.succeeded"
    assert received[done.pk]["products"] == [
        {"sku": "KIT-1", "name": "Knife", "price": "9.50", "in_stock": True}
    ]
    assert received[failed.pk]["event"] == "batch.failed"
    assert received[failed.pk]["reason"].endswith("HTTP 500 from http://127.0.0.1:9/c/clearance/")
    assert StagingBatch.objects.exclude(notified_at=None).count() == 2
    assert run_handler(BatchWebhookHandler).items == [], "each batch is notified once"


def test_a_refused_notification_fails_and_is_retried_until_max_attempts(
    shop: DemoShop,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    settings.CATALOG_WEBHOOK_URL = f"{shop.url}/no-such-endpoint"
    batch = StagingBatchFactory(finished=True)

    for attempt in range(1, BatchWebhookHandler.max_attempts + 1):
        result = run_handler(BatchWebhookHandler)
        assert result.failed == 1
        assert isinstance(result.failures[0].exception, WebhookError)
        assert "HTTP 404" in str(result.failures[0].exception)
        batch.refresh_from_db()
        assert (batch.webhook_attempts, batch.notified_at) == (attempt, None)

    assert run_handler(BatchWebhookHandler).items == [], "given up after max_attempts"


def test_an_unreachable_receiver_fails_the_item(settings) -> None:  # type: ignore[no-untyped-def]
    settings.CATALOG_WEBHOOK_URL = "http://127.0.0.1:9/hook"  # nothing listens on loopback:9
    StagingBatchFactory(finished=True)

    result = run_handler(BatchWebhookHandler)

    assert result.failed == 1
    assert "ConnectError" in str(result.failures[0].exception)


def test_without_a_webhook_url_there_is_nothing_to_do() -> None:
    StagingBatchFactory(finished=True)
    handler = BatchWebhookHandler()
    assert run_handler(handler).items == []
    assert handler.backlog() is None
