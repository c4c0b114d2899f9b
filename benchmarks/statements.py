"""A census of the SQL statements a benchmark process runs, by kind (opt-in).

With ``BENCH_STATEMENTS=path`` in its environment, a process counts every statement its Django
connections execute (``execute_wrapper`` on each connection as it is created), by verb and
table (``UPDATE benchmarks_benchitem``, ``SELECT django_workitems_handler``), and writes the
counts as JSON to ``path`` when it exits. Workload 13 runs one such pass of each side, apart
from the timed ones, to show where the statements per item go. Transaction control (``BEGIN``,
``COMMIT``) is psycopg's, not an ``execute``, and is not counted; nor is the worker's
``LISTEN`` connection, which reads notifications only.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "BENCH_STATEMENTS"
_TABLE = re.compile(r'\b(?:FROM|UPDATE|INTO)\s+"?(\w+)"?', re.IGNORECASE)

_counts: Counter[str] = Counter()
_lock = threading.Lock()


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
        _counts[kind(sql)] += len(params) if many and isinstance(params, list) else 1
    return execute(sql, params, many, context)


def _on_connection(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _count not in connection.execute_wrappers:  # a wrapper reconnecting keeps its list
        connection.execute_wrappers.append(_count)


def _write(path: Path) -> None:
    with _lock:
        counts = dict(_counts)
    path.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")


def install() -> None:
    """Count this process's statements if ``BENCH_STATEMENTS`` names a file (see above)."""
    target = os.environ.get(ENV)
    if not target:
        return
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection, dispatch_uid="bench-statements")
    atexit.register(_write, Path(target))


def read(path: Path) -> dict[str, int]:
    """The counts a process wrote (empty if it wrote none)."""
    if not path.exists():
        return {}
    counts: dict[str, int] = json.loads(path.read_text())
    return counts
