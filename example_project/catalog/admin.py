from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

import django_workitems as workitems

from .handlers import STORE_HANDLER
from .models import CsvImport, Product, StagingBatch


@admin.register(StagingBatch)
class StagingBatchAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "category",
        "status",
        "attempts",
        "pages_fetched",
        "products_found",
        "reason",
        "modified",
        "notified_at",
    ]
    list_filter = ["status", "category"]
    search_fields = ["source_url", "category"]
    date_hierarchy = "created"
    fields = [
        "source_url",
        "category",
        "status",
        "attempts",
        "available_at",
        "claimed_by",
        "claimed_at",
        "pages_fetched",
        "products_found",
        "products_created",
        "products_updated",
        "scraped_at",
        "notified_at",
        "webhook_attempts",
        "last_error",
        "created",
        "modified",
    ]
    readonly_fields = [
        f for f in fields if isinstance(f, str) and f not in ("source_url", "category")
    ]
    actions = ["queue_again"]

    @admin.display(description="reason")
    def reason(self, batch: StagingBatch) -> str:
        return batch.reason

    @admin.action(description="Scrape the selected batches again")
    def queue_again(self, request: HttpRequest, queryset: QuerySet[StagingBatch]) -> None:
        batches = list(queryset.exclude(status=StagingBatch.STATUS.processing))
        for batch in batches:
            batch.queue_again()
        workitems.notify(STORE_HANDLER)  # a running worker picks them up within a second
        self.message_user(request, f"{len(batches)} batches queued.", messages.SUCCESS)


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["sku", "name", "category", "price", "in_stock", "source", "batch", "updated"]
    list_filter = ["source", "in_stock", "category"]
    list_select_related = ["batch"]
    search_fields = ["sku", "name"]


@admin.register(CsvImport)
class CsvImportAdmin(admin.ModelAdmin):
    list_display = [
        "file_name",
        "status",
        "rows_total",
        "rows_imported",
        "rows_rejected",
        "imported_at",
    ]
    list_filter = ["status"]
    search_fields = ["file_name"]
    readonly_fields = [
        "file_name",
        "checksum",
        "status",
        "rows_total",
        "rows_imported",
        "rows_rejected",
        "errors",
        "imported_at",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # records of imports are written by the handler, not by hand
