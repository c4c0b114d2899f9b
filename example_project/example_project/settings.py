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
    "graphene_django",
    "graphene_django_graphiql_static",  # GraphiQL's assets, served locally (no CDN)
    "django_workitems",
    "catalog",
]

# An empty DATABASE_URL counts as unset.
DATABASE_URL = env.str("DATABASE_URL", default="") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
DATABASES = {"default": env.db_url_config(DATABASE_URL)}
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
    # Tests use a file (not memory), so the worker subprocess of the end-to-end test sees it.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}

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

# /graphql/ serves django_workitems' ready schema, with GraphiQL in the browser.
GRAPHENE = {"SCHEMA": "django_workitems.schema.schema"}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

WORKITEMS = {
    "POLL_INTERVAL": env("WORKITEMS_POLL_INTERVAL", default="00:05:00"),
    "WORKERS": env.int("WORKITEMS_WORKERS", default=4),
    "QUEUE_SIZE": env.int("WORKITEMS_QUEUE_SIZE", default=100),
    "SHUTDOWN_TIMEOUT": env("WORKITEMS_SHUTDOWN_TIMEOUT", default="00:00:30"),
    "LEASE_TIMEOUT": env("WORKITEMS_LEASE_TIMEOUT", default="00:01:00"),
    "RUN_RETENTION": env("WORKITEMS_RUN_RETENTION", default="30.00:00:00"),
}

# The catalog app's handlers (catalog/handlers/).
# catalog.scrape-store: seconds to wait for a page, hosts it may scrape, first retry delay.
CATALOG_HTTP_TIMEOUT = env.float("CATALOG_HTTP_TIMEOUT", default=10.0)
CATALOG_SCRAPE_HOSTS = env.list("CATALOG_SCRAPE_HOSTS", default=["127.0.0.1", "localhost"])
CATALOG_SCRAPE_RETRY_BACKOFF = env.float("CATALOG_SCRAPE_RETRY_BACKOFF", default=30.0)
# catalog.import-csv: the folder CSV files are dropped into.
CATALOG_INBOX_DIR = env.path("CATALOG_INBOX_DIR", default=VAR_DIR / "inbox")
# catalog.notify-batches: where to POST a JSON notification per finished batch ("" = nowhere).
CATALOG_WEBHOOK_URL = env("CATALOG_WEBHOOK_URL", default="")
# catalog.purge-stale-batches: how long finished batches are kept.
CATALOG_BATCH_RETENTION_DAYS = env.int("CATALOG_BATCH_RETENTION_DAYS", default=30)

# Worker logs with the work item context on every line (docs/guide.md, "Log with context").
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"workitems": {"()": "django_workitems.log.ContextFilter"}},
    "formatters": {
        "workitems": {
            "format": "%(asctime)s %(levelname)s %(name)s "
            "[%(handler)s run=%(run_id)s item=%(work_item_id)s] %(message)s"
        }
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["workitems"],
            "formatter": "workitems",
        }
    },
    "loggers": {
        "django_workitems": {"handlers": ["console"], "level": "INFO"},
        "catalog": {"handlers": ["console"], "level": env("CATALOG_LOG_LEVEL", default="INFO")},
    },
}
