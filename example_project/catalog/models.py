"""A tiny product catalogue: imports come in as text, products come out, exports go to files."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class Status(models.TextChoices):
    QUEUED = "queued", "Queued"
    DONE = "done", "Done"
    FAILED = "failed", "Failed"


class ProductImport(models.Model):
    """A batch of products to load, one ``sku,name,price`` line each (the ingestion work item)."""

    name = models.CharField(max_length=100, unique=True)
    payload = models.TextField(help_text="One product a line: sku,name,price")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    error = models.TextField(blank=True)
    products_imported = models.PositiveIntegerField(default=0)
    created = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created", "id"]
        indexes = [models.Index(fields=["status", "finished_at"], name="catalog_import_status")]

    def __str__(self) -> str:
        return self.name


class Product(models.Model):
    sku = models.CharField(max_length=40, unique=True)
    name = models.CharField(max_length=200)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    source = models.ForeignKey(
        ProductImport, on_delete=models.SET_NULL, null=True, blank=True, related_name="products"
    )
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["sku"]

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"


class ProductExport(models.Model):
    """A request to write the catalogue to a JSON file (the export work item)."""

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    requested_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    file = models.CharField(max_length=255, blank=True)
    product_count = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-requested_at", "-id"]
        constraints = [
            # At most one export waiting: every import that finishes asks for "an export soon".
            models.UniqueConstraint(
                fields=["status"], condition=Q(status="queued"), name="catalog_one_queued_export"
            )
        ]

    def __str__(self) -> str:
        return f"export {self.pk} ({self.status})"
