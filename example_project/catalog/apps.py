from django.apps import AppConfig


class CatalogConfig(AppConfig):
    name = "catalog"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import django_workitems as workitems

        from .handlers import (
            EXPORT_HANDLER,
            IMPORT_HANDLER,
            PURGE_HANDLER,
            ExportProductsHandler,
            ImportProductsHandler,
            PurgeOldImportsHandler,
        )

        workitems.add_handler(
            ImportProductsHandler,
            name=IMPORT_HANDLER,
            max_items_per_cycle=5,
            purpose=workitems.Purpose.INGESTION,
            poll_interval="00:01:00",
        ).add_handler(
            ExportProductsHandler,
            name=EXPORT_HANDLER,
            max_items_per_cycle=1,
            purpose=workitems.Purpose.EXPORT,
        ).add_handler(
            PurgeOldImportsHandler,
            name=PURGE_HANDLER,
            max_items_per_cycle=50,
            purpose=workitems.Purpose.INTERNAL,
            poll_interval="01:00:00",
        )
