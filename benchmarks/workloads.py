"""The workloads of the benchmark, run in a process configured (once) for one database.

Each workload measures its figure and its baseline in this run and returns :class:`Result` rows.
Workloads 1, 2, 4 and 6 drive real ``runworkitems`` subprocesses (started with this process's
``DJANGO_SETTINGS_MODULE`` and ``DATABASE_URL``); 3, 5 and 7 run the engine in this process.
Workloads 13 and 14 (PostgreSQL only) live in :mod:`benchmarks.scaleout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max, Min
from django.test.utils import override_settings
from django.utils import timezone

import django_workitems as workitems
from django_workitems import recording
from django_workitems.background import BackgroundProcessingService, run_once
from django_workitems.handlers import CancellationToken, current_worker_id
from django_workitems.models import Handler, HandlerRun, Worker, db_now
from django_workitems.registry import HandlerRegistry

from .handlers import (
    IO_SECONDS,
    AsyncSleepHandler,
    DrainHandler,
    SlowHandler,
    StaticHandler,
    Stopwatch,
    Ticket,
    list_factory,
    tickets,
)
from .models import BenchItem
from .results import Result

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / "build" / "bench"
STATUS = BenchItem.STATUS
CLAIM_BATCH = 100
"""Rows per claim, in the engine's drain handlers and in the bare baseline alike."""


class BenchError(RuntimeError):
    """A workload could not be measured (a worker died, a deadline passed)."""


@dataclass(frozen=True)
class Sizes:
    """How big each workload is: the issue's numbers, or a small smoke run."""

    drain_items: int = 20_000
    io_items: int = 2_000
    io_workers: int = 16
    overhead_items: int = 100_000
    wakeups: int = 100
    flood_items: int = 5_000
    small_items: int = 20
    item_seconds: float = 0.005
    memory_checkpoints: tuple[int, ...] = (100, 1_000, 5_000, 10_000)
    history_rows: int = 1_000_000
    queued_rows: int = 10_000
    claims: int = 30
    repeats: int = 3
    fairness_repeats: int = 5
    orm_items: int = 20_000
    census_items: int = 2_000
    scaleout_processes: tuple[int, ...] = (1, 2, 4)


FULL = Sizes()
QUICK = Sizes(
    drain_items=1_000,
    io_items=160,
    overhead_items=5_000,
    wakeups=5,
    flood_items=300,
    memory_checkpoints=(10, 50, 100),
    history_rows=10_000,
    queued_rows=1_000,
    claims=5,
    repeats=1,
    fairness_repeats=1,
    orm_items=500,
    census_items=100,
    scaleout_processes=(1, 2),
)


@dataclass(frozen=True)
class Bench:
    """The run's settings, as the workloads see them."""

    db: str
    sizes: Sizes
    quick: bool

    @property
    def postgres(self) -> bool:
        return connection.vendor == "postgresql"

    def say(self, message: str) -> None:
        print(f"[{self.db}] {message}", file=sys.stderr, flush=True)


# -- the table of work items -------------------------------------------------------------


def _table() -> str:
    return str(connection.ops.quote_name(BenchItem._meta.db_table))


def reset_items() -> None:
    """Empty the work item table."""
    verb = "TRUNCATE" if connection.vendor == "postgresql" else "DELETE FROM"
    with connection.cursor() as cursor:
        cursor.execute(f"{verb} {_table()}")


def insert_items(count: int, *, finished: bool = False, claimed_by: int | None = None) -> None:
    """Insert ``count`` rows in one statement: queued, or succeeded long ago (the history).

    Finished rows look like real ones: a claim token each, the worker that claimed them.
    """
    now = timezone.now()
    stamp = connection.ops.adapt_datetimefield_value(now - timedelta(days=1) if finished else now)
    values = [
        STATUS.succeeded if finished else STATUS.queued,
        1 if finished else 0,
        stamp,
        claimed_by if finished else None,
        stamp if finished else None,
        stamp,
        stamp,
    ]
    columns = (
        "status, attempts, available_at, claimed_by_id, claimed_at, claim_token, last_error,"
        " created, modified"
    )
    if connection.vendor == "postgresql":
        token = "gen_random_uuid()" if finished else "NULL"
        sql = (
            f"INSERT INTO {_table()} ({columns})"  # noqa: S608 - our own table and literals
            f" SELECT %s, %s, %s::timestamptz, %s::bigint, %s::timestamptz, {token}, '',"
            " %s::timestamptz, %s::timestamptz FROM generate_series(1, %s)"
        )
        params = [*values, count]
    else:
        token = "lower(hex(randomblob(16)))" if finished else "NULL"
        sql = (
            f"INSERT INTO {_table()} ({columns})"  # noqa: S608 - our own table and literals
            " WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %s)"
            f" SELECT %s, %s, %s, %s, %s, {token}, '', %s, %s FROM n"
        )
        params = [count, *values]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def analyze() -> None:
    """Fresh planner statistics, as autovacuum (or a DBA) would have them on a real table."""
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {_table()}")


def fresh_items(count: int) -> None:
    reset_items()
    insert_items(count)
    analyze()


# -- subprocesses --------------------------------------------------------------------------


class Subprocess:
    """A child process whose stdout lines are read on a thread; stderr goes to a log file."""

    def __init__(self, args: list[str], *, log_name: str, env: dict[str, str] | None = None):
        self.log_path = LOG_DIR / f"{log_name}.log"
        self._log = self.log_path.open("w")
        self.lines: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"{self.log_path.stem} exited with {self.proc.returncode}; see {self.log_path}"
            )

    def expect(self, prefix: str, timeout: float) -> list[str]:
        """The fields of the next stdout line that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(
                    f"no {prefix!r} line from {self.log_path.stem} within {timeout:.0f}s; "
                    f"see {self.log_path}"
                )
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                self.check_alive()
                continue
            fields = line.split()
            if fields and fields[0] == prefix:
                return fields[1:]

    def stop(self) -> None:
        """SIGTERM, as a supervisor would; kill if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> Subprocess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_worker(
    handler: str, *args: str, log_name: str, env: dict[str, str] | None = None
) -> Subprocess:
    """``python -m django runworkitems`` for one handler, idle unless woken or draining."""
    command = ["-m", "django", "runworkitems", "--handler", handler, "--poll-interval", "01:00:00"]
    return Subprocess([*command, *args], log_name=log_name, env=env)


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, worker: Subprocess | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if worker is not None:
            worker.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _percentile(values: list[float], percent: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


# -- 1 and 2: draining a table of work items ---------------------------------------------------


def bare_drain(count: int, threads: int, *, durable: bool = False) -> float:
    """Baseline of workload 1: a bare pool of threads, each claiming 100 ids at a time.

    In one transaction: ``SELECT ... FOR UPDATE SKIP LOCKED`` of 100 ids, the (empty) work of
    each, and one UPDATE marking them done. The row locks are the claim: the least a database
    can do for this workload. With ``durable``, the claim is committed first (an UPDATE to
    ``processing``), as it must be when work may outlast a transaction, and the ids are marked
    done after the work: a second write per row, like any claiming engine.
    Returns items per second.
    """

    def loop() -> int:
        done = 0
        try:
            while True:
                with transaction.atomic():
                    ids = list(
                        BenchItem.objects.filter(
                            status=STATUS.queued, available_at__lte=timezone.now()
                        )
                        .order_by("available_at", "pk")
                        .select_for_update(skip_locked=True)
                        .values_list("pk", flat=True)[:CLAIM_BATCH]
                    )
                    if not ids:
                        return done
                    if durable:
                        BenchItem.objects.filter(pk__in=ids).update(
                            status=STATUS.processing, claimed_at=timezone.now()
                        )
                    else:
                        for _ in ids:
                            pass  # the work of the item: nothing
                        BenchItem.objects.filter(pk__in=ids).update(
                            status=STATUS.succeeded, modified=timezone.now()
                        )
                if durable:
                    for _ in ids:
                        pass
                    BenchItem.objects.filter(pk__in=ids, status=STATUS.processing).update(
                        status=STATUS.succeeded, modified=timezone.now()
                    )
                done += len(ids)
        finally:
            connection.close()

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(loop) for _ in range(threads)]
        done = sum(f.result() for f in futures)
    elapsed = time.monotonic() - started
    if done != count:
        raise BenchError(f"the bare drain marked {done} of {count} rows done")
    return count / elapsed


def worker_drain(bench: Bench, handler: str, count: int, workers: int) -> dict[str, Any]:
    """Drain ``count`` queued rows with a ``runworkitems`` process; returns its timings.

    The time is the rows' own: from the first claim to the last outcome written, so the
    process's start-up (Python, Django, migrations check) is not counted.
    """
    since = timezone.now()
    with start_worker(handler, "--workers", str(workers), log_name=f"{bench.db}-{handler}") as w:
        wait_until(
            lambda: (
                not BenchItem.objects.filter(status__in=[STATUS.queued, STATUS.processing]).exists()
            ),
            timeout=max(120, count / 50),
            what=f"{handler} to drain {count} rows",
            worker=w,
        )
    span = BenchItem.objects.aggregate(start=Min("claimed_at"), end=Max("modified"))
    succeeded = BenchItem.objects.filter(status=STATUS.succeeded).count()
    if succeeded != count:
        raise BenchError(f"{handler}: {succeeded} of {count} rows succeeded")
    seconds = (span["end"] - span["start"]).total_seconds()
    runs = HandlerRun.objects.filter(handler__name=handler, started_at__gte=since).count()
    return {"seconds": seconds, "items_per_s": count / seconds, "runs": runs}


def drain_trivial(bench: Bench) -> list[Result]:
    """Workload 1: 20,000 rows whose work is nothing; runworkitems (4 workers) vs a bare loop."""
    count, threads = bench.sizes.drain_items, 4
    bare: list[float] = []
    durable: list[float] = []
    engine: list[dict[str, Any]] = []
    for _ in range(bench.sizes.repeats):  # interleaved, so drift in the machine hits all
        fresh_items(count)
        bare.append(bare_drain(count, threads))
        fresh_items(count)
        durable.append(bare_drain(count, threads, durable=True))
        fresh_items(count)
        engine.append(worker_drain(bench, "bench.drain", count, threads))
    best = max(engine, key=lambda e: e["items_per_s"])
    figure, baseline, durable_best = best["items_per_s"], max(bare), max(durable)
    ratio = figure / baseline
    bench.say(
        f"1 drain: {figure:,.0f} items/s vs bare {baseline:,.0f} ({ratio:.2f}), "
        f"vs claim-then-mark {durable_best:,.0f} ({figure / durable_best:.2f})"
    )
    return [
        Result(
            workload="1 drain, trivial items",
            db=bench.db,
            figure=figure,
            unit="items/s",
            baseline=baseline,
            baseline_label="bare SKIP LOCKED loop",
            ratio=ratio,
            target=">= 0.80 of bare (PostgreSQL)",
            met=ratio >= 0.8 if bench.postgres else None,
            details={
                "items": count,
                "workers": threads,
                "claim_batch": CLAIM_BATCH,
                "engine_items_per_s": [e["items_per_s"] for e in engine],
                "engine_runs": [e["runs"] for e in engine],
                "bare_items_per_s": bare,
                "best_of": bench.sizes.repeats,
            },
        ),
        Result(
            workload="1 drain (context)",
            db=bench.db,
            figure=figure,
            unit="items/s",
            baseline=durable_best,
            baseline_label="bare claim-then-mark loop",
            ratio=figure / durable_best,
            target="none: context",
            details={
                "what": "the bare loop with its claim committed before the work (2 writes/row)",
                "bare_items_per_s": durable,
            },
        ),
    ]


def drain_io(bench: Bench) -> list[Result]:
    """Workload 2: 2,000 rows that each wait 20 ms, 16 workers: wall time against the ideal."""
    count, workers = bench.sizes.io_items, bench.sizes.io_workers
    ideal = count * IO_SECONDS / workers
    engine: list[dict[str, Any]] = []
    for _ in range(bench.sizes.repeats):
        fresh_items(count)
        engine.append(worker_drain(bench, "bench.io", count, workers))
    started = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: time.sleep(IO_SECONDS), range(count)))
    bare = time.monotonic() - started
    figure = min(e["seconds"] for e in engine)
    ratio = figure / ideal
    bench.say(f"2 I/O drain: {figure:.2f}s vs ideal {ideal:.2f}s ({ratio:.2f}x)")
    return [
        Result(
            workload="2 drain, I/O-bound items",
            db=bench.db,
            figure=figure,
            unit="s",
            baseline=ideal,
            baseline_label="ideal",
            ratio=ratio,
            target="<= 1.2x ideal",
            met=ratio <= 1.2,
            details={
                "items": count,
                "workers": workers,
                "item_seconds": IO_SECONDS,
                "engine_seconds": [e["seconds"] for e in engine],
                "engine_runs": [e["runs"] for e in engine],
                "bare_pool_seconds": bare,
                "best_of": bench.sizes.repeats,
            },
        )
    ]


# -- 3: the framework's own cost per item ------------------------------------------------------


def _noop(item: object) -> None:
    pass


def framework_overhead(bench: Bench) -> list[Result]:
    """Workload 3: 100,000 in-memory items, no-op ``process``: a cycle vs ``pool.map``."""
    count, threads = bench.sizes.overhead_items, 4
    items = tickets(count)
    bare: list[float] = []
    engine: list[float] = []
    for _ in range(bench.sizes.repeats):
        started = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(_noop, items):
                pass
        bare.append(count / (time.monotonic() - started))

        registry = HandlerRegistry()
        source = list(items)
        registry.add_handler(
            functools.partial(StaticHandler, source),
            name="bench.overhead",
            max_items_per_cycle=count,
        )
        # One cycle takes every item: the channel must hold them all.
        options = {**settings.WORKITEMS, "QUEUE_SIZE": count, "WORKERS": threads}
        with override_settings(WORKITEMS=options):
            started = time.monotonic()
            result = run_once(registry=registry, workers=threads)
            elapsed = time.monotonic() - started
        if result["bench.overhead"].succeeded != count:
            raise BenchError(f"the cycle processed {result['bench.overhead'].succeeded} items")
        engine.append(count / elapsed)
    figure, baseline = max(engine), max(bare)
    ratio = figure / baseline
    bench.say(f"3 overhead: {figure:,.0f} items/s vs bare {baseline:,.0f} ({ratio:.2f})")
    return [
        Result(
            workload="3 framework overhead",
            db=bench.db,
            figure=figure,
            unit="items/s",
            baseline=baseline,
            baseline_label="ThreadPoolExecutor.map",
            ratio=ratio,
            target=">= 0.50 of bare",
            met=ratio >= 0.5,
            details={
                "items": count,
                "workers": threads,
                "engine_items_per_s": engine,
                "bare_items_per_s": bare,
                "best_of": bench.sizes.repeats,
            },
        )
    ]


# -- 4: wake-up latency ----------------------------------------------------------------------

WARMUP = 3


def raw_notify_latencies(bench: Bench, count: int) -> list[float]:
    """Baseline of workload 4: NOTIFY to a bare LISTEN loop in another process, in ms."""
    latencies = []
    with Subprocess(["-m", "benchmarks.listen"], log_name=f"{bench.db}-listen") as listener:
        listener.expect("bench-ready", timeout=30)
        for number in range(WARMUP + count):
            sent = time.monotonic()
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_notify('bench_raw', %s)", [str(number)])
            _payload, received = listener.expect("bench-raw", timeout=10)
            if number >= WARMUP:
                latencies.append((float(received) - sent) * 1000)
            time.sleep(random.uniform(0.02, 0.05))
    return latencies


def wakeup_latency(bench: Bench) -> list[Result]:
    """Workload 4: an idle worker; queue one row and ``notify``; time until ``process`` starts."""
    count = bench.sizes.wakeups
    reset_items()
    latencies: list[float] = []
    early = 0
    with start_worker("bench.wake", log_name=f"{bench.db}-bench.wake") as worker:
        for number in range(WARMUP + count):
            sent = time.monotonic()  # from before the INSERT: enqueueing is on the path too
            BenchItem.objects.create()
            workitems.notify("bench.wake")
            _pk, started = worker.expect("bench-wake", timeout=30)
            latency = (float(started) - sent) * 1000
            if number >= WARMUP:
                if latency < 0:
                    # The worker's once-a-second read of the run requests of the previous
                    # notify started a fetch that took the row before this notify was sent.
                    early += 1
                else:
                    latencies.append(latency)
            # Long enough for the activation to end, so the worker is idle again when the
            # next row comes. Without LISTEN the worker reads run requests once a second: a
            # fixed pause would lock onto that rhythm, so it is spread over a whole second.
            time.sleep(random.uniform(0.1, 0.2) if bench.postgres else random.uniform(0.1, 1.1))
    raw = raw_notify_latencies(bench, count) if bench.postgres else []
    results = []
    for percent, limit in ((50, 10.0), (95, 30.0)):
        figure = _percentile(latencies, percent)
        baseline = _percentile(raw, percent) if raw else None
        results.append(
            Result(
                workload=f"4 wake-up latency p{percent}",
                db=bench.db,
                figure=figure,
                unit="ms",
                baseline=baseline,
                baseline_label="bare LISTEN/NOTIFY" if raw else "",
                ratio=figure / baseline if baseline else None,
                target=f"< {limit:.0f} ms (PostgreSQL)",
                met=figure < limit if bench.postgres else None,
                details={
                    "wakeups": count,
                    "measured": len(latencies),
                    "taken_before_notify": early,
                    "max_ms": max(latencies),
                    "bare_max_ms": max(raw) if raw else None,
                    "path": "LISTEN/NOTIFY" if bench.postgres else "run_requested_at, read 1/s",
                },
            )
        )
    bench.say(
        f"4 wake-up: p50 {results[0].figure:.1f} ms, p95 {results[1].figure:.1f} ms"
        + (f" (bare {results[0].baseline:.1f} / {results[1].baseline:.1f} ms)" if raw else "")
    )
    return results


# -- 5: fairness -----------------------------------------------------------------------------


def small_completion(bench: Bench, *, flood: int, workers: int) -> float:
    """Seconds from the first fetch until the small handler's last item is done.

    The flood handler claims atomically (``exclusive=False``), so it may fill the channel as
    fast as it likes: the hardest case for the small one.
    """
    sizes = bench.sizes
    watch = Stopwatch()
    registry = HandlerRegistry()
    registry.add_handler(
        list_factory("small", tickets(sizes.small_items), sizes.item_seconds, watch),
        name="bench.small",
    )
    if flood:
        registry.add_handler(
            list_factory("flood", tickets(flood), sizes.item_seconds, watch),
            name="bench.flood",
            exclusive=False,
        )
    service = BackgroundProcessingService(
        registry=registry, workers=workers, poll_interval=timedelta(hours=1)
    )
    thread = threading.Thread(target=service.run, name="bench-coordinator")
    thread.start()
    try:
        if not watch.when_done("small", sizes.small_items).wait(120):
            raise BenchError("the small handler did not finish within 120s")
    finally:
        service.stop()
        thread.join(60)
    return max(watch.done["small"]) - min(watch.first_fetch.values())


def fairness(bench: Bench) -> list[Result]:
    """Workload 5: a small handler beside a flood, against the small one alone on half the pool."""
    sizes = bench.sizes
    alone, together = [], []
    for _ in range(sizes.fairness_repeats):
        alone.append(small_completion(bench, flood=0, workers=2))
        together.append(small_completion(bench, flood=sizes.flood_items, workers=4))
    figure, baseline = statistics.median(together), statistics.median(alone)
    ratio = figure / baseline
    bench.say(f"5 fairness: small done in {figure * 1000:.0f} ms vs alone {baseline * 1000:.0f} ms")
    return [
        Result(
            workload="5 fairness (small beside flood)",
            db=bench.db,
            figure=figure * 1000,
            unit="ms",
            baseline=baseline * 1000,
            baseline_label="alone, 2 workers",
            ratio=ratio,
            target="<= 1.5x",
            met=ratio <= 1.5,
            details={
                "flood_items": sizes.flood_items,
                "small_items": sizes.small_items,
                "item_seconds": sizes.item_seconds,
                "together_ms": [t * 1000 for t in together],
                "alone_ms": [t * 1000 for t in alone],
                "median_of": sizes.fairness_repeats,
            },
        )
    ]


# -- 6: memory -------------------------------------------------------------------------------


def memory(bench: Bench) -> list[Result]:
    """Workload 6: resident memory of a worker after 100 and after 10,000 cycles of 10 items."""
    checkpoints = bench.sizes.memory_checkpoints
    env = {"BENCH_MEMORY_CHECKPOINTS": ",".join(str(c) for c in checkpoints)}
    rss: dict[int, float] = {}
    times: dict[int, float] = {}
    with start_worker("bench.memory", log_name=f"{bench.db}-bench.memory", env=env) as worker:
        for _ in checkpoints:
            cycles, megabytes = worker.expect("bench-rss", timeout=1800)
            rss[int(cycles)] = float(megabytes)
            times[int(cycles)] = time.monotonic()
    first, last = checkpoints[0], checkpoints[-1]
    drift = rss[last] - rss[first]
    rate = (last - first) / (times[last] - times[first])
    bench.say(f"6 memory: {rss[first]:.1f} MB -> {rss[last]:.1f} MB ({rate:,.0f} cycles/s)")
    return [
        Result(
            workload=f"6 memory drift ({first} -> {last} cycles)",
            db=bench.db,
            figure=drift,
            unit="MB",
            baseline=rss[first],
            baseline_label=f"RSS after {first}",
            ratio=rss[last] / rss[first],
            target="drift < 5 MB",
            met=drift < 5,
            details={"rss_mb": rss, "cycles_per_s": rate, "items_per_cycle": 10},
        )
    ]


# -- 7: claims on a big table --------------------------------------------------------------------


def measure_claims(count: int, worker_id: int) -> dict[str, float]:
    """Median ms of a handler's fetch (the whole claim path) and of a bare ``claim()``."""
    handler = DrainHandler()
    token = CancellationToken()
    fetches, claims = [], []
    for _ in range(count):
        started = time.perf_counter()
        rows = handler.fetch_next(CLAIM_BATCH, token)
        fetches.append(time.perf_counter() - started)
        started = time.perf_counter()
        more = BenchItem.objects.claim(CLAIM_BATCH, worker_id=worker_id)
        claims.append(time.perf_counter() - started)
        if len(rows) != CLAIM_BATCH or len(more) != CLAIM_BATCH:
            raise BenchError(f"claimed {len(rows)} and {len(more)} rows, not {CLAIM_BATCH}")
    return {
        "fetch_ms": statistics.median(fetches) * 1000,
        "claim_ms": statistics.median(claims) * 1000,
    }


def _rows(count: int) -> str:
    return f"{count // 1_000_000}M" if count % 1_000_000 == 0 else f"{count:,}"


def claim_at_scale(bench: Bench) -> list[Result]:
    """Workload 7: claiming 100 rows beside 1,000,000 finished ones, vs beside none."""
    sizes = bench.sizes
    if sizes.queued_rows < 2 * sizes.claims * CLAIM_BATCH:
        raise BenchError("not enough queued rows for the claims")
    worker = recording.register_worker()  # the claims are a live worker's
    gone = Worker.objects.create(hostname="gone", pid=1, stopped_at=timezone.now())
    context = current_worker_id.set(worker.pk)
    try:
        fresh_items(sizes.queued_rows)
        empty = measure_claims(sizes.claims, worker.pk)
        bench.say(f"7 claims: inserting {sizes.history_rows:,} finished rows")
        reset_items()
        started = time.monotonic()
        insert_items(sizes.history_rows, finished=True, claimed_by=gone.pk)
        insert_items(sizes.queued_rows)
        analyze()
        filled = time.monotonic() - started
        recording.heartbeat(worker.pk)
        full = measure_claims(sizes.claims, worker.pk)
    finally:
        current_worker_id.reset(context)
        recording.stop_worker(worker.pk)
        reset_items()
    ratio = full["fetch_ms"] / empty["fetch_ms"]
    bench.say(f"7 claims: {full['fetch_ms']:.2f} ms vs {empty['fetch_ms']:.2f} ms ({ratio:.2f}x)")
    return [
        Result(
            workload=f"7 claim 100 beside {_rows(sizes.history_rows)} finished",
            db=bench.db,
            figure=full["fetch_ms"],
            unit="ms",
            baseline=empty["fetch_ms"],
            baseline_label="no finished rows",
            ratio=ratio,
            target="<= 2x",
            met=ratio <= 2,
            details={
                "finished_rows": sizes.history_rows,
                "queued_rows": sizes.queued_rows,
                "claims": sizes.claims,
                "what": "QuerySetHandler.fetch_next(100): the whole claim path of a fetch",
                "bare_claim_ms": {"empty": empty["claim_ms"], "full": full["claim_ms"]},
                "fill_seconds": filled,
            },
        )
    ]


# -- 8: the cost of one cycle ----------------------------------------------------------------


def cycle_overhead(bench: Bench) -> list[Result]:
    """Workload 8: ``run_once`` of one handler with three no-op items, median of many cycles.

    The baseline is a thread pool of the same size started, fed three no-op items and shut down:
    what any loop pays for running three items on threads.
    """
    cycles = 5 if bench.quick else 30
    engine: list[float] = []
    bare: list[float] = []
    for _ in range(cycles):
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(_noop, tickets(3)))
        bare.append(time.monotonic() - started)
        registry = HandlerRegistry()
        registry.add_handler(
            functools.partial(StaticHandler, tickets(3)), name="bench.cycle", max_items_per_cycle=3
        )
        started = time.monotonic()
        result = run_once(registry=registry, workers=4)
        engine.append(time.monotonic() - started)
        if result["bench.cycle"].succeeded != 3:
            raise BenchError(f"the cycle processed {result['bench.cycle'].succeeded} items")
    figure, baseline = statistics.median(engine) * 1000, statistics.median(bare) * 1000
    bench.say(f"8 cycle overhead: run_once of 3 no-op items {figure:.1f} ms (pool {baseline:.1f})")
    return [
        Result(
            workload="8 cycle overhead (run_once, 3 no-op items)",
            db=bench.db,
            figure=figure,
            unit="ms",
            baseline=baseline,
            baseline_label="ThreadPoolExecutor(4) start, map, stop",
            ratio=figure / baseline if baseline else 0.0,
            target="< 50 ms",
            met=figure < 50,
            details={"cycles": cycles, "engine_ms": [e * 1000 for e in engine]},
        )
    ]


# -- 9: many backlogged handlers, little room --------------------------------------------------


class _Counted(workitems.WorkItemHandler[Ticket]):
    """An endless backlog; counts each processed item under its handler's name."""

    def __init__(self, name: str, served: dict[str, int], lock: threading.Lock, seconds: float):
        self.name, self.served, self.lock, self.seconds = name, served, lock, seconds

    def fetch_next(self, max_items: int, cancel: CancellationToken) -> list[Ticket]:
        return tickets(max_items)

    def process(self, item: Ticket, cancel: CancellationToken) -> None:
        time.sleep(self.seconds)
        with self.lock:
            self.served[self.name] += 1


def many_handlers(bench: Bench) -> list[Result]:
    """Workload 9: 200 backlogged handlers (half exclusive), ``QUEUE_SIZE`` 100, 4 threads.

    Figures: the time until every handler was served once, against the ideal (200 items on 4
    threads), and the ratio between the most and the least served handler over the window.
    """
    count, threads, seconds = 200, 4, 0.002
    window = 3.0 if bench.quick else 30.0
    served = dict.fromkeys((f"bench.many.{i:03d}" for i in range(count)), 0)
    lock = threading.Lock()
    registry = HandlerRegistry()
    for i, name in enumerate(served):
        registry.add_handler(
            functools.partial(_Counted, name, served, lock, seconds),
            name=name,
            max_items_per_cycle=10,
            exclusive=i % 2 == 0,
        )
    options = {**settings.WORKITEMS, "QUEUE_SIZE": 100, "WORKERS": threads}
    with override_settings(WORKITEMS=options):
        service = BackgroundProcessingService(
            registry=registry, workers=threads, poll_interval=timedelta(hours=1)
        )
        thread = threading.Thread(target=service.run, name="bench-coordinator")
        thread.start()
        try:
            if not service.started.wait(60):
                raise BenchError("the worker did not start")
            started = time.monotonic()
            all_served: float | None = None
            # Until every handler was served (at most 120 s) and the window is over.
            while (elapsed := time.monotonic() - started) < (window if all_served else 120.0):
                with lock:
                    if all_served is None and min(served.values()) >= 1:
                        all_served = elapsed
                time.sleep(0.01)
            with lock:
                counts = dict(served)
        finally:
            service.stop()
            thread.join(60)
    if all_served is None:
        raise BenchError("some handler was never served within 120 s")
    ideal = count * seconds / threads
    spread = max(counts.values()) / max(1, min(counts.values()))
    bench.say(
        f"9 many handlers: all 200 served once after {all_served:.2f}s (ideal {ideal:.2f}s); "
        f"most/least served over {window:.0f}s: {spread:.2f}"
    )
    return [
        Result(
            workload="9 200 handlers: every one served once",
            db=bench.db,
            figure=all_served,
            unit="s",
            baseline=ideal,
            baseline_label="200 items on 4 threads",
            ratio=all_served / ideal,
            target="none: context",
            met=True,
            details={"handlers": count, "queue_size": 100, "item_seconds": seconds},
        ),
        Result(
            workload="9 200 handlers: most / least served",
            db=bench.db,
            figure=spread,
            unit="x",
            baseline=1.0,
            baseline_label="perfectly even",
            ratio=spread,
            target="< 1.5",
            met=spread < 1.5,
            details={
                "window_s": window,
                "most": max(counts.values()),
                "least": min(counts.values()),
                "total": sum(counts.values()),
            },
        ),
    ]


# -- 10: async items at concurrency ---------------------------------------------------------


def async_concurrency(bench: Bench) -> list[Result]:
    """Workload 10: 2,000 in-memory items that ``await asyncio.sleep(0.02)``, at concurrency 100.

    The ideal is ``items * 0.02 / 100`` (0.4 s); the baseline, measured in the same run, is a
    plain asyncio loop with a semaphore of 100. The engine runs them with 4 pool threads.
    """
    count, concurrency, threads = bench.sizes.io_items, 100, 4
    ideal = count * AsyncSleepHandler.seconds / concurrency

    async def plain() -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                await asyncio.sleep(AsyncSleepHandler.seconds)

        await asyncio.gather(*(one() for _ in range(count)))

    bare: list[float] = []
    engine: list[float] = []
    for _ in range(bench.sizes.repeats):
        started = time.monotonic()
        asyncio.run(plain())
        bare.append(time.monotonic() - started)
        registry = HandlerRegistry()
        registry.add_handler(
            functools.partial(AsyncSleepHandler, tickets(count)),
            name="bench.async",
            max_items_per_cycle=count,
        )
        options = {
            **settings.WORKITEMS,
            "QUEUE_SIZE": count,
            "WORKERS": threads,
            "ASYNC_CONCURRENCY": concurrency,
        }
        with override_settings(WORKITEMS=options):
            started = time.monotonic()
            result = run_once(registry=registry, workers=threads)
            elapsed = time.monotonic() - started
        if result["bench.async"].succeeded != count:
            raise BenchError(f"the cycle processed {result['bench.async'].succeeded} items")
        engine.append(elapsed)
    figure = min(engine)
    ratio = figure / ideal
    bench.say(
        f"10 async: {figure:.2f}s vs ideal {ideal:.2f}s ({ratio:.2f}x); "
        f"plain asyncio {min(bare):.2f}s"
    )
    return [
        Result(
            workload="10 async items at concurrency 100",
            db=bench.db,
            figure=figure,
            unit="s",
            baseline=ideal,
            baseline_label="ideal",
            ratio=ratio,
            target="<= 1.5x ideal",
            met=None if bench.quick else ratio <= 1.5,
            details={
                "items": count,
                "concurrency": concurrency,
                "threads": threads,
                "item_seconds": AsyncSleepHandler.seconds,
                "engine_seconds": engine,
                "plain_asyncio_seconds": bare,
                "best_of": bench.sizes.repeats,
            },
        )
    ]


# -- 11: no hoarding: two one-thread workers and slow items ------------------------------------


def idle_with_work(bench: Bench) -> list[Result]:
    """Workload 11: two ``runworkitems --workers 1`` processes share 0.5-second items.

    Measured from the moment both workers are up and the rows are inserted to the moment the
    last item started (work was waiting all that time): the fraction of that worker-time in
    which a worker processed nothing. A worker that claims more than it can start soon leaves
    the other idle beside a queue of work it cannot take.
    """
    count = 8 if bench.quick else 24
    reset_items()
    workers = [
        # Polling every 0.1 s: this workload is about claims, not wake-ups (workload 4).
        start_worker(
            "bench.slow",
            "--workers",
            "1",
            "--poll-interval",
            "00:00:00.1",
            log_name=f"{bench.db}-slow-{i}",
        )
        for i in range(2)
    ]
    try:
        pids = [worker.proc.pid for worker in workers]
        wait_until(
            lambda: Worker.objects.filter(pid__in=pids, stopped_at__isnull=True).count() == 2,
            timeout=60,
            what="the slow workers to start",
        )
        opened = time.monotonic()
        insert_items(count)
        spans: list[tuple[int, float, float]] = []
        deadline = time.monotonic() + 60 + count * SlowHandler.seconds
        while len(spans) < count:
            for worker in workers:
                with contextlib.suppress(queue.Empty):
                    line = worker.lines.get(timeout=0.05)
                    fields = line.split()
                    if fields and fields[0] == "bench-slow":
                        spans.append((int(fields[1]), float(fields[2]), float(fields[3])))
                worker.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"only {len(spans)} of {count} slow items ran")
    finally:
        for worker in workers:
            worker.stop()
    window_end = max(start for _, start, _ in spans)
    window = window_end - opened
    busy = sum(max(0.0, min(end, window_end) - max(start, opened)) for _, start, end in spans)
    idle = 1 - busy / (2 * window) if window > 0 else 0.0
    per_worker = Counter(pid for pid, _, _ in spans)
    bench.say(
        f"11 idle with work: {idle:.1%} of worker-time over {window:.2f}s; "
        f"items per worker {sorted(per_worker.values())}"
    )
    return [
        Result(
            workload="11 two one-thread workers, 0.5 s items: idle with work waiting",
            db=bench.db,
            figure=idle * 100,
            unit="%",
            target="< 10%",
            met=None if bench.quick else idle < 0.10,
            details={
                "items": count,
                "item_seconds": SlowHandler.seconds,
                "window_seconds": window,
                "items_per_worker": sorted(per_worker.values()),
            },
        )
    ]


# -- 12: recovery after a worker died holding claimed rows ---------------------------------------

RECOVER_LEASE = 2.0
"""LEASE_TIMEOUT of workload 12's workers, in seconds."""


def _dead_worker_holding(count: int) -> tuple[Worker, float]:
    """A worker that heartbeated just now and then died (kill -9) holding ``count`` rows and
    a running run of ``bench.recover``; returns it and when its death becomes visible."""
    recording.sync_handlers(workitems.registry)
    with transaction.atomic():  # nobody sees the rows queued before they are claimed
        dead = Worker.objects.create(hostname="bench-victim", pid=999_999)
        insert_items(count)
        BenchItem.objects.claim(count, worker_id=dead.pk)
        HandlerRun.objects.create(
            handler=Handler.objects.get(name="bench.recover"), worker=dead, items_fetched=count
        )
        Worker.objects.filter(pk=dead.pk).update(last_heartbeat_at=db_now())
    visible = time.monotonic() + RECOVER_LEASE
    return dead, visible


def _recover(bench: Bench, count: int, *, busy: bool, env: dict[str, str]) -> float:
    """Seconds from the death being visible until the dead worker's rows are all done."""
    reset_items()
    Worker.objects.filter(hostname="bench-victim").delete()
    label = "busy" if busy else "idle"
    with start_worker(
        "bench.recover", "--workers", "4", log_name=f"{bench.db}-recover-{label}", env=env
    ) as survivor:
        pid = survivor.proc.pid
        wait_until(
            lambda: Worker.objects.filter(pid=pid).exists(),
            timeout=60,
            what="the survivor to start",
            worker=survivor,
        )
        dead, visible = _dead_worker_holding(count)
        if busy:
            insert_items(count * 4)  # its own backlog, claimed before the orphans are seen
            workitems.notify("bench.recover")
        held = list(BenchItem.objects.filter(claimed_by=dead).values_list("pk", flat=True))
        if len(held) != count:
            raise BenchError(f"the dead worker holds {len(held)} of {count} rows")
        done = BenchItem.objects.filter(pk__in=held, status=STATUS.succeeded)
        wait_until(
            lambda: done.count() == count,
            timeout=120,
            what=f"the {count} rows of the dead worker ({label} survivor)",
            worker=survivor,
        )
        return time.monotonic() - visible


def recovery(bench: Bench) -> list[Result]:
    """Workload 12: a worker died holding 100 claimed rows of 50 ms items; a surviving worker
    with 4 threads, idle or busy with rows of its own, finishes them. The time counts from the
    moment the death is visible (``LEASE_TIMEOUT`` after the last heartbeat); the baseline is
    the time the same worker takes to drain 100 such rows normally, measured in this run."""
    count = 20 if bench.quick else 100
    env = {"WORKITEMS_LEASE_TIMEOUT": f"00:00:0{int(RECOVER_LEASE)}"}
    reset_items()
    insert_items(count)
    normal = worker_drain(bench, "bench.recover", count, 4)["seconds"]
    results = []
    for busy in (False, True):
        label = "busy" if busy else "idle"
        took = _recover(bench, count, busy=busy, env=env)
        ratio = took / normal
        bench.say(
            f"12 recovery, {label} survivor: {took:.2f}s vs normal {normal:.2f}s ({ratio:.2f}x)"
        )
        results.append(
            Result(
                workload=f"12 recovery after kill -9, {label} survivor",
                db=bench.db,
                figure=took,
                unit="s",
                baseline=normal,
                baseline_label=f"{count} rows drained normally",
                ratio=ratio,
                target="<= 2x normal",
                met=None if bench.quick else ratio <= 2.0,
                details={"rows": count, "lease_timeout": RECOVER_LEASE, "threads": 4},
            )
        )
    return results


from .scaleout import orm_drain, scale_out  # noqa: E402 - it imports this module's helpers

WORKLOADS: dict[int, Callable[[Bench], list[Result]]] = {
    1: drain_trivial,
    2: drain_io,
    3: framework_overhead,
    4: wakeup_latency,
    5: fairness,
    6: memory,
    7: claim_at_scale,
    8: cycle_overhead,
    9: many_handlers,
    10: async_concurrency,
    11: idle_with_work,
    12: recovery,
    13: orm_drain,
    14: scale_out,
}
