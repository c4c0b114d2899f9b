"""``manage.py seed_demo``: demo imports and an admin/admin superuser; safe to run again."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.utils import timezone

from catalog.models import ProductImport, Status

QUEUED_IMPORTS = {
    "kitchen": """
        # sku,name,price
        K-100,Chef's knife,49.90
        K-101,Cutting board,19.50
        K-102,Cast-iron pan,39.00
        K-103,Pepper mill,24.00
    """,
    "garden": """
        G-200,Watering can,14.90
        G-201,Pruning shears,22.00
        G-202,Seed tray,4.50
    """,
    # The third line is bad, so this import fails and shows up as an item failure.
    "office": """
        O-300,Desk lamp,35.00
        O-301,Stapler,9.90
        O-302,Notebook,twelve
    """,
}
ARCHIVED_IMPORT = "spring-2023 (archived)"


def _lines(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines())


class Command(BaseCommand):
    help = "Create the demo imports and the superuser admin/admin (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        created = []
        for name, payload in QUEUED_IMPORTS.items():
            _, new = ProductImport.objects.get_or_create(
                name=name, defaults={"payload": _lines(payload)}
            )
            if new:
                created.append(name)
        # Finished long ago: catalog.purge-old-imports deletes it.
        long_ago = timezone.now() - timedelta(days=90)
        _, new = ProductImport.objects.get_or_create(
            name=ARCHIVED_IMPORT,
            defaults={
                "payload": "A-001,Old catalogue,1.00",
                "status": Status.DONE,
                "products_imported": 1,
                "created": long_ago,
                "finished_at": long_ago,
            },
        )
        if new:
            created.append(ARCHIVED_IMPORT)
        self.stdout.write(
            f"Imports created: {', '.join(created)}" if created else "Imports: already seeded"
        )
        if "office" in created:
            self.stdout.write("(the office import has a bad price on purpose: it will fail)")

        user_model = get_user_model()
        if user_model.objects.filter(username="admin").exists():
            self.stdout.write("Superuser admin: already there")
        else:
            user_model.objects.create_superuser("admin", "admin@example.com", "admin")
            self.stdout.write("Superuser admin created (password: admin)")
