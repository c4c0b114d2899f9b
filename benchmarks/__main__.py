"""``python -m benchmarks [--quick] [--db sqlite|postgresql] [--only 1,4]`` (``make bench``).

Sets up its own databases (a SQLite file under ``build/bench/``; a PostgreSQL database it
creates and drops), runs each database's workloads in a process of its own with the right
``DATABASE_URL``, prints the table and writes it, with the machine's facts, to
``build/bench.json``. ``--quick`` is a small-N smoke run: it keeps the benchmarks working and
asserts nothing about speed (the exit status says only whether every workload ran).
``BENCH_PG_DATABASE`` names the PostgreSQL database (default ``bench_workitems``), so two runs
can share a server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .results import Result, table

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "build" / "bench"
DEFAULT_JSON = ROOT / "build" / "bench.json"
DATABASES = ("sqlite", "postgresql")
PG_DATABASE = os.environ.get("BENCH_PG_DATABASE", "bench_workitems")
PG_SERVER = "postgres://postgres@127.0.0.1:5432/"
ALL_WORKLOADS = ",".join(str(n) for n in range(1, 15))
"""The numbers of ``benchmarks.workloads.WORKLOADS`` (not imported here: Django is not set up)."""


@contextlib.contextmanager
def sqlite_database() -> Iterator[str]:
    """A fresh SQLite file under build/bench/ (kept afterwards, for a look at its contents)."""
    path = BENCH_DIR / "bench.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    yield f"sqlite:///{path}"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.contextmanager
def postgres_database(server: str) -> Iterator[str]:
    """A PostgreSQL database of the benchmark's own, created fresh and dropped at the end."""
    import psycopg
    from psycopg import sql

    name = sql.Identifier(PG_DATABASE)
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name)
    with psycopg.connect(_with_database(server, "postgres"), autocommit=True) as admin:
        admin.execute(drop)
        admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
    try:
        yield _with_database(server, PG_DATABASE)
    finally:
        with psycopg.connect(_with_database(server, "postgres"), autocommit=True) as admin:
            admin.execute(drop)


def run_database(db: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run the workloads of one database in a process configured for it."""
    out = BENCH_DIR / f"{db}.json"
    out.unlink(missing_ok=True)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "benchmarks.settings",
        "DATABASE_URL": url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("PYTHONDEVMODE", None)  # dev mode's checks would be measured too
    command = [sys.executable, "-m", "benchmarks.runner", "--db", db, "--out", str(out)]
    command += ["--only", args.only] + (["--quick"] if args.quick else [])
    code = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    if not out.exists():
        failed = Result(workload="all", db=db, figure=None, unit="", error=f"exit {code}")
        return {"db": db, "version": "", "results": [failed.to_dict()]}
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def machine() -> dict[str, Any]:
    """The facts a reader needs to weigh the absolute figures."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text().split()
        memory_gb = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    import django

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "django": django.get_version(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small-N smoke run")
    parser.add_argument(
        "--db",
        action="append",
        choices=DATABASES,
        help="database to benchmark (repeatable; default: both)",
    )
    parser.add_argument("--only", default=ALL_WORKLOADS, help="workloads, e.g. 1,4")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("BENCH_POSTGRES_URL", PG_SERVER),
        help=f"PostgreSQL server; the benchmark creates and drops {PG_DATABASE} on it",
    )
    args = parser.parse_args(argv)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    reports = []
    for db in args.db or DATABASES:
        database = sqlite_database() if db == "sqlite" else postgres_database(args.postgres_url)
        with database as url:
            reports.append(run_database(db, url, args))
    wall = time.monotonic() - started

    results = [Result.from_dict(r) for report in reports for r in report["results"]]
    text = table(results)
    facts = machine()
    versions = {report["db"]: report["version"] for report in reports}
    print(text)
    print(
        f"\n{facts['nproc']} CPUs ({facts['cpu']}), Python {facts['python']}, "
        f"Django {facts['django']}; "
        + ", ".join(f"{db}: {version}" for db, version in versions.items())
    )
    met = [r.met for r in results if r.met is not None]
    print(
        f"{sum(met)} of {len(met)} targets met"
        + (" (quick run: figures are not meaningful)" if args.quick else "")
        + f"; {wall:.0f}s"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "quick": args.quick,
                "machine": facts,
                "databases": versions,
                "wall_seconds": wall,
                "workload_seconds": {report["db"]: report.get("seconds") for report in reports},
                "results": [r.to_dict() for r in results],
                "table": text,
            },
            indent=2,
        )
        + "\n"
    )
    errors = [r for r in results if r.error]
    for r in errors:
        print(f"\n{r.workload} on {r.db} failed:\n{r.error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
