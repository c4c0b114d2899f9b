"""Settings of the example project, read from the environment through django-environ.

``DATABASE_URL`` picks the database: SQLite in ``var/db.sqlite3`` by default, or for instance
``postgres://postgres@127.0.0.1:5432/exampledemo``.
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"
VAR_DIR.mkdir(exist_ok=True)

env = environ.Env()

SECRET_KEY = env("SECRET_KEY", default="example-project-not-secret")
DEBUG = env.bool("DEBUG", default=True)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_workitems",
    "catalog",
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
# Pool threads keep their connection through a burst of items instead of reconnecting per item.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several threads (and processes) write: wait for the lock instead of failing at once, take
    # it when a transaction starts (no deadlocking upgrades), and let readers run during writes.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL;",
    }

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"
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
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

WORKITEMS = {
    "POLL_INTERVAL": env("WORKITEMS_POLL_INTERVAL", default="00:05:00"),
    "WORKERS": env.int("WORKITEMS_WORKERS", default=4),
    "QUEUE_SIZE": env.int("WORKITEMS_QUEUE_SIZE", default=100),
    "SHUTDOWN_TIMEOUT": env("WORKITEMS_SHUTDOWN_TIMEOUT", default="00:00:30"),
    "LEASE_TIMEOUT": env("WORKITEMS_LEASE_TIMEOUT", default="00:01:00"),
    "RUN_RETENTION": env("WORKITEMS_RUN_RETENTION", default="30.00:00:00"),
}

# Where catalog.export-products writes its JSON files.
CATALOG_EXPORT_DIR = env.path("CATALOG_EXPORT_DIR", default=VAR_DIR / "exports")
