"""Logging: the formatters, ``configure_logging``, and real ``runworkitems`` workers."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from django_workitems import log
from django_workitems.log import ContextFilter, ContextFormatter, JsonFormatter, log_context
from django_workitems.models import HandlerRun
from tests.conftest import ROOT
from tests.testapp.models import Job

DOCS = ROOT / "docs" / "logging.md"
LEVEL_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) ", re.MULTILINE)
SUFFIX = re.compile(r"\((?:handler|run|item)=")


def record(
    msg: str = "hello %s", args: tuple = ("world",), exc: bool = False, **extra: object
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    made = logging.getLogger("django_workitems.tests").makeRecord(
        "django_workitems.tests", logging.INFO, __file__, 1, msg, args, exc_info, extra=extra
    )
    return made


@pytest.fixture
def context() -> Iterator[object]:
    """Set the worker's context for the test, as the worker does around fetch and process."""
    tokens = []

    def set_(handler: str | None, run_id: int | None, item: str | None) -> None:
        tokens.append(log_context.set((handler, run_id, item)))

    yield set_
    for token in reversed(tokens):
        log_context.reset(token)


# --- ContextFormatter --------------------------------------------------------------------------


def test_context_formatter_adds_nothing_outside_any_handler():
    formatter = ContextFormatter("%(levelname)s %(message)s")
    assert formatter.format(record()) == "INFO hello world"
    filtered = record()
    ContextFilter().filter(filtered)  # the fields exist, all None
    assert formatter.format(filtered) == "INFO hello world"


def test_context_formatter_shows_only_the_fields_that_are_set():
    formatter = ContextFormatter("%(message)s")
    assert formatter.format(record(handler="h")) == "hello world (handler=h)"
    assert formatter.format(record(handler="h", run_id=7)) == "hello world (handler=h run=7)"
    assert (
        formatter.format(record(handler="h", run_id=7, work_item_id="x"))
        == "hello world (handler=h run=7 item=x)"
    )
    assert formatter.format(record(handler="h", work_item_id="x")) == (
        "hello world (handler=h item=x)"
    )


def test_context_formatter_reads_the_workers_context_and_extra_wins(context):
    formatter = ContextFormatter("%(message)s")
    context("ctx-handler", 3, None)
    assert formatter.format(record()) == "hello world (handler=ctx-handler run=3)"
    assert formatter.format(record(work_item_id="i")) == (
        "hello world (handler=ctx-handler run=3 item=i)"
    )
    assert formatter.format(record(handler="own")) == "hello world (handler=own run=3)"


def test_context_formatter_puts_the_traceback_after_the_suffix():
    text = ContextFormatter("%(message)s").format(record(exc=True, handler="h"))
    first, rest = text.split("\n", 1)
    assert first == "hello world (handler=h)"
    assert rest.startswith("Traceback (most recent call last):")
    assert rest.rstrip().endswith("ValueError: boom")


def test_context_formatter_default_format_has_time_level_thread_and_logger():
    text = ContextFormatter().format(record())
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \[MainThread\] django_workitems.tests: "
        r"hello world",
        text,
    ), text


# --- JsonFormatter -----------------------------------------------------------------------------


def test_json_formatter_without_context():
    made = record()
    entry = json.loads(JsonFormatter().format(made))
    assert entry == {
        "timestamp": entry["timestamp"],
        "level": "INFO",
        "logger": "django_workitems.tests",
        "thread": "MainThread",
        "message": "hello world",
    }
    stamp = datetime.fromisoformat(entry["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert abs(stamp.timestamp() - made.created) < 1e-3


def test_json_formatter_with_context_and_exception(context):
    context("h", 5, None)
    made = record(exc=True, work_item_id="it-1")
    ContextFilter().filter(made)
    entry = json.loads(JsonFormatter().format(made))
    assert (entry["handler"], entry["run_id"], entry["work_item_id"]) == ("h", 5, "it-1")
    assert entry["exc_info"].startswith("Traceback (most recent call last):")
    assert "ValueError: boom" in entry["exc_info"]
    assert "\n" not in JsonFormatter().format(made)  # one line a record


def test_json_formatter_leaves_out_unset_fields_and_encodes_anything():
    made = record("%s", (object(),), handler="h")
    ContextFilter().filter(made)
    entry = json.loads(JsonFormatter().format(made))
    assert entry["handler"] == "h"
    assert "run_id" not in entry and "work_item_id" not in entry and "exc_info" not in entry
    assert entry["message"].startswith("<object object")


def test_the_formatters_work_from_dict_config():
    import logging.config

    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "text": {"class": "django_workitems.log.ContextFormatter", "format": "%(message)s"},
                "text2": {"()": "django_workitems.log.ContextFormatter", "format": "%(message)s"},
                "json": {"()": "django_workitems.log.JsonFormatter"},
            },
            "handlers": {
                name: {"class": "logging.NullHandler", "formatter": name}
                for name in ("text", "text2", "json")
            },
            "loggers": {"tests.dictconfig": {"handlers": ["text", "text2", "json"]}},
        }
    )
    handlers = logging.getLogger("tests.dictconfig").handlers
    try:
        assert [h.formatter.format(record(handler="h")) for h in handlers[:2]] == [
            "hello world (handler=h)"
        ] * 2
        assert json.loads(handlers[2].formatter.format(record()))["message"] == "hello world"
    finally:
        logging.getLogger("tests.dictconfig").handlers.clear()


# --- configure_logging -------------------------------------------------------------------------


@pytest.fixture
def clean_logging() -> Iterator[object]:
    """The app's logger and root with neither handlers nor levels, restored afterwards.

    The test clears them itself (``bare()``): pytest adds its handlers to root after fixtures.
    """
    app, root = logging.getLogger(log.LOGGER), logging.getLogger()
    saved = [(lg, lg.handlers[:], lg.level) for lg in (app, root)]

    def bare() -> tuple[logging.Logger, logging.Logger]:
        app.handlers.clear()
        root.handlers.clear()
        app.setLevel(logging.NOTSET)
        root.setLevel(logging.WARNING)
        return app, root

    yield bare
    for lg, handlers, level in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)


def test_configure_logging_without_configuration_logs_info_to_stderr(clean_logging):
    app, _ = clean_logging()
    log.configure_logging(None)
    assert app.level == logging.INFO
    [handler] = app.handlers
    assert isinstance(handler.formatter, ContextFormatter)
    assert handler.stream is sys.stderr
    assert any(isinstance(f, ContextFilter) for f in handler.filters)
    log.configure_logging(None)
    assert len(app.handlers) == 1  # not twice


@pytest.mark.parametrize(("verbosity", "level"), [(0, "WARNING"), (1, "INFO"), (2, "DEBUG")])
def test_configure_logging_with_explicit_verbosity(clean_logging, verbosity, level):
    app, root = clean_logging()
    log.configure_logging(verbosity)
    assert logging.getLevelName(app.level) == level
    app.handlers.clear()
    root.addHandler(logging.NullHandler())  # the project configured logging
    app.setLevel(logging.ERROR)
    log.configure_logging(verbosity)
    assert logging.getLevelName(app.level) == level and not app.handlers


@pytest.mark.parametrize("on", ["app", "root"])
def test_configure_logging_without_verbosity_keeps_the_projects_configuration(clean_logging, on):
    app, root = clean_logging()
    configured = app if on == "app" else root
    configured.addHandler(logging.NullHandler())
    configured.setLevel(logging.WARNING)
    log.configure_logging(None)
    assert app.getEffectiveLevel() == logging.WARNING
    assert app.level == (logging.WARNING if on == "app" else logging.NOTSET)
    assert len(app.handlers) == (1 if on == "app" else 0)


def test_configure_logging_keeps_a_level_the_project_set_without_handlers(clean_logging):
    app, _ = clean_logging()
    app.setLevel(logging.ERROR)
    log.configure_logging(None)
    assert app.level == logging.ERROR and len(app.handlers) == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "options", "expected"),
    [
        ([], {}, None),
        (["-v", "2"], {}, 2),
        (["--verbosity", "0"], {}, 0),
        (["-v1"], {}, 1),
        ([], {"verbosity": 3}, 3),
    ],
)
def test_runworkitems_passes_verbosity_only_when_given(monkeypatch, args, options, expected):
    from django_workitems.management.commands import runworkitems

    seen = []
    monkeypatch.setattr(runworkitems, "configure_logging", seen.append)
    call_command("runworkitems", "--list", *args, stdout=StringIO(), **options)
    assert seen == [expected]


# --- real workers ------------------------------------------------------------------------------

TEXT_HANDLER = {
    "class": "logging.StreamHandler",
    "formatter": "text",
    "filters": ["workitems"],
}
TEXT_FORMATTER = {
    "class": "django_workitems.log.ContextFormatter",
    "format": "%(levelname)s %(name)s: %(message)s",
}

SETTINGS = {
    "app_warning": {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"workitems": {"()": "django_workitems.log.ContextFilter"}},
        "formatters": {"text": TEXT_FORMATTER},
        "handlers": {"text": TEXT_HANDLER},
        "loggers": {"django_workitems": {"handlers": ["text"], "level": "WARNING"}},
    },
    "root_warning": {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"workitems": {"()": "django_workitems.log.ContextFilter"}},
        "formatters": {"text": TEXT_FORMATTER},
        "handlers": {"text": TEXT_HANDLER},
        "root": {"handlers": ["text"], "level": "WARNING"},
    },
    "nothing": {},
}


def docs_logging_block() -> str:
    """The ``LOGGING = {...}`` block of docs/logging.md that the JSON section tells users to use."""
    text = DOCS.read_text()
    after = text.split("<!-- logging-json", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def settings_module(tmp_path: Path, name: str) -> dict[str, str]:
    """Env for a worker using tests.settings with another LOGGING (a module in tmp_path)."""
    body = "from tests.settings import *  # noqa\n"
    if name == "docs_json":
        body += docs_logging_block()
    else:
        body += f"LOGGING = {SETTINGS[name]!r}\n"
    module = f"logsettings_{name}"
    (tmp_path / f"{module}.py").write_text(body)
    return {"DJANGO_SETTINGS_MODULE": module, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}


def run_worker(worker_env, tmp_path: Path, settings: str, *args: str, **env: str):
    Job.objects.bulk_create([Job(), Job(action="fail"), Job()])
    done = subprocess.run(
        [sys.executable, "-m", "django", "runworkitems", "--once", "--handler", "jobs", *args],
        cwd=ROOT,
        env=worker_env(**settings_module(tmp_path, settings), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "jobs: partial, 3 fetched, 2 succeeded, 1 failed" in done.stdout
    return done


def levels(output: str) -> set[str]:
    return set(LEVEL_LINE.findall(output))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("settings", ["app_warning", "root_warning"])
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), {"ERROR"}),
        (("-v", "0"), {"ERROR"}),
        (("-v", "1"), {"INFO", "ERROR"}),
        (("-v", "2"), {"DEBUG", "INFO", "ERROR"}),
    ],
)
def test_worker_obeys_a_warning_logging_unless_v_is_given(
    worker_env, tmp_path, settings, args, expected
):
    done = run_worker(worker_env, tmp_path, settings, *args)
    assert levels(done.stderr) == expected, done.stderr
    assert "item" in done.stderr and "failed" in done.stderr  # the ERROR line is there
    if "DEBUG" in expected:
        assert f"Logging at DEBUG, from --verbosity {args[1]}" in done.stderr


@pytest.mark.django_db(transaction=True)
def test_project_log_level_info_from_tests_settings_is_kept_without_v(worker_env, tmp_path):
    """tests/settings.py: django_workitems at WORKITEMS_LOG_LEVEL; no -v keeps it."""
    Job.objects.create()
    quiet = subprocess.run(
        [sys.executable, "-m", "django", "runworkitems", "--once", "--handler", "jobs"],
        cwd=ROOT,
        env=worker_env(WORKITEMS_LOG_LEVEL="WARNING"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


@pytest.mark.django_db(transaction=True)
def test_worker_without_logging_configuration_logs_info_with_context_to_stderr(
    worker_env, tmp_path
):
    done = run_worker(worker_env, tmp_path, "nothing")
    assert "django_workitems" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if re.match(r"\d{4}-", line)]
    assert {line.split()[2] for line in lines} == {"INFO", "ERROR"}, done.stderr
    run = HandlerRun.objects.get(handler__name="jobs")
    failed = Job.objects.get(action="fail")

    outside = [line for line in lines if "Worker " in line]
    assert outside and all(not SUFFIX.search(line) for line in outside), outside
    assert "None" not in done.stderr

    [failure] = [line for line in lines if " ERROR " in line]
    assert failure.endswith(f"(handler=jobs run={run.pk} item={failed.pk})"), failure
    assert "Traceback (most recent call last):" in done.stderr
    [summary] = [line for line in lines if f"Handler jobs run {run.pk}" in line]
    assert summary.endswith(f"(handler=jobs run={run.pk})"), summary


@pytest.mark.django_db(transaction=True)
def test_worker_without_logging_configuration_and_v_2_logs_debug(worker_env, tmp_path):
    done = run_worker(worker_env, tmp_path, "nothing", "-v", "2")
    assert "DEBUG [MainThread] django_workitems: Logging at DEBUG, from --verbosity 2" in (
        done.stderr
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("args", "debug"), [((), False), (("-v", "2"), True)])
def test_worker_with_the_documented_json_logging(worker_env, tmp_path, args, debug):
    done = run_worker(worker_env, tmp_path, "docs_json", *args)
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert entries, done.stderr
    run = HandlerRun.objects.get(handler__name="jobs")
    failed = Job.objects.get(action="fail")

    assert {e["level"] for e in entries} == ({"DEBUG"} if debug else set()) | {"INFO", "ERROR"}
    for entry in entries:
        assert datetime.fromisoformat(entry["timestamp"]).utcoffset() == timedelta(0)
        assert None not in entry.values()
    outside = [e for e in entries if e["message"].startswith("Worker ")]
    assert outside and all(not {"handler", "run_id", "work_item_id"} & e.keys() for e in outside)
    [failure] = [e for e in entries if e["level"] == "ERROR"]
    assert (failure["handler"], failure["run_id"], str(failure["work_item_id"])) == (
        "jobs",
        run.pk,
        str(failed.pk),
    )
    assert "ValueError: job" in failure["exc_info"]
    [summary] = [e for e in entries if e["message"].startswith(f"Handler jobs run {run.pk}")]
    assert summary["handler"] == "jobs" and "work_item_id" not in summary
