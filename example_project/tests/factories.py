"""factory-boy factories for the catalog's models."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import factory
from catalog.models import Product, StagingBatch
from django.utils import timezone


class StagingBatchFactory(factory.django.DjangoModelFactory):
    """A queued batch; ``StagingBatchFactory(finished=True, age=timedelta(days=90))`` etc."""

    class Meta:
        model = StagingBatch
        skip_postgeneration_save = True

    class Params:
        shop_url = "http://127.0.0.1:9"  # the discard port: never contacted unless a test does
        finished = factory.Trait(
            status=StagingBatch.STATUS.succeeded,
            attempts=1,
            pages_fetched=2,
            products_found=20,
            scraped_at=factory.LazyFunction(timezone.now),
        )
        failed = factory.Trait(
            status=StagingBatch.STATUS.failed,
            attempts=3,
            last_error=factory.LazyAttribute(
                lambda b: (
                    "Traceback (most recent call last):\n  ...\n"
                    f"catalog.handlers.store.ScrapeError: HTTP 500 from {b.source_url}\n"
                )
            ),
        )

    category = factory.Iterator(["kitchen", "garden", "office", "toys", "books"])
    source_url = factory.LazyAttribute(lambda b: f"{b.shop_url}/c/{b.category}/")

    @factory.post_generation
    def age(obj: StagingBatch, create: bool, extracted: timedelta | None, **kwargs: Any) -> None:
        """Backdate ``created`` and ``modified`` (which saving sets to now) by ``age``."""
        if create and extracted:
            then = timezone.now() - extracted
            StagingBatch.objects.filter(pk=obj.pk).update(created=then, modified=then)
            obj.created = obj.modified = then


class ProductFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Product

    sku = factory.Sequence(lambda n: f"TST-{n:04d}")
    name = factory.Sequence(lambda n: f"Test product {n}")
    category = "kitchen"
    price = factory.Sequence(lambda n: Decimal(100 + n) / 100)
    source = Product.Source.SHOP
