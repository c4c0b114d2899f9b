from django.apps import AppConfig


class BenchmarksConfig(AppConfig):
    name = "benchmarks"
    label = "benchmarks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import django_workitems as workitems

        from . import census
        from .handlers import (
            DrainHandler,
            EndlessHandler,
            IoHandler,
            OrmHandler,
            RecoverHandler,
            SlowHandler,
            WakeHandler,
        )

        # The handlers the workloads run in real ``runworkitems`` processes (one at a time,
        # selected with --handler); in-process workloads use registries of their own.
        workitems.add_handler(DrainHandler, name="bench.drain", max_items_per_cycle=100)
        workitems.add_handler(IoHandler, name="bench.io", max_items_per_cycle=100)
        workitems.add_handler(WakeHandler, name="bench.wake")
        workitems.add_handler(SlowHandler, name="bench.slow", max_items_per_cycle=100)
        workitems.add_handler(RecoverHandler, name="bench.recover", max_items_per_cycle=100)
        workitems.add_handler(EndlessHandler, name="bench.memory")
        workitems.add_handler(OrmHandler, name="bench.orm", max_items_per_cycle=100)
        census.install()  # only with BENCH_CENSUS set (workload 13)
