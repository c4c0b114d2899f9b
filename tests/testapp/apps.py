from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import django_workitems as workitems

        from .handlers import (
            BrokenFetchHandler,
            ExclusiveJobHandler,
            JobHandler,
            SlowJobHandler,
            TaskHandler,
        )

        workitems.add_handler(JobHandler, name="jobs", max_items_per_cycle=10).add_handler(
            SlowJobHandler,
            name="slow-jobs",
            max_items_per_cycle=4,
            purpose=workitems.Purpose.EXPORT,
        ).add_handler(BrokenFetchHandler, name="broken-fetch", purpose="ingestion").add_handler(
            TaskHandler, name="tasks", max_items_per_cycle=20
        ).add_handler(ExclusiveJobHandler, name="exclusive-jobs", max_items_per_cycle=5)
