from django.apps import AppConfig


class CatalogConfig(AppConfig):
    name = "catalog"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import django_workitems as workitems

        from . import handlers

        workitems.add_handler(
            handlers.StoreBatchHandler,
            name=handlers.STORE_HANDLER,
            max_items_per_cycle=3,
            max_concurrency=3,  # at most three scrapes at once per worker: be polite to shops
            purpose=workitems.Purpose.INGESTION,
        ).add_handler(
            handlers.CsvImportHandler,
            name=handlers.CSV_IMPORT_HANDLER,
            max_items_per_cycle=5,
            purpose=workitems.Purpose.INGESTION,
        ).add_handler(
            handlers.BatchWebhookHandler,
            name=handlers.WEBHOOK_HANDLER,
            max_items_per_cycle=20,
            purpose=workitems.Purpose.EXPORT,
        ).add_handler(
            handlers.PurgeStaleBatchesHandler,
            name=handlers.PURGE_HANDLER,
            max_items_per_cycle=100,
            purpose=workitems.Purpose.INTERNAL,
            schedule="0 3 * * *",  # nightly at 03:00 (TIME_ZONE), once across all workers
        )
