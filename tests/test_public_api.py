"""The public names of SPEC section 2, importable before Django is set up."""

from __future__ import annotations

import subprocess
import sys

import django_workitems as workitems

PUBLIC = [
    "WorkItem",
    "WorkItemHandler",
    "Purpose",
    "CancellationToken",
    "Cancelled",
    "add_handler",
    "get_handlers",
    "registry",
    "run_once",
    "notify",
]


def test_public_names_are_exported():
    for name in PUBLIC:
        assert name in workitems.__all__ and hasattr(workitems, name), name
    assert [p.value for p in workitems.Purpose] == ["ingestion", "internal", "export"]
    assert workitems.__version__


def test_the_package_imports_without_django_settings():
    # apps.py of a project imports it at module level, before the app registry is ready.
    code = "import django_workitems as w, django_workitems.testing; print(w.Purpose.EXPORT.value)"
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "export"


def test_get_handlers_lists_the_default_registry_by_purpose():
    # The test app registers jobs (internal), slow-jobs (export), broken-fetch (ingestion)...
    names = workitems.get_handlers()
    assert names == sorted(names)
    assert {"broken-fetch", "jobs", "slow-jobs", "tasks", "exclusive-jobs"} <= set(names)
    export = workitems.get_handlers(purpose=workitems.Purpose.EXPORT)
    assert "slow-jobs" in export and "jobs" not in export
    ingestion = workitems.get_handlers("ingestion")
    assert "broken-fetch" in ingestion and "slow-jobs" not in ingestion
    assert set(export) | set(ingestion) | set(workitems.get_handlers("internal")) == set(names)
    # The app registers its own run-retention handler, like any other.
    assert "django_workitems.prune-runs" in workitems.get_handlers("internal")
