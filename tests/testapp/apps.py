from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import os
        from functools import partial

        import django_workitems as workitems

        # WORKITEMS_TEST_CLOCK_SKEW=S: this process's clock runs S seconds ahead (the tests of
        # hosts whose clocks disagree; everything that decides must use the database's clock).
        if skew := float(os.environ.get("WORKITEMS_TEST_CLOCK_SKEW", "0")):
            from datetime import timedelta

            from django.utils import timezone

            real_now = timezone.now
            timezone.now = lambda: real_now() + timedelta(seconds=skew)

        from .handlers import (
            BrokenFetchHandler,
            ExclusiveJobHandler,
            JobHandler,
            QueueJobHandler,
            QueueTaskHandler,
            ScheduledHandler,
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
        # WORKITEMS_TEST_SCHEDULE="cron expression" registers "scheduled" (the schedule tests).
        if schedule := os.environ.get("WORKITEMS_TEST_SCHEDULE"):
            workitems.add_handler(
                ScheduledHandler,
                name="scheduled",
                schedule=schedule,
                schedule_catch_up=os.environ.get("WORKITEMS_TEST_SCHEDULE_CATCH_UP"),
            )
        # WORKITEMS_TEST_MANY_HANDLERS=N registers N more: even ones exclusive on Job rows of
        # their queue, odd ones claiming Task rows (the fairness tests with real workers).
        for i in range(int(os.environ.get("WORKITEMS_TEST_MANY_HANDLERS", "0"))):
            name = f"many-{i:03d}"
            if i % 2 == 0:
                workitems.add_handler(
                    partial(QueueJobHandler, name), name=name, max_items_per_cycle=10
                )
            else:
                workitems.add_handler(
                    partial(QueueTaskHandler, name),
                    name=name,
                    max_items_per_cycle=10,
                    exclusive=False,
                )
