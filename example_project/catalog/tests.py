"""Handler tests: ``python manage.py test catalog`` from this directory."""

import json
import tempfile
from pathlib import Path

from django.test import TestCase

from django_workitems.testing import run_handler

from .handlers import ExportProductsHandler, ImportProductsHandler
from .models import Product, ProductExport, ProductImport, Status


class ImportProductsHandlerTests(TestCase):
    def test_a_bad_line_fails_its_import_only(self) -> None:
        good = ProductImport.objects.create(name="good", payload="A-1,Apple,1.50\nA-2,Pear,2")
        bad = ProductImport.objects.create(name="bad", payload="B-1,Bolt,cheap")

        result = run_handler(ImportProductsHandler, max_items=10)

        self.assertEqual(len(result.items), 2)
        self.assertEqual(result.succeeded, 1)
        self.assertEqual(result.failures[0].item_id, str(bad.pk))
        self.assertIsInstance(result.failures[0].exception, ValueError)
        self.assertEqual(sorted(Product.objects.values_list("sku", flat=True)), ["A-1", "A-2"])
        good.refresh_from_db()
        bad.refresh_from_db()
        self.assertEqual((good.status, good.products_imported), (Status.DONE, 2))
        self.assertEqual(bad.status, Status.FAILED)
        self.assertIn("'cheap' is not a number", bad.error)
        self.assertTrue(ProductExport.objects.filter(status=Status.QUEUED).exists())

    def test_nothing_queued_fetches_nothing(self) -> None:
        self.assertEqual(run_handler(ImportProductsHandler).items, [])


class ExportProductsHandlerTests(TestCase):
    def test_writes_every_product(self) -> None:
        Product.objects.create(sku="A-1", name="Apple", price="1.50")
        ProductExport.objects.create()
        export_dir = self.enterContext(tempfile.TemporaryDirectory())
        with self.settings(CATALOG_EXPORT_DIR=export_dir):
            result = run_handler(ExportProductsHandler)
        self.assertEqual(result.succeeded, 1)
        export = ProductExport.objects.get()
        self.assertEqual((export.status, export.product_count), (Status.DONE, 1))
        self.assertEqual(Path(export.file).parent, Path(export_dir))
        self.assertEqual(
            json.loads(Path(export.file).read_text()),
            [{"sku": "A-1", "name": "Apple", "price": "1.50"}],
        )
