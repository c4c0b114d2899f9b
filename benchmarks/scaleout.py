"""Workloads 13 and 14: a drain whose items each do one ORM UPDATE, engine against plain loop.

Both sides run in subprocesses of their own, 4 threads each, against one PostgreSQL database:
the engine as real ``runworkitems --handler bench.orm`` processes, the baseline as
``python -m benchmarks.plainloop`` processes (see that module: one-statement ``SKIP LOCKED``
claims of 100 rows, a ``ThreadPoolExecutor``, the same writes per row). Every process is
started and set up first; then all begin together (the workers are woken with ``notify``, the
plain loops with SIGUSR1). Each side is timed on the database's clock, from the first claim
(``min(claimed_at)``) to the last outcome written (``max(modified)``), so process start-up counts
for neither. A row's ``handled`` column counts the times its work was done: a row done more
than once is a claim collision.

Workload 13 also takes one untimed census of each side (:mod:`benchmarks.census`): statements
per item, how busy the pool was, CPU per item: where the engine's time goes.

PostgreSQL only: the plain loop's claim is PostgreSQL's, and on SQLite one write lock serialises
every process anyway; on SQLite these workloads report nothing. :mod:`benchmarks.workloads`
imports this module at its end (for ``WORKLOADS``): import that one first.
"""

from __future__ import annotations

import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db import connection
from django.db.models import Max, Min

import django_workitems as workitems
from django_workitems.models import Worker

from . import census as census_
from .models import BenchItem
from .results import Result
from .workloads import (
    CLAIM_BATCH,
    STATUS,
    Bench,
    BenchError,
    Subprocess,
    analyze,
    insert_items,
    reset_items,
    start_worker,
    wait_until,
)

HANDLER = "bench.orm"
THREADS = 4
ENGINE, PLAIN = "engine", "plain"


@dataclass
class Drain:
    """One drain by a fleet of processes of one side."""

    side: str
    processes: int
    items: int
    seconds: float
    twice: int
    """Rows whose work was done more than once."""
    reclaimed: int
    """Rows claimed more than once (``attempts > 1``)."""
    census: dict[str, Any] = field(default_factory=dict)
    """What the census pass of workload 13 recorded (:mod:`benchmarks.census`), else empty."""

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds


def _measure(side: str, processes: int, count: int) -> Drain:
    """Check the drained table and time it on the database's clock."""
    succeeded = BenchItem.objects.filter(status=STATUS.succeeded).count()
    if succeeded != count:
        raise BenchError(f"{side}, {processes} processes: {succeeded} of {count} rows succeeded")
    undone = BenchItem.objects.filter(handled=0).count()
    if undone:
        raise BenchError(f"{side}: {undone} rows succeeded without their work done")
    span = BenchItem.objects.aggregate(start=Min("claimed_at"), end=Max("modified"))
    return Drain(
        side=side,
        processes=processes,
        items=count,
        seconds=(span["end"] - span["start"]).total_seconds(),
        twice=BenchItem.objects.filter(handled__gt=1).count(),
        reclaimed=BenchItem.objects.filter(attempts__gt=1).count(),
    )


def _listening() -> int:
    """Connections to this database waiting in ``LISTEN`` (one per live worker)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE %s",
            ["LISTEN %"],
        )
        return int(cursor.fetchone()[0])


def _wait_drained(fleet: list[Subprocess], count: int) -> None:
    """Until no row is queued or in process; a few looks a second (the time is the rows')."""
    deadline = time.monotonic() + max(120, count / 50)
    unfinished = BenchItem.objects.filter(status__in=[STATUS.queued, STATUS.processing])
    while unfinished.exists():
        for process in fleet:
            process.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{len(fleet)} workers did not drain {count} rows in time")
        time.sleep(0.25)


def _census_env(census: Path | None, i: int) -> dict[str, str]:
    return {census_.ENV: str(census / f"{i}.json")} if census else {}


def _census(census: Path | None, processes: int) -> dict[str, Any]:
    """The census of one process (workload 13 takes it of one process at a time)."""
    if not census:
        return {}
    if processes != 1:
        raise BenchError("a census is taken of one process at a time")
    return census_.read(census / "0.json")


def engine_drain(bench: Bench, processes: int, count: int, census: Path | None = None) -> Drain:
    """``processes`` idle ``runworkitems`` workers; ``count`` rows queued, then ``notify``."""
    reset_items()
    fleet = [
        start_worker(
            HANDLER,
            "--workers",
            str(THREADS),
            log_name=f"{bench.db}-orm-engine-{processes}-{i}",
            env=_census_env(census, i),
        )
        for i in range(processes)
    ]
    try:
        pids = [worker.proc.pid for worker in fleet]

        def ready() -> bool:
            for worker in fleet:
                worker.check_alive()
            alive = Worker.objects.filter(pid__in=pids, stopped_at__isnull=True).count()
            return alive == processes and _listening() >= processes

        wait_until(ready, timeout=60 + 15 * processes, what=f"{processes} workers to listen")
        insert_items(count)
        analyze()
        workitems.notify(HANDLER)  # every worker wakes within milliseconds (LISTEN)
        _wait_drained(fleet, count)
    finally:
        for worker in fleet:
            worker.stop()
    drain = _measure(ENGINE, processes, count)
    drain.census = _census(census, processes)
    return drain


def plain_drain(bench: Bench, processes: int, count: int, census: Path | None = None) -> Drain:
    """``processes`` plain loops, set up and waiting; ``count`` rows queued; then SIGUSR1."""
    reset_items()
    insert_items(count)
    analyze()
    fleet = [
        Subprocess(
            ["-m", "benchmarks.plainloop", "--threads", str(THREADS), "--wait"],
            log_name=f"{bench.db}-orm-plain-{processes}-{i}",
            env=_census_env(census, i),
        )
        for i in range(processes)
    ]
    try:
        for process in fleet:
            process.expect("bench-ready", timeout=60 + 15 * processes)
        for process in fleet:
            process.proc.send_signal(signal.SIGUSR1)
        done = 0
        for process in fleet:
            done += int(process.expect("bench-plain", timeout=max(120, count / 50))[0])
            if process.proc.wait(30) != 0:  # exited, with its census written
                raise BenchError(f"a plain loop exited {process.proc.returncode}")
        if done != count:
            raise BenchError(f"the plain loops did {done} of {count} rows")
    finally:
        for process in fleet:
            process.stop()
    drain = _measure(PLAIN, processes, count)
    drain.census = _census(census, processes)
    return drain


def _best(drains: list[Drain]) -> Drain:
    return max(drains, key=lambda d: d.items_per_s)


def _per_item(counts: dict[str, int], items: int) -> dict[str, float]:
    """Statements per item by kind, most first (kinds under 0.001 per item left out)."""
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return {kind: round(n / items, 4) for kind, n in ranked if n / items >= 0.001}


def _skipped(bench: Bench, number: int) -> bool:
    if bench.postgres:
        return False
    bench.say(f"{number}: PostgreSQL only (SKIP LOCKED claims across processes); skipped")
    return True


# -- 13: one process, each item one ORM UPDATE ---------------------------------------------


def _profile(census: dict[str, Any], items: int) -> dict[str, Any]:
    """Per item, from a census pass: statements (by kind and in all), the pool's occupancy
    and the process's CPU time while items ran."""
    spans = [(start, end) for start, end in census["items"]]
    if len(spans) != items:
        raise BenchError(f"the census saw {len(spans)} of {items} items")
    counts: dict[str, int] = census["statements"]
    cpu = census["cpu"]
    pool = census_.occupancy(spans)
    return {
        "statements": sum(counts.values()) / items,
        "statements_by_kind": _per_item(counts, items),
        "cpu_us": 1e6 * (cpu[-1] - cpu[0]) / items,
        "cpu_cores": (cpu[-1] - cpu[0]) / pool["window_s"],
        **pool,
    }


def orm_drain(bench: Bench) -> list[Result]:
    """Workload 13: 20,000 rows, each item one ORM UPDATE; one ``runworkitems`` (4 threads)
    against one plain loop (``ThreadPoolExecutor(4)``), best of a few interleaved runs; then
    one untimed census pass of each side (:mod:`benchmarks.census`): statements per item, how
    busy the pool was, the process's CPU per item."""
    if _skipped(bench, 13):
        return []
    count = bench.sizes.orm_items
    plain: list[Drain] = []
    engine: list[Drain] = []
    for _ in range(bench.sizes.repeats):  # interleaved, so drift in the machine hits both
        plain.append(plain_drain(bench, 1, count))
        engine.append(engine_drain(bench, 1, count))
    items = bench.sizes.census_items
    profile = {}
    with tempfile.TemporaryDirectory(prefix="bench-census-") as tmp:
        for side, run in ((PLAIN, plain_drain), (ENGINE, engine_drain)):
            (Path(tmp) / side).mkdir()
            profile[side] = _profile(run(bench, 1, items, Path(tmp) / side).census, items)
    figure, baseline = _best(engine).items_per_s, _best(plain).items_per_s
    ratio = figure / baseline
    e, p = profile[ENGINE], profile[PLAIN]
    bench.say(f"13 ORM drain: {figure:,.0f} items/s vs plain {baseline:,.0f} ({ratio:.2f})")
    bench.say(
        f"13 census of {items:,} items, engine vs plain: statements/item {e['statements']:.3f} vs "
        f"{p['statements']:.3f}; CPU/item {e['cpu_us']:.0f} vs {p['cpu_us']:.0f} us "
        f"({e['cpu_cores']:.2f} vs {p['cpu_cores']:.2f} cores); pool idle {e['pool_idle']:.1%} "
        f"vs {p['pool_idle']:.1%}; threads in an item {e['threads_busy']:.2f} vs "
        f"{p['threads_busy']:.2f}; item {e['item_ms']:.2f} vs {p['item_ms']:.2f} ms"
    )
    bench.say(f"13 statements per item, engine: {e['statements_by_kind']}")
    bench.say(f"13 statements per item, plain: {p['statements_by_kind']}")
    census_details = {"items": items, ENGINE: e, PLAIN: p}
    return [
        Result(
            workload="13 drain, each item one ORM UPDATE",
            db=bench.db,
            figure=figure,
            unit="items/s",
            baseline=baseline,
            baseline_label="plain SKIP LOCKED loop",
            ratio=ratio,
            target=">= 0.95 of plain loop",
            met=None if bench.quick else ratio >= 0.95,
            details={
                "items": count,
                "threads": THREADS,
                "claim_batch": CLAIM_BATCH,
                "engine_items_per_s": [d.items_per_s for d in engine],
                "plain_items_per_s": [d.items_per_s for d in plain],
                "rows_done_twice": {
                    ENGINE: [d.twice for d in engine],
                    PLAIN: [d.twice for d in plain],
                },
                "best_of": bench.sizes.repeats,
            },
        ),
        Result(
            workload="13 statements per item (context)",
            db=bench.db,
            figure=e["statements"],
            unit="stmt/item",
            baseline=p["statements"],
            baseline_label="plain loop",
            ratio=e["statements"] / p["statements"],
            target="none: context",
            details={
                **census_details,
                "what": "statements executed through Django, start-up and shutdown included",
            },
        ),
        Result(
            workload="13 process CPU per item (context)",
            db=bench.db,
            figure=e["cpu_us"],
            unit="us",
            baseline=p["cpu_us"],
            baseline_label="plain loop",
            ratio=e["cpu_us"] / p["cpu_us"],
            target="none: context",
            details={"what": "CPU time of the process, all threads, first item to last"},
        ),
        Result(
            workload="13 pool idle with work waiting (context)",
            db=bench.db,
            figure=100 * e["pool_idle"],
            unit="%",
            baseline=100 * p["pool_idle"],
            baseline_label="plain loop",
            target="none: context",
            details={
                "what": "time from the first item to the last with no thread in an item's work",
                "threads_busy": {ENGINE: e["threads_busy"], PLAIN: p["threads_busy"]},
            },
        ),
    ]


# -- 14: scale-out: 1, 2 and 4 processes ----------------------------------------------------


def scale_out(bench: Bench) -> list[Result]:
    """Workload 14: the ORM drain of workload 13 by 1, 2 and 4 processes of 4 threads each on
    one database, each step against as many plain loops; best of a few interleaved runs."""
    if _skipped(bench, 14):
        return []
    count, steps = bench.sizes.orm_items, bench.sizes.scaleout_processes
    runs: dict[tuple[str, int], list[Drain]] = {}
    for processes in steps:
        for _ in range(bench.sizes.repeats):
            for side, run in ((PLAIN, plain_drain), (ENGINE, engine_drain)):
                runs.setdefault((side, processes), []).append(run(bench, processes, count))
    best = {key: _best(drains) for key, drains in runs.items()}
    one = {side: best[side, steps[0]].items_per_s for side in (ENGINE, PLAIN)}
    results = []
    for processes in steps:
        engine, plain = best[ENGINE, processes], best[PLAIN, processes]
        ratio = engine.items_per_s / plain.items_per_s
        scaling = {side: best[side, processes].items_per_s / one[side] for side in one}
        bench.say(
            f"14 scale-out, {processes} x {THREADS} threads: {engine.items_per_s:,.0f} items/s "
            f"vs plain {plain.items_per_s:,.0f} ({ratio:.2f}); vs {steps[0]} process: "
            f"engine {scaling[ENGINE]:.2f}x, plain {scaling[PLAIN]:.2f}x"
        )
        results.append(
            Result(
                workload=f"14 scale-out, {processes} x {THREADS} threads",
                db=bench.db,
                figure=engine.items_per_s,
                unit="items/s",
                baseline=plain.items_per_s,
                baseline_label=f"{processes} plain loop{'s' if processes > 1 else ''}",
                ratio=ratio,
                target=">= 0.90 of plain loops",
                met=None if bench.quick else ratio >= 0.9,
                details={
                    "items": count,
                    "processes": processes,
                    "threads": THREADS,
                    "engine_items_per_s": [d.items_per_s for d in runs[ENGINE, processes]],
                    "plain_items_per_s": [d.items_per_s for d in runs[PLAIN, processes]],
                    "scaling_vs_one_process": scaling,
                    "best_of": bench.sizes.repeats,
                },
            )
        )
        if processes != steps[0]:
            results.append(
                Result(
                    workload=f"14 scale-out, {processes} vs {steps[0]} process (context)",
                    db=bench.db,
                    figure=scaling[ENGINE],
                    unit="x",
                    baseline=scaling[PLAIN],
                    baseline_label="plain loops",
                    ratio=scaling[ENGINE] / scaling[PLAIN],
                    target="none: context",
                )
            )
    drains = [d for ds in runs.values() for d in ds]
    twice = {side: sum(d.twice for d in drains if d.side == side) for side in one}
    reclaimed = {side: sum(d.reclaimed for d in drains if d.side == side) for side in one}
    done = {side: sum(d.items for d in drains if d.side == side) for side in one}
    bench.say(
        f"14 rows done more than once: engine {twice[ENGINE]} of {done[ENGINE]:,}, "
        f"plain {twice[PLAIN]} of {done[PLAIN]:,}; claimed more than once: "
        f"engine {reclaimed[ENGINE]}, plain {reclaimed[PLAIN]}"
    )
    results.append(
        Result(
            workload="14 scale-out: rows done more than once",
            db=bench.db,
            figure=100 * twice[ENGINE] / done[ENGINE],
            unit="%",
            baseline=100 * twice[PLAIN] / done[PLAIN],
            baseline_label="plain loops",
            target="0 (every run, every step)",
            met=twice[ENGINE] == 0,
            details={
                "rows_done": done,
                "rows_done_twice": twice,
                "rows_claimed_twice": reclaimed,
                "per_run": [
                    {"side": d.side, "processes": d.processes, "twice": d.twice} for d in drains
                ],
            },
        )
    )
    return results
