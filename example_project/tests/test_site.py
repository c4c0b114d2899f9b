"""The project around the handlers: registration, GraphQL, admin."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from catalog.handlers import STORE_HANDLER
from catalog.models import StagingBatch
from django.core.management import call_command
from django.test import Client

import django_workitems as workitems
from django_workitems.models import Handler

from .factories import ProductFactory, StagingBatchFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(django_user_model) -> Client:  # type: ignore[no-untyped-def]
    user = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def test_handlers_are_registered_by_purpose() -> None:
    assert workitems.get_handlers(purpose=workitems.Purpose.INGESTION) == [
        "catalog.import-csv",
        "catalog.scrape-store",
    ]
    assert workitems.get_handlers(purpose="export") == ["catalog.notify-batches"]
    assert "catalog.purge-stale-batches" in workitems.get_handlers(purpose="internal")


def test_graphql_lists_the_scrapers_a_ui_can_offer(admin_client: Client) -> None:
    response = admin_client.post(
        "/graphql/",
        json.dumps({"query": "{ availableHandlers(purpose: INGESTION) }"}),
        content_type="application/json",
    )
    assert response.status_code == 200
    assert response.json() == {
        "data": {"availableHandlers": ["catalog.import-csv", "catalog.scrape-store"]}
    }


def test_graphql_needs_a_login() -> None:
    response = Client().post(
        "/graphql/",
        json.dumps({"query": "{ availableHandlers(purpose: INGESTION) }"}),
        content_type="application/json",
    )
    assert response.json().get("data") is None
    assert response.json()["errors"]


@pytest.mark.parametrize("model", ["stagingbatch", "product", "csvimport"])
def test_admin_changelists_render(admin_client: Client, model: str) -> None:
    StagingBatchFactory(failed=True)
    ProductFactory()
    response = admin_client.get(f"/admin/catalog/{model}/")
    assert response.status_code == 200


def test_admin_queues_failed_batches_again_and_wakes_the_workers(admin_client: Client) -> None:
    failed = StagingBatchFactory(failed=True)
    response = admin_client.post(
        "/admin/catalog/stagingbatch/",
        {"action": "queue_again", "_selected_action": [failed.pk]},
        follow=True,
    )
    assert response.status_code == 200
    failed.refresh_from_db()
    assert (failed.status, failed.attempts, failed.last_error) == (
        StagingBatch.STATUS.queued,
        0,
        "",
    )
    assert Handler.objects.get(name="catalog.scrape-store").run_requested_at is not None


def test_a_batch_saved_queued_wakes_the_scraper(django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    assert StagingBatch.notify_handler == STORE_HANDLER
    Handler.objects.create(name=STORE_HANDLER, purpose="ingestion")  # as workers sync it
    with django_capture_on_commit_callbacks(execute=True):
        StagingBatchFactory()
    assert Handler.objects.get(name=STORE_HANDLER).run_requested_at is not None


@pytest.mark.parametrize(
    ("last_error", "reason"),
    [
        ("", ""),
        (
            "Traceback (most recent call last):\n  File ...\n"
            "catalog.handlers.store.ScrapeError: HTTP 500 from http://127.0.0.1:9/c/x/\n",
            "ScrapeError: HTTP 500 from http://127.0.0.1:9/c/x/",
        ),
        ("Cancelled by the handler", "Cancelled by the handler"),
    ],
)
def test_a_batch_reason_is_the_last_line_of_its_error(last_error: str, reason: str) -> None:
    assert StagingBatch(last_error=last_error).reason == reason


def graphql(client: Client, query: str) -> dict[str, Any]:
    response = client.post("/graphql/", json.dumps({"query": query}), "application/json")
    assert response.status_code == 200, response.content
    return response.json()


def test_graphql_runs_a_scraper_and_shows_its_backlog(admin_client: Client) -> None:
    StagingBatchFactory.create_batch(2)

    ran = graphql(
        admin_client, 'mutation { runWorkItemHandler(name: "catalog.scrape-store") { ok } }'
    )
    handlers = graphql(
        admin_client,
        "{ workItemHandlers(purpose: INGESTION) "
        "{ name isEnabled backlog lastRun { status finishedAt } } }",
    )

    assert ran == {"data": {"runWorkItemHandler": {"ok": True}}}
    assert handlers["data"]["workItemHandlers"] == [
        {"name": "catalog.import-csv", "isEnabled": True, "backlog": 0, "lastRun": None},
        {"name": "catalog.scrape-store", "isEnabled": True, "backlog": 2, "lastRun": None},
    ]


def test_no_migration_is_missing() -> None:
    call_command("makemigrations", "catalog", "--check", "--dry-run", stdout=io.StringIO())
