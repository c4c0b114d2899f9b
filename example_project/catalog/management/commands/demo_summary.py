"""``manage.py demo_summary``: what the workers did, per handler, from the run history."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db.models import Count, Sum

from catalog.models import Product, ProductExport, ProductImport, Status
from django_workitems.models import HandlerRun, ItemFailure


class Command(BaseCommand):
    help = "Print runs, items and failures per handler, and where to look next."

    def handle(self, *args: Any, **options: Any) -> None:
        rows = (
            HandlerRun.objects.values("handler__name")
            .annotate(
                runs=Count("id"),
                fetched=Sum("items_fetched"),
                succeeded=Sum("items_succeeded"),
                failed=Sum("items_failed"),
            )
            .order_by("handler__name")
        )
        table = [("HANDLER", "RUNS", "ITEMS", "SUCCEEDED", "FAILED")]
        table += [
            (
                r["handler__name"],
                str(r["runs"]),
                str(r["fetched"]),
                str(r["succeeded"]),
                str(r["failed"]),
            )
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        self.stdout.write("\nRun history (django_workitems.HandlerRun):")
        for row in table:
            self.stdout.write(
                "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            )

        failures = ItemFailure.objects.select_related("run__handler").order_by("-occurred_at")[:5]
        if failures:
            self.stdout.write("\nRecent item failures:")
            for failure in failures:
                self.stdout.write(
                    f"  {failure.run.handler.name} item {failure.item_id}: {failure.message}"
                )

        imports = dict(
            ProductImport.objects.values_list("status").annotate(n=Count("id")).order_by()
        )
        export = (
            ProductExport.objects.filter(status=Status.DONE).order_by("-finished_at", "-id").first()
        )
        self.stdout.write(
            f"\nCatalogue: {Product.objects.count()} products; imports by status: "
            + (", ".join(f"{s} {n}" for s, n in sorted(imports.items())) or "none")
        )
        if export is not None:
            self.stdout.write(f"Latest export: {export.file} ({export.product_count} products)")
        self.stdout.write(
            "\nLook at it in the admin: run `make serve`, open http://127.0.0.1:8000/admin/ "
            "and log in as admin / password admin."
        )
