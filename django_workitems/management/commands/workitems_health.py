"""``manage.py workitems_health``: exit 0 when a worker is alive, 1 (saying why) otherwise."""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from django_workitems.health import check_health


class Command(BaseCommand):
    help = (
        "Exit 0 when a runworkitems worker heartbeated within LEASE_TIMEOUT, 1 otherwise; "
        "--json prints workers, handlers, last success and backlog."
    )
    requires_system_checks: list[str] = []  # a probe runs often: keep it to the queries it needs

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--json",
            action="store_true",
            dest="as_json",
            help="Print the full report as JSON (workers, handlers, last success, backlog).",
        )

    def handle(self, *args: Any, as_json: bool, **options: Any) -> None:
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
