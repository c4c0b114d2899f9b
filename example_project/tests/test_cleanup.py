"""PurgeStaleBatchesHandler, alone."""

from __future__ import annotations

from datetime import timedelta

import pytest
from catalog.handlers.cleanup import PurgeStaleBatchesHandler
from catalog.models import Product, StagingBatch

import django_workitems as workitems
from django_workitems.testing import run_handler

from .factories import ProductFactory, StagingBatchFactory

pytestmark = pytest.mark.django_db


def test_deletes_finished_batches_past_the_retention_and_keeps_their_products(
    settings,  # type: ignore[no-untyped-def]
) -> None:
    settings.CATALOG_BATCH_RETENTION_DAYS = 30
    old_done = StagingBatchFactory(finished=True, age=timedelta(days=31))
    old_failed = StagingBatchFactory(failed=True, age=timedelta(days=90))
    recent = StagingBatchFactory(finished=True, age=timedelta(days=29))
    old_queued = StagingBatchFactory(age=timedelta(days=90))  # still to do: never purged
    product = ProductFactory(batch=old_done)

    handler = PurgeStaleBatchesHandler()
    assert handler.backlog() == 2
    result = run_handler(handler)

    assert sorted(item.pk for item in result.items) == sorted([old_done.pk, old_failed.pk])
    assert result.succeeded == 2
    assert set(StagingBatch.objects.values_list("pk", flat=True)) == {recent.pk, old_queued.pk}
    product.refresh_from_db()
    assert product.batch is None
    assert Product.objects.count() == 1
    assert run_handler(PurgeStaleBatchesHandler).items == []


def test_fetches_at_most_max_items() -> None:
    StagingBatchFactory.create_batch(5, finished=True, age=timedelta(days=60))
    assert len(run_handler(PurgeStaleBatchesHandler, max_items=3).items) == 3
    assert StagingBatch.objects.count() == 2


def test_a_batch_deleted_meanwhile_is_no_error() -> None:
    batch = StagingBatchFactory(finished=True, age=timedelta(days=60))
    handler = PurgeStaleBatchesHandler()
    cancel = workitems.CancellationToken()
    items = handler.fetch_next(10, cancel)
    StagingBatch.objects.filter(pk=batch.pk).delete()
    handler.process(items[0], cancel)
