"""``manage.py seed_demo``: the demo's work, to run a worker by hand (see the Makefile's shop)."""

from __future__ import annotations

from typing import Any

from demo_shop import CATEGORIES
from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from catalog.demo import seed


class Command(BaseCommand):
    help = (
        "Replace the catalogue's batches, products and inbox with the demo's, for a shop at "
        "--shop-url (start one with `make shop`), and create the superuser admin/admin."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--shop-url", default="http://127.0.0.1:8001")

    def handle(self, *args: Any, **options: Any) -> None:
        lines = seed(
            options["shop_url"].rstrip("/"), list(CATEGORIES), inbox=settings.CATALOG_INBOX_DIR
        )
        for line in lines:
            self.stdout.write(line)
