"""The catalogue's work item handlers, registered in ``CatalogConfig.ready()``."""

from .cleanup import PURGE_HANDLER, PurgeStaleBatchesHandler
from .csv_import import CSV_IMPORT_HANDLER, CsvImportHandler
from .store import STORE_HANDLER, StoreBatchHandler
from .webhook import WEBHOOK_HANDLER, BatchWebhookHandler

__all__ = [
    "CSV_IMPORT_HANDLER",
    "PURGE_HANDLER",
    "STORE_HANDLER",
    "WEBHOOK_HANDLER",
    "BatchWebhookHandler",
    "CsvImportHandler",
    "PurgeStaleBatchesHandler",
    "StoreBatchHandler",
]
