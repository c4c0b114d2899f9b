"""``manage.py workitems_health``: exit 0 when healthy, 1 (saying why) otherwise.

Three modes, for three kinds of probe (docs/probes.md):

- ``--file PATH [--max-age SECONDS]``: liveness of one worker process, from the mtime of the file
  ``runworkitems --health-file PATH`` touches every second. Opens no database connection.
- ``--ready [--timeout SECONDS]``: readiness of this process: the database is reachable and takes
  the writes the lease keeper makes (rolled back).
- neither: the deployment: some worker, anywhere, heartbeated within ``LEASE_TIMEOUT``
  (``--json`` for the full report).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from django_workitems.health import check_health, check_ready, liveness_file_age

DEFAULT_MAX_AGE = 60.0


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {value!r}")
    return seconds


class Command(BaseCommand):
    help = (
        "Exit 0 when healthy, 1 otherwise. --file PATH: this worker process touched PATH "
        "(runworkitems --health-file) within --max-age seconds, no database used. --ready: the "
        "database takes the lease keeper's writes. Otherwise: a runworkitems worker heartbeated "
        "within LEASE_TIMEOUT; --json prints workers, handlers, last success and backlog."
    )
    requires_system_checks: list[str] = []  # a probe runs often: keep it to the queries it needs

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--file",
            dest="path",
            metavar="PATH",
            help="Liveness: check the mtime of the file runworkitems --health-file touches. "
            "Opens no database connection.",
        )
        parser.add_argument(
            "--max-age",
            type=_positive_seconds,
            default=DEFAULT_MAX_AGE,
            metavar="SECONDS",
            help=f"With --file: the oldest mtime that passes (default {DEFAULT_MAX_AGE:g}).",
        )
        parser.add_argument(
            "--ready",
            action="store_true",
            help="Readiness: the database is reachable and takes the lease keeper's writes "
            "(an UPDATE of zero rows, rolled back).",
        )
        parser.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=5.0,
            metavar="SECONDS",
            help="With --ready, on PostgreSQL: statement and lock timeout (default 5).",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            dest="as_json",
            help="Print the full report as JSON (workers, handlers, last success, backlog).",
        )

    def handle(
        self,
        *args: Any,
        path: str | None,
        max_age: float,
        ready: bool,
        timeout: float,
        as_json: bool,
        **options: Any,
    ) -> None:
        if as_json and (path is not None or ready):
            raise CommandError("--json goes with neither --file nor --ready")
        if path is not None:
            self._check_file(path, max_age)
        if ready:
            self._check_ready(timeout)
        if path is None and not ready:
            self._check_deployment(as_json)

    def _check_file(self, path: str, max_age: float) -> None:
        age = liveness_file_age(path)
        if age is None:
            raise CommandError(
                f"unhealthy: {path} does not exist (runworkitems --health-file {path} "
                "has not touched it)"
            )
        if age > max_age:
            raise CommandError(
                f"unhealthy: {path} was last touched {age:.1f}s ago, "
                f"more than --max-age {max_age:g}s"
            )
        self.stdout.write(f"healthy: {path} was touched {age:.1f}s ago")

    def _check_ready(self, timeout: float) -> None:
        try:
            readiness = check_ready(timeout)
        except ImproperlyConfigured as exc:
            raise CommandError(f"not ready: {exc}") from None
        if not readiness.ready:
            raise CommandError(f"not ready: {readiness.reason}")
        self.stdout.write(f"ready: {readiness.reason}")

    def _check_deployment(self, as_json: bool) -> None:
        try:
            report = check_health(detail=as_json)
        except ImproperlyConfigured as exc:
            raise CommandError(f"unhealthy: {exc}") from None
        except DatabaseError as exc:
            raise CommandError(f"unhealthy: the database could not be read: {exc}") from None
        if as_json:
            self.stdout.write(json.dumps(report.as_dict(), indent=2))
        elif report.healthy:
            self.stdout.write(f"healthy: {report.reason}")
        if not report.healthy:
            raise CommandError(f"unhealthy: {report.reason}")
