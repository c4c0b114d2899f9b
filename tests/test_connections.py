"""Connection hygiene: every thread the engine starts closes the connections it opened."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection
from django.db.backends.signals import connection_created

from django_workitems.background import run_once
from tests.conftest import ListHandler, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class OrmHandler(ListHandler):
    """Touches the database in fetch and process, so every thread opens a connection."""

    def fetch_next(self, max_items, cancel):
        from django_workitems.models import Handler

        Handler.objects.count()
        return super().fetch_next(max_items, cancel)

    def process(self, item, cancel):
        from django_workitems.models import HandlerRun

        HandlerRun.objects.exists()
        super().process(item, cancel)


def server_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_no_connection_leaks_after_50_cycles(registry, recorder):
    created: list[Any] = []
    main = threading.get_ident()

    def collect(sender, connection, **kwargs):
        if threading.get_ident() != main:
            created.append(connection)

    sources = {name: [{"id": i} for i in range(50 * 4)] for name in ("a", "b")}
    for name, source in sources.items():
        registry.add_handler(
            lambda source=source, name=name: OrmHandler(source, recorder, name),
            name=name,
            max_items_per_cycle=4,
        )
    before = server_connections() if connection.vendor == "postgresql" else None
    connection_created.connect(collect)
    try:
        for _ in range(50):
            result = run_once(registry=registry)
            assert result.ok
    finally:
        connection_created.disconnect(collect)

    assert recorder.count("a:done") == recorder.count("b:done") == 200
    assert created, "the pool threads never opened a connection"
    leaked = [c for c in created if c.connection is not None]
    assert not leaked, f"{len(leaked)} of {len(created)} thread connections left open"
    if before is not None:
        wait_for(
            lambda: server_connections() <= before, timeout=10, message="server connections back"
        )


def test_the_listener_needs_psycopg_3_2_and_says_so(monkeypatch, caplog):
    from django.db import connection

    from django_workitems import wakeups

    if connection.vendor != "postgresql":
        assert not wakeups.Listener.supported()
        return
    assert wakeups.Listener.supported()
    monkeypatch.setattr(wakeups, "_psycopg_version", lambda: "3.1.18")
    assert not wakeups.Listener.supported()
    assert "install psycopg>=3.2" in caplog.text
