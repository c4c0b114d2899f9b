"""``manage.py runworkitems``: parse, validate, configure logging, hand over to the service."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_workitems import metrics
from django_workitems.background import BackgroundProcessingService
from django_workitems.conf import MIN_POLL_INTERVAL, app_settings, max_wait, parse_duration
from django_workitems.exceptions import UnknownHandlerError
from django_workitems.handlers import Purpose
from django_workitems.log import configure_logging
from django_workitems.registry import registry
from django_workitems.reports import handler_table

EXIT_FETCH_FAILED = 1
EXIT_USAGE = 2


def _duration(value: str) -> timedelta:
    try:
        return parse_duration(value, minimum=MIN_POLL_INTERVAL, maximum=max_wait())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid duration {value!r}: {exc}") from None


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {number}")
    return number


class Command(BaseCommand):
    help = (
        "Run the registered work item handlers until SIGTERM or SIGINT (one cycle with --once, "
        "until no work is left with --drain)."
    )
    requires_system_checks: list[str] = []  # checked in handle(), to exit 2 on bad settings
    verbosity_given = False  # set by execute(): was -v/--verbosity given?

    def add_arguments(self, parser: CommandParser) -> None:
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--once", action="store_true", help="Run one cycle, then exit.")
        mode.add_argument(
            "--drain",
            action="store_true",
            help="Run cycles until one in which no handler fetched anything, then exit.",
        )
        parser.add_argument(
            "--handler",
            action="append",
            dest="handlers",
            metavar="NAME",
            help="Run only this handler (repeatable).",
        )
        parser.add_argument(
            "--purpose",
            choices=[p.value for p in Purpose],
            help="Run only handlers of this purpose.",
        )
        parser.add_argument(
            "--workers", type=_positive, metavar="N", help="Threads processing items."
        )
        parser.add_argument(
            "--poll-interval",
            type=_duration,
            metavar="HH:MM:SS",
            help="Poll interval for handlers without their own.",
        )
        parser.add_argument("--list", action="store_true", help="List the handlers and exit.")
        parser.add_argument(
            "--max-cycles",
            type=_positive,
            metavar="N",
            help="Stop cleanly (exit 0) after N cycles, for a supervisor to restart the worker.",
        )
        parser.add_argument(
            "--max-memory",
            type=_positive,
            metavar="MB",
            help="Stop cleanly (exit 0) once resident memory passes MB megabytes.",
        )
        parser.add_argument(
            "--health-file",
            metavar="PATH",
            help="Touch PATH at least once a second while the loop runs (a liveness probe: "
            "manage.py workitems_health --file PATH --max-age 60).",
        )
        parser.add_argument(
            "--metrics-port",
            type=_port,
            metavar="PORT",
            help="Serve this worker's Prometheus metrics on PORT "
            "(needs the extra: pip install django-workitems[metrics]).",
        )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # None until execute(): tells an explicit -v/--verbosity from Django's default of 1.
        parser.set_defaults(verbosity=None)
        return parser

    def execute(self, *args: Any, **options: Any) -> Any:
        self.verbosity_given = options.get("verbosity") is not None
        if not self.verbosity_given:
            options["verbosity"] = 1
        return super().execute(*args, **options)

    def handle(self, *args: Any, **options: Any) -> None:
        self._check_configuration()
        # The project's LOGGING wins; only an explicit -v changes the level.
        configure_logging(options["verbosity"] if self.verbosity_given else None)
        try:
            if options["list"]:
                self.stdout.write(
                    handler_table(registry.select(options["handlers"], options["purpose"]))
                )
                return
            service = BackgroundProcessingService(
                handlers=options["handlers"],
                purpose=options["purpose"],
                workers=options["workers"],
                poll_interval=options["poll_interval"],
                install_signal_handlers=True,
                max_cycles=options["max_cycles"],
                max_memory_mb=options["max_memory"],
                health_file=options["health_file"],
                metrics_port=options["metrics_port"],
            )
        except (UnknownHandlerError, ImproperlyConfigured) as exc:
            raise CommandError(str(exc), returncode=EXIT_USAGE) from exc
        if options["metrics_port"] is not None and not metrics.available():
            raise CommandError(
                "--metrics-port needs prometheus-client: pip install django-workitems[metrics]",
                returncode=EXIT_USAGE,
            )
        if not service.registrations:
            raise CommandError(
                "No handlers selected: none are registered, or none match.", returncode=EXIT_USAGE
            )
        if not (options["once"] or options["drain"]):
            service.run()
            if service.exit_code:
                raise CommandError(
                    "too many threads were given up on hung calls; exiting so that the "
                    "supervisor starts a fresh worker",
                    returncode=service.exit_code,
                )
            return
        result = service.run_drain() if options["drain"] else service.run_once()
        for outcome in result:
            state = (
                (outcome.skipped and f"skipped ({outcome.skipped})")
                or (outcome.status and outcome.status.value)
                or "nothing to do"
            )
            self.stdout.write(
                f"{outcome.handler}: {state}, {outcome.fetched} fetched, "
                f"{outcome.succeeded} succeeded, {outcome.failed} failed"
            )
        if not result.ok:
            raise CommandError(
                f"fetch failed for: {', '.join(result.failed_fetches)}",
                returncode=EXIT_FETCH_FAILED,
            )

    def _check_configuration(self) -> None:
        """Fail with exit code 2, before any handler runs, on a bad setting or check error."""
        problems = app_settings.problems()
        if problems:
            raise CommandError(
                "Invalid settings:\n" + "\n".join(f"{p.check_id}: {p}" for p in problems),
                returncode=EXIT_USAGE,
            )
        from django.core.management.base import SystemCheckError

        try:
            self.check(display_num_errors=False)
        except SystemCheckError as exc:
            raise CommandError(str(exc), returncode=EXIT_USAGE) from exc
