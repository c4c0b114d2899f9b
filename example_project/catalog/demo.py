"""``make demo``: seed work, start the loopback shop, run a worker until the work is drained.

:func:`run_demo` is what ``manage.py demo`` runs and what the end-to-end test runs. The worker
is a real ``manage.py runworkitems`` process, stopped with SIGTERM once the database says
there is nothing left to do.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from demo_shop import FAULTS, DemoShop
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Count, Sum
from django.utils import timezone

from django_workitems.models import HandlerRun, RunStatus

from .handlers.webhook import BatchWebhookHandler
from .models import CsvImport, Product, StagingBatch, count_by_status

DEMO_FILES = Path(settings.BASE_DIR) / "demo_data" / "inbox"
STALE_AGE = timedelta(days=90)
ADMIN_USER = ADMIN_PASSWORD = "admin"  # noqa: S105 - a demo account on a loopback server


class DemoError(Exception):
    """The demo did not finish: the worker died or the work was not drained in time."""


# -- seeding ------------------------------------------------------------------------------


def seed(shop_url: str, categories: list[str], *, inbox: Path) -> list[str]:
    """Start afresh: one queued batch per shop category, two stale batches, CSV files, admin.

    Deletes the catalogue's rows and the inbox first, so the demo tells the same story each
    time; the workers' run history is kept.
    """
    StagingBatch.objects.all().delete()
    Product.objects.all().delete()
    CsvImport.objects.all().delete()
    if inbox.exists():
        shutil.rmtree(inbox)
    inbox.mkdir(parents=True)

    StagingBatch.objects.bulk_create(
        StagingBatch(source_url=f"{shop_url}/c/{slug}/", category=slug) for slug in categories
    )
    long_ago = timezone.now() - STALE_AGE
    stale = StagingBatch.objects.bulk_create(
        StagingBatch(
            source_url=f"{shop_url}/c/{slug}/",
            category=f"{slug} (spring sale)",
            status=StagingBatch.STATUS.succeeded,
            attempts=1,
            scraped_at=long_ago,
            notified_at=long_ago,
        )
        for slug in categories[:2]
    )
    # TimeStampedModel sets created/modified on save: backdate them afterwards.
    StagingBatch.objects.filter(pk__in=[b.pk for b in stale]).update(
        created=long_ago, modified=long_ago
    )

    files = sorted(DEMO_FILES.glob("*.csv"))
    for path in files:
        shutil.copyfile(path, inbox / path.name)

    lines = [
        f"Queued {len(categories)} staging batches, one per shop category "
        f"(catalog.scrape-store), and {len(stale)} batches {STALE_AGE.days} days old "
        "for catalog.purge-stale-batches.",
        f"Dropped {len(files)} CSV files into {_relative(inbox)} (catalog.import-csv): "
        + ", ".join(p.name for p in files)
        + ".",
    ]
    user_model = get_user_model()
    if user_model.objects.filter(username=ADMIN_USER).exists():
        lines.append(f"The superuser {ADMIN_USER} is already there (password: {ADMIN_PASSWORD}).")
    else:
        user_model.objects.create_superuser(ADMIN_USER, "admin@example.com", ADMIN_PASSWORD)
        lines.append(f"Created the superuser {ADMIN_USER} (password: {ADMIN_PASSWORD}).")
    return lines


# -- watching -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Where the work stands, from the database and the inbox."""

    batches: Mapping[str, int]
    retrying: int
    products: int
    csv_waiting: int
    to_notify: int
    notified: int
    stale: int
    runs_running: int

    @property
    def drained(self) -> bool:
        """Nothing queued or in process anywhere, and every run recorded as finished."""
        waiting = self.batches.get("queued", 0) + self.batches.get("processing", 0)
        return not (
            waiting or self.csv_waiting or self.to_notify or self.stale or self.runs_running
        )

    def line(self, elapsed: float) -> str:
        done, failed, claimed, queued = (
            self.batches.get(status, 0)
            for status in ("succeeded", "failed", "processing", "queued")
        )
        return (
            f"[{elapsed:5.1f}s] batches: {done} done, {failed} failed, {claimed} claimed, "
            f"{queued} queued ({self.retrying} retrying) | products: {self.products}"
            f" | CSV files: {self.csv_waiting} | webhooks: {self.notified} | stale: {self.stale}"
        )


def progress(since: datetime, inbox: Path, *, webhooks: bool) -> Progress:
    """The state of the demo's work; ``webhooks`` when the worker has a webhook URL."""
    live = StagingBatch.objects.filter(created__gte=since)  # not the backdated stale ones
    return Progress(
        batches=count_by_status(live),
        retrying=live.filter(status=StagingBatch.STATUS.queued, attempts__gt=0).count(),
        products=Product.objects.count(),
        csv_waiting=len(list(inbox.glob("*.csv"))) if inbox.is_dir() else 0,
        to_notify=(
            StagingBatch.objects.to_notify(BatchWebhookHandler.max_attempts).count()
            if webhooks
            else 0
        ),
        notified=live.exclude(notified_at=None).count(),
        stale=StagingBatch.objects.stale(
            timedelta(days=settings.CATALOG_BATCH_RETENTION_DAYS)
        ).count(),
        runs_running=HandlerRun.objects.filter(
            status=RunStatus.RUNNING, started_at__gte=since
        ).count(),
    )


# -- running ------------------------------------------------------------------------------


@dataclass
class DemoResult:
    started: datetime
    seconds: float
    worker_exit_code: int | None
    webhooks: list[Any] = field(default_factory=list)


def run_demo(
    out: TextIO,
    *,
    shop_seed: int = 42,
    timeout: float = 300.0,
    http_timeout: float = 2.0,
    worker_env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> DemoResult:
    """Seed, start the shop, run ``runworkitems`` until drained, SIGTERM it, print a summary.

    ``worker_env`` adds to the worker's environment (the tests point ``DATABASE_URL`` at the
    test database). Raises :class:`DemoError` when the worker dies or ``timeout`` passes.
    """
    inbox = Path(settings.CATALOG_INBOX_DIR)
    log_path = log_path or Path(settings.BASE_DIR) / "var" / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = timezone.now()
    clock = time.monotonic()
    # Slow pages stay well within the scraper's timeout; the hanging one goes past it.
    with DemoShop(seed=shop_seed, slow_seconds=0.1, hang_seconds=http_timeout + 2) as shop:
        _say(out, f"Demo shop serving {len(shop.products)} products at {shop.url}/")
        for slug, fault in FAULTS.items():
            _say(out, f"  {slug}: {fault}")
        for line in seed(shop.url, list(shop.catalogue), inbox=inbox):
            _say(out, line)

        env = {
            **os.environ,
            "CATALOG_INBOX_DIR": str(inbox),
            "CATALOG_WEBHOOK_URL": shop.webhook_url,
            "CATALOG_SCRAPE_HOSTS": "127.0.0.1",
            # Demo pace: short timeouts and retries a second apart, not the production values.
            "CATALOG_HTTP_TIMEOUT": str(http_timeout),
            "CATALOG_SCRAPE_RETRY_BACKOFF": "1",
            **(worker_env or {}),
        }
        command = [
            sys.executable,
            str(Path(settings.BASE_DIR) / "manage.py"),
            "runworkitems",
            "--drain",
        ]
        _say(out, f"Starting the worker: runworkitems --drain (log: {_relative(log_path)})")
        exit_code = _drain(out, command, env, started, clock, inbox, timeout, log_path)
        webhooks = list(shop.webhooks)
    if exit_code != 0:
        raise DemoError(f"the worker exited with {exit_code}; see {log_path}")
    result = DemoResult(started, time.monotonic() - clock, exit_code, webhooks)
    for line in summary(result):
        _say(out, line)
    return result


def _drain(
    out: TextIO,
    command: list[str],
    env: Mapping[str, str],
    since: datetime,
    clock: float,
    inbox: Path,
    timeout: float,
    log_path: Path,
) -> int | None:
    """Run ``runworkitems --drain`` until the work is drained; its progress lines are echoed.

    A drain ends at the first cycle in which nothing was fetched, so a retry still waiting out
    its back-off is left for a next round, started when the earliest retry is due.
    """
    deadline = clock + timeout
    rounds = 0
    with log_path.open("w") as log:
        while True:
            rounds += 1
            worker = subprocess.Popen(  # noqa: S603 - our own manage.py, fixed arguments
                command,
                cwd=settings.BASE_DIR,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            echo = threading.Thread(target=_echo, args=(out, worker, log), daemon=True)
            echo.start()
            try:
                exit_code = worker.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _stop(out, worker, "Giving up")
                echo.join(10)
                raise DemoError(
                    f"the work was not drained within {timeout:.0f}s; see {log_path}"
                ) from None
            except BaseException:
                _stop(out, worker, "Interrupted")
                raise
            echo.join(10)
            state = progress(since, inbox, webhooks=True)
            _say(out, state.line(time.monotonic() - clock))
            if exit_code != 0:
                return exit_code
            if state.drained:
                _say(out, f"Drained: the worker exited 0 after {_plural(rounds, 'round')}")
                return exit_code
            due = next_retry_in(since)
            if time.monotonic() + due > deadline:
                raise DemoError(f"the work was not drained within {timeout:.0f}s; see {log_path}")
            _say(out, f"Retries wait out their back-off: the next round in {due:.1f}s")
            time.sleep(due)  # the earliest retry's back-off, bounded by the deadline


def next_retry_in(since: datetime) -> float:
    """Seconds until the earliest queued batch waiting out a back-off is available (>= 0)."""
    earliest = (
        StagingBatch.objects.filter(created__gte=since, status=StagingBatch.STATUS.queued)
        .order_by("available_at")
        .values_list("available_at", flat=True)
        .first()
    )
    if earliest is None:
        return 0.0
    return max(0.0, (earliest - timezone.now()).total_seconds())


def _echo(out: TextIO, worker: subprocess.Popen[str], log: TextIO) -> None:
    """Copy the worker's output to the log; show its drain progress lines."""
    assert worker.stdout is not None
    for line in worker.stdout:
        log.write(line)
        log.flush()
        if "Draining:" in line:
            _say(out, "  worker: " + line.strip().split("Draining: ", 1)[-1])
    worker.stdout.close()


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _stop(out: TextIO, worker: subprocess.Popen[str], why: str) -> int | None:
    """SIGTERM, as a process manager does; kill only if the graceful stop hangs."""
    if worker.poll() is None:
        _say(out, f"{why}: stopping the worker with SIGTERM")
        worker.send_signal(signal.SIGTERM)
        try:
            return worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
            return None
    return worker.returncode


# -- reporting ----------------------------------------------------------------------------


def summary(result: DemoResult) -> list[str]:
    """What the workers did during the demo, per handler, and where to look next."""
    rows = (
        HandlerRun.objects.filter(started_at__gte=result.started)
        .values("handler__name")
        .annotate(
            runs=Count("id"),
            items=Sum("items_fetched"),
            succeeded=Sum("items_succeeded"),
            failed=Sum("items_failed"),
        )
        .order_by("handler__name")
    )
    lines = [f"\nDone in {result.seconds:.1f}s. Runs of this demo, per handler:"]
    lines += _table(
        [("HANDLER", "RUNS", "ITEMS", "SUCCEEDED", "FAILED")]
        + [(r["handler__name"], r["runs"], r["items"], r["succeeded"], r["failed"]) for r in rows]
    )

    lines.append("\nStaging batches (catalog.scrape-store; a failed attempt is retried):")
    batches = StagingBatch.objects.order_by("pk")
    lines += _table(
        [("BATCH", "STATUS", "ATTEMPTS", "PAGES", "PRODUCTS", "REASON")]
        + [
            (
                b.category,
                b.status,
                b.attempts,
                b.pages_fetched,
                b.products_found,
                b.reason if b.status == StagingBatch.STATUS.failed else "",
            )
            for b in batches
        ]
    )

    lines.append("\nCSV files (catalog.import-csv; bad rows are reported, not fatal):")
    for record in CsvImport.objects.order_by("file_name"):
        detail = (
            f"{record.rows_imported} of {record.rows_total} rows imported"
            if record.status != CsvImport.Status.REJECTED
            else record.errors
        )
        lines.append(f"  {record.file_name}: {record.status}, {detail}")
        if record.status == CsvImport.Status.PARTIAL:
            lines += [f"    {error}" for error in record.errors.splitlines()]

    by_source = dict(Product.objects.order_by().values_list("source").annotate(n=Count("pk")))
    lines.append(
        f"\nCatalogue: {sum(by_source.values())} products ({by_source.get('shop', 0)} from the "
        f"shop, {by_source.get('csv', 0)} from CSV files). The shop received "
        f"{len(result.webhooks)} webhooks (catalog.notify-batches)."
    )
    lines.append(
        "\nLook at the history in the admin: run `make serve`, open "
        f"http://127.0.0.1:8000/admin/ and log in as {ADMIN_USER} / password {ADMIN_PASSWORD} "
        "(GraphQL: http://127.0.0.1:8000/graphql/)."
    )
    return lines


def _table(rows: list[tuple[Any, ...]]) -> list[str]:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _say(out: TextIO, line: str) -> None:
    out.write(line + "\n")


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(settings.BASE_DIR))
    except ValueError:
        return str(path)
