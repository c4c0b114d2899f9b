"""Fixtures: the demo shop on loopback, settings pointing at temporary folders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from demo_shop import DemoShop
from django.db import connection


@pytest.fixture(autouse=True)
def catalog_settings(settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Every test gets its own inbox, short timeouts, retries without back-off, no webhook."""
    settings.CATALOG_INBOX_DIR = tmp_path / "inbox"
    settings.CATALOG_HTTP_TIMEOUT = 1.0
    settings.CATALOG_SCRAPE_RETRY_BACKOFF = 0
    settings.CATALOG_SCRAPE_HOSTS = ["127.0.0.1"]
    settings.CATALOG_WEBHOOK_URL = ""
    return settings


@pytest.fixture
def inbox(catalog_settings) -> Path:  # type: ignore[no-untyped-def]
    path = Path(catalog_settings.CATALOG_INBOX_DIR)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def shop() -> Iterator[DemoShop]:
    """A fresh shop per test (its faults count requests), hanging past the 1 s timeout."""
    with DemoShop(seed=42, slow_seconds=0.0, hang_seconds=3.0) as running:
        yield running


def database_url() -> str:
    """A ``DATABASE_URL`` for the database this test runs on, for worker subprocesses."""
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    user = quote(db["USER"] or "", safe="")
    if db["PASSWORD"]:
        user += ":" + quote(db["PASSWORD"], safe="")
    host = db["HOST"] or "127.0.0.1"
    port = db["PORT"] or 5432
    return f"postgres://{user}@{host}:{port}/{quote(db['NAME'], safe='')}"
