"""`pip install .` into a fresh virtualenv, then a brand-new Django project gets the tables."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.django_db
def test_pip_install_into_a_fresh_virtualenv_and_migrate_a_new_project(tmp_path):
    if connection.vendor != "sqlite":
        pytest.skip("independent of the test database: runs once, in the SQLite pass")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "DATABASE_URL")
    }
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(ROOT)],
        check=True,
        cwd=tmp_path,
        timeout=600,
        env=env,
    )
    # The package, not the source tree, must be what the project imports.
    subprocess.run(
        [python, "-m", "django", "startproject", "newsite", str(tmp_path)],
        check=True,
        cwd=tmp_path,
        env=env,
    )
    settings = tmp_path / "newsite" / "settings.py"
    text = settings.read_text()
    assert "INSTALLED_APPS = [" in text
    settings.write_text(
        text.replace("INSTALLED_APPS = [", "INSTALLED_APPS = [\n    'django_workitems',", 1)
    )
    run = subprocess.run(
        [python, "manage.py", "migrate", "--noinput"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "Applying django_workitems.0001_initial... OK" in run.stdout
    tables = {
        row[0]
        for row in sqlite3.connect(tmp_path / "db.sqlite3").execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        )
    }
    assert {
        "django_workitems_handler",
        "django_workitems_handlerrun",
        "django_workitems_itemfailure",
        "django_workitems_worker",
    } <= tables
    listing = subprocess.run(
        [
            python,
            "-c",
            "import django_workitems as w; print(w.__file__, w.__version__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert str(env_dir) in listing.stdout and sys.prefix not in listing.stdout
    py_typed = list(env_dir.glob("lib/python*/site-packages/django_workitems/py.typed"))
    assert py_typed, "py.typed is not installed"
