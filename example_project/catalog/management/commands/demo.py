"""``manage.py demo``: what ``make demo`` runs after ``migrate``."""

from __future__ import annotations

from typing import Any, TextIO, cast

from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper

from catalog.demo import DemoError, run_demo


class _Stream:
    """The command's stdout as a plain text stream (no newline added per write)."""

    def __init__(self, wrapper: OutputWrapper) -> None:
        self.wrapper = wrapper

    def write(self, text: str) -> None:
        self.wrapper.write(text, ending="")

    def flush(self) -> None:
        self.wrapper.flush()

    def isatty(self) -> bool:
        return self.wrapper.isatty()


class Command(BaseCommand):
    help = (
        "Seed demo work, start the demo shop on 127.0.0.1, run runworkitems --drain until the work "
        "is drained and summarise the run history."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--seed", type=int, default=42, help="Seed of the shop's catalogue.")
        parser.add_argument(
            "--timeout", type=float, default=300, help="Give up after this many seconds."
        )
        parser.add_argument(
            "--http-timeout",
            type=float,
            default=2.0,
            help="The scraper's read timeout during the demo, in seconds.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            run_demo(
                cast(TextIO, _Stream(self.stdout)),  # write, flush and isatty are enough
                shop_seed=options["seed"],
                timeout=options["timeout"],
                http_timeout=options["http_timeout"],
            )
        except DemoError as exc:
            raise CommandError(f"The demo did not finish: {exc}") from exc
        except KeyboardInterrupt:  # the worker and the shop were stopped on the way out
            raise CommandError("The demo was interrupted.", returncode=130) from None
