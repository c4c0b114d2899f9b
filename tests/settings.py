"""Settings of the test suite; ``DATABASE_URL`` chooses the database (SQLite by default)."""

import os
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
BUILD_DIR = BASE_DIR / "build"
BUILD_DIR.mkdir(exist_ok=True)

env = environ.Env()

SECRET_KEY = "tests-only-not-secret"  # noqa: S105
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "graphene_django",
    "graphene_django_graphiql_static",
    "django_workitems",
    "tests.testapp",
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BUILD_DIR / 'tests.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not memory, so worker subprocesses see the test database; WAL and IMMEDIATE
    # transactions let the pool threads write without "database is locked".
    # One file per test run, so that two runs at once (two developers, CI) never share it.
    DATABASES["default"]["TEST"] = {
        "NAME": env("SQLITE_TEST_NAME", default=str(BUILD_DIR / f"test_db_{os.getpid()}.sqlite3"))
    }
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "/static/"
GRAPHENE = {"SCHEMA": "django_workitems.schema.schema"}

WORKITEMS = {
    "POLL_INTERVAL": env("WORKITEMS_POLL_INTERVAL", default="00:00:01"),
    "WORKERS": env.int("WORKITEMS_WORKERS", default=4),
    "QUEUE_SIZE": env.int("WORKITEMS_QUEUE_SIZE", default=100),
    "SHUTDOWN_TIMEOUT": env("WORKITEMS_SHUTDOWN_TIMEOUT", default="00:00:05"),
    "LEASE_TIMEOUT": env("WORKITEMS_LEASE_TIMEOUT", default="00:00:10"),
    "ITEM_TIMEOUT": env("WORKITEMS_ITEM_TIMEOUT", default="01:00:00"),
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
