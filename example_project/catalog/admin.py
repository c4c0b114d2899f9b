from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

import django_workitems as workitems

from .handlers import IMPORT_HANDLER
from .models import Product, ProductExport, ProductImport, Status


@admin.register(ProductImport)
class ProductImportAdmin(admin.ModelAdmin):
    list_display = ["name", "status", "products_imported", "created", "finished_at"]
    list_filter = ["status"]
    search_fields = ["name"]
    readonly_fields = ["products_imported", "finished_at", "error"]
    actions = ["queue_again"]

    @admin.action(description="Queue selected imports again")
    def queue_again(self, request: HttpRequest, queryset: QuerySet[ProductImport]) -> None:
        count = queryset.exclude(status=Status.QUEUED).update(
            status=Status.QUEUED, error="", finished_at=None
        )
        workitems.notify(IMPORT_HANDLER)  # a running worker picks them up within a second
        self.message_user(request, f"{count} imports queued.", messages.SUCCESS)


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["sku", "name", "price", "source", "updated"]
    list_select_related = ["source"]
    search_fields = ["sku", "name"]


@admin.register(ProductExport)
class ProductExportAdmin(admin.ModelAdmin):
    list_display = ["id", "status", "requested_at", "finished_at", "product_count", "file"]
    list_filter = ["status"]
    readonly_fields = ["finished_at", "file", "product_count", "error"]
