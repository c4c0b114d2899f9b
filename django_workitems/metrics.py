"""Prometheus metrics (optional: ``pip install django-workitems[metrics]``).

Two sources, see ``docs/metrics.md``:

- Per worker process: the engine calls the ``record_*`` / ``set_*`` functions below, and
  ``runworkitems --metrics-port PORT`` serves them (:func:`serve`). They live in
  :data:`registry`, a ``CollectorRegistry`` of this module's own rather than prometheus-client's
  global default, so a project's own metrics (and tests) never collide with these names, and
  the worker's endpoint shows exactly the worker's metrics.
- For the whole deployment: :func:`metrics_view`, a Django view whose gauges (backlog, age of
  the oldest claimable row, live workers, running runs) are read from the database at scrape
  time, a constant number of queries per handler.

Without prometheus-client every function here does nothing and importing never fails; only
:func:`serve` and :func:`metrics_view` say that the extra is missing.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from .claims import QuerySetHandler
from .conf import app_settings
from .handlers import call_handler
from .models import HandlerRun, Worker, db_now
from .registry import HandlerRegistry
from .registry import registry as default_registry

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError:  # the extra is not installed: everything below is a no-op
    prometheus_client = None  # type: ignore[assignment]

logger = logging.getLogger("django_workitems.metrics")

INSTALL_HINT = "pip install django-workitems[metrics]"

DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
"""Item durations range from milliseconds to ``ITEM_TIMEOUT`` (an hour by default)."""


def available() -> bool:
    """True when prometheus-client is installed (the ``metrics`` extra)."""
    return prometheus_client is not None


def _missing() -> ImproperlyConfigured:
    return ImproperlyConfigured(f"Prometheus metrics need prometheus-client: {INSTALL_HINT}")


class _ThreadTally:
    """One thread's item counts: written by that thread alone, summed at scrape time.

    A counter or histogram of prometheus-client takes a lock per update, which costs more than
    a trivial item itself when four threads share the GIL; plain per-thread integers do not.
    """

    __slots__ = ("durations", "outcomes")

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], int] = {}
        # handler -> [count per bucket..., count above the last, sum of seconds]
        self.durations: dict[str, list[float]] = {}


class _ItemCollector:
    """``workitems_items_total`` and ``workitems_item_duration_seconds`` from the tallies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: list[tuple[threading.Thread, _ThreadTally]] = []
        self._retired = _ThreadTally()
        """What threads that have ended counted (folded in, so the list stays short)."""
        self._local = threading.local()

    def tally(self) -> _ThreadTally:
        tally: _ThreadTally | None = getattr(self._local, "tally", None)
        if tally is None:
            tally = self._local.tally = _ThreadTally()
            with self._lock:
                self._retire_ended()
                self._tallies.append((threading.current_thread(), tally))
        return tally

    def _retire_ended(self) -> None:
        """Fold the tallies of ended threads into one (they no longer change); under the lock."""
        live = []
        for thread, tally in self._tallies:
            if thread.is_alive():
                live.append((thread, tally))
                continue
            retired = self._retired
            for key, count in tally.outcomes.items():
                retired.outcomes[key] = retired.outcomes.get(key, 0) + count
            for handler, row in tally.durations.items():
                total = retired.durations.setdefault(handler, [0.0] * len(row))
                for i, value in enumerate(row):
                    total[i] += value
        self._tallies = live

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        with self._lock:
            self._retire_ended()
            tallies = [self._retired, *(tally for _, tally in self._tallies)]
        outcomes: dict[tuple[str, str], int] = {}
        durations: dict[str, list[float]] = {}
        for tally in tallies:
            for key, count in list(tally.outcomes.items()):
                outcomes[key] = outcomes.get(key, 0) + count
            for handler, row in list(tally.durations.items()):
                total = durations.setdefault(handler, [0.0] * len(row))
                for i, value in enumerate(row):
                    total[i] += value
        items = CounterMetricFamily(
            "workitems_items",
            "Items ended in this worker, by handler and outcome (succeeded, failed, released).",
            labels=["handler", "outcome"],
        )
        for (handler, outcome), count in sorted(outcomes.items()):
            items.add_metric([handler, outcome], count)
        yield items
        histogram = HistogramMetricFamily(
            "workitems_item_duration_seconds",
            "Time from the start of an item's processing to its end, in this worker.",
            labels=["handler"],
        )
        for handler, row in sorted(durations.items()):
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, in_bucket in zip((*DURATION_BUCKETS, float("inf")), row[:-1], strict=True):
                cumulative += in_bucket
                buckets.append((_bucket_label(bound), cumulative))
            histogram.add_metric([handler], buckets, row[-1])
        yield histogram


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        assert prometheus_client is not None
        self.item_tallies = _ItemCollector()
        registry.register(self.item_tallies)
        self.runs = prometheus_client.Counter(
            "workitems_runs",
            "Handler runs ended in this worker, by handler and status.",
            ["handler", "status"],
            registry=registry,
        )
        self.worker_up = prometheus_client.Gauge(
            "workitems_worker_up", "1 while this worker's loop runs.", registry=registry
        )
        self.given_up_threads = prometheus_client.Gauge(
            "workitems_given_up_threads",
            "Pool threads given up on hung process() calls in this worker.",
            registry=registry,
        )
        prometheus_client.ProcessCollector(registry=registry)


registry: CollectorRegistry | None = None
"""This process's metrics (None without prometheus-client)."""
_worker: _WorkerMetrics | None = None
if prometheus_client is not None:
    registry = CollectorRegistry(auto_describe=True)
    _worker = _WorkerMetrics(registry)

_servers: list[Any] = []
_servers_lock = threading.Lock()


def record_item(handler: str, outcome: str, seconds: float) -> None:
    """One item ended: ``outcome`` is ``succeeded``, ``failed`` or ``released``."""
    if _worker is None:
        return
    tally = _worker.item_tallies.tally()
    key = (handler, outcome)
    tally.outcomes[key] = tally.outcomes.get(key, 0) + 1
    row = tally.durations.get(handler)
    if row is None:
        row = tally.durations[handler] = [0.0] * (len(DURATION_BUCKETS) + 2)
    seconds = max(0.0, seconds)
    row[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
    row[-1] += seconds


def record_run(handler: str, status: str) -> None:
    """One run ended with ``status`` (a ``RunStatus`` value)."""
    if _worker is None:
        return
    _worker.runs.labels(handler=handler, status=status).inc()


def set_given_up_threads(count: int) -> None:
    """Pool threads given up on hung ``process`` calls in this process."""
    if _worker is None:
        return
    _worker.given_up_threads.set(count)


def set_worker_up(up: bool) -> None:
    """1 while this worker's loop runs."""
    if _worker is None:
        return
    _worker.worker_up.set(1 if up else 0)


def serve(port: int, *, addr: str = "0.0.0.0") -> int:  # noqa: S104 (like Prometheus exporters)
    """Serve this process's metrics over HTTP on ``port`` (``runworkitems --metrics-port``).

    The server runs on a daemon thread. Port 0 takes a free port; the port bound is returned
    and logged at INFO ("Metrics served on port N"). Without prometheus-client this logs an
    ERROR and raises ``ImproperlyConfigured``; a port that cannot be bound raises ``OSError``:
    either way the worker stops at start-up, loudly, rather than run without the metrics it was
    asked to serve.
    """
    if prometheus_client is None or registry is None:
        error = _missing()
        logger.error("Cannot serve metrics on port %d: %s", port, error)
        raise error
    try:
        server, _thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        logger.error("Cannot serve metrics on %s port %d: %s", addr, port, exc)
        raise
    with _servers_lock:
        _servers.append(server)
    bound = int(server.server_port)
    logger.info("Metrics served on port %d", bound, extra={"metrics_port": bound})
    return bound


def stop_serving() -> None:
    """Stop the servers :func:`serve` started in this process (for tests)."""
    with _servers_lock:
        servers = list(_servers)
        _servers.clear()
    for server in servers:
        server.shutdown()
        server.server_close()


# -- the deployment's metrics, read from the database at scrape time --------------------------


class DeploymentCollector(Collector if prometheus_client is not None else object):  # type: ignore[misc]
    """Gauges of the whole deployment, computed from the database on each scrape.

    Queries: one for the live workers, one for the running runs, and per registered handler
    two for a ``QuerySetHandler`` (backlog, oldest claimable row) or whatever its ``backlog()``
    costs for any other handler. A handler whose figures cannot be read is logged and left out.
    """

    def __init__(self, handlers: HandlerRegistry | None = None) -> None:
        self.handlers = handlers

    def collect(self) -> Iterator[Any]:
        handlers = self.handlers if self.handlers is not None else default_registry

        alive = Worker.objects.alive(app_settings.lease_timeout).count()
        running_counts = dict(
            HandlerRun.objects.running()
            .values("handler__name")
            .annotate(n=Count("id"))
            .values_list("handler__name", "n")
        )
        workers = GaugeMetricFamily(
            "workitems_workers_alive",
            "Workers that heartbeated within LEASE_TIMEOUT (database clock).",
        )
        workers.add_metric([], alive)
        running = GaugeMetricFamily(
            "workitems_runs_running", "Handler runs in progress, by handler.", labels=["handler"]
        )
        backlog = GaugeMetricFamily(
            "workitems_backlog",
            "Items waiting: for a QuerySetHandler, queued rows claimable now; otherwise what "
            "the handler's backlog() reports.",
            labels=["handler"],
        )
        oldest = GaugeMetricFamily(
            "workitems_oldest_claimable_age_seconds",
            "Seconds the oldest claimable row of a QuerySetHandler has been claimable "
            "(database clock; 0 when none is).",
            labels=["handler"],
        )
        names = set(running_counts)
        for registration in handlers:
            names.add(registration.name)
            figures = _handler_figures(registration)
            if figures is None:
                continue
            count, age = figures
            if count is not None:
                backlog.add_metric([registration.name], count)
            if age is not None:
                oldest.add_metric([registration.name], age)
        for name in sorted(names):
            running.add_metric([name], running_counts.get(name, 0))
        yield workers
        yield running
        yield backlog
        yield oldest


def _handler_figures(registration: Any) -> tuple[int | None, float | None] | None:
    """(backlog, oldest claimable age in seconds) of one handler; None when they raised."""
    name = registration.name
    try:
        with registration.instance() as handler:
            if not isinstance(handler, QuerySetHandler):
                count = call_handler(handler.backlog)
                return (None if count is None else int(count)), None
            claimable = handler.get_queryset().available()
            count = claimable.count()
            age = 0.0
            if count:
                row = (
                    claimable.order_by("available_at")
                    .annotate(db_time=db_now())
                    .values_list("available_at", "db_time")
                    .first()
                )
                if row is not None:
                    age = _age_seconds(row[0], row[1])
            return count, age
    except Exception as exc:
        logger.warning(
            "Handler %s: its metrics could not be read: %s", name, exc, extra={"handler": name}
        )
        return None


def _age_seconds(since: datetime, now: datetime) -> float:
    """Seconds from ``since`` to ``now`` (both read in one statement of the database), >= 0."""
    return max(timedelta(0), now - since).total_seconds()


@never_cache
@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The deployment's gauges in Prometheus text format; no authentication.

    Route it on an internal path that only the Prometheus server reaches::

        path("internal/workitems/metrics", django_workitems.metrics.metrics_view)

    503 when the database cannot be read; 501 without prometheus-client.
    """
    if prometheus_client is None:
        logger.error("The metrics view needs prometheus-client: %s", INSTALL_HINT)
        return HttpResponse(
            f"prometheus-client is not installed: {INSTALL_HINT}\n",
            status=501,
            content_type="text/plain; charset=utf-8",
        )
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(DeploymentCollector())
    try:
        body = prometheus_client.generate_latest(scrape)
    except DatabaseError:
        logger.exception("Metrics: the database could not be read")
        return HttpResponse(
            "the database could not be read\n",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
    return HttpResponse(body, content_type=prometheus_client.CONTENT_TYPE_LATEST)
