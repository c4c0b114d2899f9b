"""Settings of the benchmark processes; ``DATABASE_URL`` chooses the database.

``python -m benchmarks`` sets ``DATABASE_URL`` for each database it benchmarks, so Django is
configured once per database, in a process of its own (and in the workers that one starts).
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
BENCH_DIR = BASE_DIR / "build" / "bench"
BENCH_DIR.mkdir(parents=True, exist_ok=True)

env = environ.Env()

SECRET_KEY = "benchmarks-only-not-secret"  # noqa: S105
DEBUG = False  # DEBUG would keep every query in memory and distort time and memory figures
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django_workitems",
    "benchmarks",
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BENCH_DIR / 'bench.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # As the test suite and the README recommend: WAL and IMMEDIATE transactions let a worker's
    # threads and this process write without "database is locked".
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

WORKITEMS = {
    "POLL_INTERVAL": "01:00:00",  # workers idle unless woken or draining
    "WORKERS": 4,
    "SHUTDOWN_TIMEOUT": "00:00:10",
    # Workload 12 starts its survivor with a short lease, so a death is seen soon.
    "LEASE_TIMEOUT": env("WORKITEMS_LEASE_TIMEOUT", default="00:01:00"),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_workitems": {
            "handlers": ["stderr"],
            "level": env("WORKITEMS_LOG_LEVEL", default="WARNING"),
        }
    },
}
