"""A census of what a benchmark process does per item (opt-in): statements, item spans, CPU.

With ``BENCH_CENSUS=path`` in its environment, a process records, and writes as JSON to
``path`` when it exits:

- every statement its Django connections execute (an ``execute_wrapper`` on each connection as
  it is created), by verb and table (``UPDATE benchmarks_benchitem``); transaction control
  (``BEGIN``, ``COMMIT``) is psycopg's, not an ``execute``, and is not counted, nor is the
  worker's ``LISTEN`` connection, which only reads notifications;
- when each item's work (:func:`~benchmarks.handlers.orm_work`) started and ended, on the
  monotonic clock, so the pool's occupancy shows (how many threads were in an item's work);
- the process's CPU time (all threads) when the first item started and when the last ended.

Workload 13 runs one such pass of each side, apart from the timed ones. Without the variable
:func:`started` and :func:`ended` cost a global look-up each.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "BENCH_CENSUS"
_TABLE = re.compile(r'\b(?:FROM|UPDATE|INTO)\s+"?(\w+)"?', re.IGNORECASE)

_active = False
_lock = threading.Lock()
_statements: Counter[str] = Counter()
_items: list[tuple[float, float]] = []
_cpu: list[float] = []  # [at the first item's start, at the latest item's end]


def kind(sql: str) -> str:
    """``VERB table``: the statement's first word and the first table it names."""
    words = sql.lstrip().split(None, 1)
    verb = words[0].upper() if words else "?"
    table = _TABLE.search(sql)
    return f"{verb} {table[1]}" if table else verb


def _count(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
) -> Any:
    with _lock:
        _statements[kind(sql)] += len(params) if many and isinstance(params, list) else 1
    return execute(sql, params, many, context)


def _on_connection(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _count not in connection.execute_wrappers:  # a wrapper reconnecting keeps its list
        connection.execute_wrappers.append(_count)


def started() -> float | None:
    """An item's work begins: its start time, or None when no census is taken."""
    if not _active:
        return None
    now = time.monotonic()
    with _lock:
        if not _cpu:
            _cpu.append(time.process_time())
    return now


def ended(start: float | None) -> None:
    """An item's work that began at ``start`` (from :func:`started`) ended."""
    if start is None:
        return
    now, cpu = time.monotonic(), time.process_time()
    with _lock:
        _items.append((start, now))
        _cpu[1:] = [cpu]


def _write(path: Path) -> None:
    with _lock:
        data = {"statements": dict(_statements), "items": list(_items), "cpu": list(_cpu)}
    path.write_text(json.dumps(data) + "\n")


def install() -> None:
    """Take a census of this process if ``BENCH_CENSUS`` names a file (see above)."""
    global _active
    target = os.environ.get(ENV)
    if not target:
        return
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection, dispatch_uid="bench-census")
    atexit.register(_write, Path(target))
    _active = True


def read(path: Path) -> dict[str, Any]:
    """What a process wrote (empty if it wrote nothing)."""
    if not path.exists():
        return {"statements": {}, "items": [], "cpu": []}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def occupancy(spans: list[tuple[float, float]]) -> dict[str, float]:
    """Of the time from the first item's start to the last one's end: threads in an item's
    work on average, the fraction with none (the pool idle), and the mean item in ms."""
    if not spans:
        return {}
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    begin, end = events[0][0], events[-1][0]
    idle = 0.0
    running, last = 0, begin
    for at, step in events:
        if running == 0:
            idle += at - last
        running += step
        last = at
    busy = sum(e - s for s, e in spans)
    window = max(end - begin, 1e-9)
    return {
        "threads_busy": busy / window,
        "pool_idle": idle / window,
        "item_ms": 1000 * busy / len(spans),
        "window_s": window,
    }
