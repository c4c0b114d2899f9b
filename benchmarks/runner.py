"""Runs the selected workloads against the database of ``DATABASE_URL``; writes JSON results.

Started by ``python -m benchmarks`` once per database, so Django is configured once per
database (and the worker subprocesses it starts inherit the same settings).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import django


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runner")
    parser.add_argument("--db", required=True, help="label of the database in the results")
    parser.add_argument("--out", required=True, type=Path, help="where to write the results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8,9")
    args = parser.parse_args(argv)

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from .results import Result
    from .workloads import FULL, QUICK, WORKLOADS, Bench

    call_command("migrate", verbosity=0, interactive=False)
    bench = Bench(db=args.db, sizes=QUICK if args.quick else FULL, quick=args.quick)
    with connection.cursor() as cursor:
        cursor.execute("SELECT version()" if bench.postgres else "SELECT sqlite_version()")
        version = cursor.fetchone()[0]
    results: list[Result] = []
    timings: dict[int, float] = {}
    for number in sorted({int(n) for n in args.only.split(",")}):
        started = time.monotonic()
        try:
            results.extend(WORKLOADS[number](bench))
        except Exception:
            bench.say(f"workload {number} failed:\n{traceback.format_exc()}")
            results.append(
                Result(
                    workload=f"{number} {WORKLOADS[number].__name__}",
                    db=args.db,
                    figure=None,
                    unit="",
                    error=traceback.format_exc(),
                )
            )
        timings[number] = time.monotonic() - started
    args.out.write_text(
        json.dumps(
            {
                "db": args.db,
                "version": version,
                "seconds": timings,
                "results": [r.to_dict() for r in results],
            },
            indent=2,
        )
    )
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
