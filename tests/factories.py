"""factory-boy factories for the app's models."""

from __future__ import annotations

import factory
from django.utils import timezone

from django_workitems.handlers import Purpose
from django_workitems.models import Handler, HandlerRun, ItemFailure, RunStatus, Worker


class WorkerFactory(factory.django.DjangoModelFactory[Worker]):
    class Meta:
        model = Worker

    hostname = "test-host"
    pid = factory.Sequence(lambda n: 1000 + n)


class HandlerFactory(factory.django.DjangoModelFactory[Handler]):
    class Meta:
        model = Handler
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"handler-{n}")
    purpose = Purpose.INTERNAL
    max_items_per_cycle = 10
    handler_class = "tests.handlers.Example"


class HandlerRunFactory(factory.django.DjangoModelFactory[HandlerRun]):
    class Meta:
        model = HandlerRun

    handler = factory.SubFactory(HandlerFactory)
    status = RunStatus.SUCCEEDED
    started_at = factory.LazyFunction(timezone.now)
    finished_at = factory.LazyAttribute(
        lambda run: run.started_at if run.status != RunStatus.RUNNING else None
    )
    items_fetched = 3
    items_succeeded = 3
    items_failed = 0


class ItemFailureFactory(factory.django.DjangoModelFactory[ItemFailure]):
    class Meta:
        model = ItemFailure

    run = factory.SubFactory(
        HandlerRunFactory, status=RunStatus.PARTIAL, items_succeeded=2, items_failed=1
    )
    item_id = factory.Sequence(str)
    error_type = "builtins.ValueError"
    message = "bad item"
    traceback = "Traceback (most recent call last):\nValueError: bad item\n"
