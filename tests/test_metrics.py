"""Prometheus metrics: the worker's own (in process and over HTTP from a real worker), the
deployment's view, and the module without prometheus-client."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from datetime import timedelta

import pytest
from django.db import DatabaseError
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from django_workitems import metrics
from django_workitems.models import HandlerRun, RunStatus
from tests.conftest import ROOT, wait_for
from tests.factories import HandlerFactory, HandlerRunFactory, WorkerFactory
from tests.testapp.models import Task

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(name: str, **labels: str) -> float | None:
    assert metrics.registry is not None
    return metrics.registry.get_sample_value(name, labels)


# The worker's own metrics, in process ---------------------------------------------------------


def test_counts_of_threads_that_ended_are_kept_and_their_tallies_folded():
    import threading

    handler = f"h-{uuid.uuid4().hex[:8]}"
    threads = [
        threading.Thread(target=metrics.record_item, args=(handler, "succeeded", 0.01))
        for _ in range(50)
    ]
    for thread in threads:
        thread.start()
        thread.join()
    metrics.record_item(handler, "succeeded", 0.01)  # this thread: folds the ended ones
    assert sample("workitems_items_total", handler=handler, outcome="succeeded") == 51
    assert sample("workitems_item_duration_seconds_count", handler=handler) == 51
    collector = metrics._worker.item_tallies if metrics._worker else None
    assert collector is not None
    assert not any(thread in threads for thread, _ in collector._tallies)


def test_record_item_counts_outcomes_and_observes_durations_per_handler():
    handler = f"h-{uuid.uuid4().hex[:8]}"
    metrics.record_item(handler, "succeeded", 0.02)
    metrics.record_item(handler, "succeeded", 2.0)
    metrics.record_item(handler, "failed", 0.3)
    metrics.record_item(handler, "released", 0.0)

    assert sample("workitems_items_total", handler=handler, outcome="succeeded") == 2
    assert sample("workitems_items_total", handler=handler, outcome="failed") == 1
    assert sample("workitems_items_total", handler=handler, outcome="released") == 1
    assert sample("workitems_item_duration_seconds_count", handler=handler) == 4
    assert sample("workitems_item_duration_seconds_sum", handler=handler) == pytest.approx(2.32)
    assert sample("workitems_item_duration_seconds_bucket", handler=handler, le="0.025") == 2
    assert sample("workitems_item_duration_seconds_bucket", handler=handler, le="1.0") == 3
    assert sample("workitems_item_duration_seconds_bucket", handler=handler, le="+Inf") == 4
    other = f"h-{uuid.uuid4().hex[:8]}"
    assert sample("workitems_items_total", handler=other, outcome="succeeded") is None


def test_record_run_counts_runs_by_status():
    handler = f"h-{uuid.uuid4().hex[:8]}"
    metrics.record_run(handler, RunStatus.SUCCEEDED.value)
    metrics.record_run(handler, RunStatus.SUCCEEDED.value)
    metrics.record_run(handler, RunStatus.PARTIAL.value)

    assert sample("workitems_runs_total", handler=handler, status="succeeded") == 2
    assert sample("workitems_runs_total", handler=handler, status="partial") == 1
    assert sample("workitems_runs_total", handler=handler, status="failed") is None


def test_gauges_of_the_worker():
    metrics.set_worker_up(True)
    metrics.set_given_up_threads(3)
    assert sample("workitems_worker_up") == 1
    assert sample("workitems_given_up_threads") == 3
    metrics.set_worker_up(False)
    metrics.set_given_up_threads(0)
    assert sample("workitems_worker_up") == 0
    assert sample("workitems_given_up_threads") == 0


def test_serve_on_port_0_logs_the_port_and_serves_the_registry(caplog):
    handler = f"h-{uuid.uuid4().hex[:8]}"
    metrics.record_item(handler, "succeeded", 0.1)
    caplog.set_level("INFO", logger="django_workitems.metrics")
    port = metrics.serve(0, addr="127.0.0.1")
    try:
        assert port > 0
        assert f"Metrics served on port {port}" in caplog.text
        samples = parse(scrape(port))
    finally:
        metrics.stop_serving()
    assert value(samples, "workitems_items_total", handler=handler, outcome="succeeded") == 1
    assert value(samples, "workitems_worker_up") is not None
    # Only this module's registry: not prometheus-client's global default.
    assert not any(name.startswith("python_gc") for name, _ in samples)


def test_serve_on_a_port_in_use_raises_and_logs(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            metrics.serve(taken.getsockname()[1], addr="127.0.0.1")
    assert "Cannot serve metrics" in caplog.text


# Without prometheus-client --------------------------------------------------------------------


@pytest.fixture
def without_prometheus(tmp_path, worker_env):
    """An environment in which ``import prometheus_client`` fails, as when it is not installed."""
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('prometheus_client is not installed')\n")
    return worker_env(PYTHONPATH=f"{shadow.parent}:{ROOT}")


def test_without_prometheus_client_everything_is_a_no_op_and_serve_says_what_to_install(
    without_prometheus,
):
    script = textwrap.dedent(
        """
        import django
        django.setup()
        import django_workitems
        from django_workitems import metrics
        from django.core.exceptions import ImproperlyConfigured
        from django.test import RequestFactory
        assert not metrics.available() and metrics.registry is None
        metrics.record_item("h", "succeeded", 0.1)
        metrics.record_run("h", "succeeded")
        metrics.set_given_up_threads(2)
        metrics.set_worker_up(True)
        response = metrics.metrics_view(RequestFactory().get("/metrics/"))
        print("view", response.status_code, response.content.decode().strip())
        try:
            metrics.serve(0)
        except ImproperlyConfigured as exc:
            print("serve:", exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=without_prometheus,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "view 501 prometheus-client is not installed" in done.stdout
    assert "serve: Prometheus metrics need prometheus-client: " in done.stdout
    assert "pip install django-workitems[metrics]" in done.stdout


@pytest.mark.django_db(transaction=True)
def test_a_worker_asked_for_metrics_without_prometheus_client_stops_and_says_why(
    without_prometheus, tmp_path
):
    from tests.conftest import WorkerProcess

    worker = WorkerProcess(
        ["--handler", "tasks", "--metrics-port", str(free_port())],
        without_prometheus,
        tmp_path / "worker.log",
    )
    try:
        assert worker.wait(60) == 2, worker.output()  # bad usage, before any handler runs
    finally:
        worker.kill()
    assert "pip install django-workitems[metrics]" in worker.output()
    assert "Worker" not in worker.output()  # it never started


# A real worker, scraped over HTTP -------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_worker_serves_its_metrics_while_it_runs(start_worker):
    Task.objects.bulk_create([Task() for _ in range(5)] + [Task(action="fail")])
    port = free_port()
    worker = start_worker(
        "--handler", "tasks", "--metrics-port", str(port), "--poll-interval", "00:00:01"
    )
    wait_for(
        lambda: f"Metrics served on port {port}" in worker.output(),
        message=f"the metrics server\n{worker.output()}",
    )

    def settled() -> Samples | None:
        samples = parse(scrape(port))
        finished = HandlerRun.objects.finished().filter(handler__name="tasks").count()
        runs = sum(
            v
            for (name, labels), v in samples.items()
            if name == "workitems_runs_total" and ("handler", "tasks") in labels
        )
        done = (
            value(samples, "workitems_items_total", handler="tasks", outcome="succeeded") == 5
            and value(samples, "workitems_items_total", handler="tasks", outcome="failed") == 3
            and finished > 0
            and runs == finished
            and not HandlerRun.objects.running().exists()
        )
        return samples if done else None

    samples = wait_for(settled, timeout=60, message="every item and run to be counted")

    # Five rows succeeded at once; the failing one was tried max_attempts (3) times.
    assert Task.objects.filter(status="succeeded").count() == 5
    assert Task.objects.get(action="fail").status == "failed"
    assert value(samples, "workitems_items_total", handler="tasks", outcome="released") is None
    assert value(samples, "workitems_item_duration_seconds_count", handler="tasks") == 8
    assert value(samples, "workitems_worker_up") == 1
    assert value(samples, "workitems_given_up_threads") == 0
    for run in HandlerRun.objects.filter(handler__name="tasks"):
        assert value(samples, "workitems_runs_total", handler="tasks", status=run.status) >= 1

    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()


# The deployment's metrics: the Django view ----------------------------------------------------


def view_samples(client) -> Samples:
    response = client.get("/metrics/")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return parse(response.content.decode())


@pytest.mark.django_db
def test_view_reports_backlog_oldest_claimable_age_workers_and_running_runs(client):
    now = timezone.now()
    Task.objects.bulk_create(
        [
            Task(available_at=now - timedelta(seconds=90)),  # the oldest claimable row
            Task(available_at=now - timedelta(seconds=1)),
            Task(available_at=now - timedelta(hours=2), status="processing"),
            Task(available_at=now - timedelta(hours=3), status="succeeded"),
            Task(available_at=now - timedelta(hours=4), status="failed"),
            # Waiting out a retry back-off: neither in the backlog nor in the age.
            Task(available_at=now + timedelta(hours=1)),
        ]
    )
    WorkerFactory()
    WorkerFactory()
    WorkerFactory(last_heartbeat_at=now - timedelta(days=1))  # dead
    tasks = HandlerFactory(name="tasks")
    HandlerRunFactory(handler=tasks, status=RunStatus.RUNNING)
    HandlerRunFactory(handler=tasks, status=RunStatus.SUCCEEDED)
    HandlerRunFactory(handler=HandlerFactory(name="jobs"), status=RunStatus.SUCCEEDED)

    samples = view_samples(client)

    assert value(samples, "workitems_workers_alive") == 2
    assert value(samples, "workitems_backlog", handler="tasks") == 2
    age = value(samples, "workitems_oldest_claimable_age_seconds", handler="tasks")
    assert age is not None and 90 <= age < 3600
    assert value(samples, "workitems_runs_running", handler="tasks") == 1
    assert value(samples, "workitems_runs_running", handler="jobs") == 0
    # Handlers that are not QuerySetHandlers and report no backlog() have neither gauge.
    assert value(samples, "workitems_backlog", handler="jobs") is None
    assert value(samples, "workitems_oldest_claimable_age_seconds", handler="jobs") is None
    # The view serves the deployment's gauges, not the worker's per-process metrics.
    assert value(samples, "workitems_worker_up") is None


@pytest.mark.django_db
def test_view_with_only_rows_in_back_off_reports_an_empty_backlog(client):
    Task.objects.create(available_at=timezone.now() + timedelta(minutes=10))

    samples = view_samples(client)

    assert value(samples, "workitems_backlog", handler="tasks") == 0
    assert value(samples, "workitems_oldest_claimable_age_seconds", handler="tasks") == 0
    assert value(samples, "workitems_workers_alive") == 0


@pytest.mark.django_db
def test_view_costs_a_constant_number_of_queries_per_handler(client):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def queries() -> list[str]:
        with CaptureQueriesContext(connection) as context:
            view_samples(client)
        return [q["sql"] for q in context.captured_queries]

    Task.objects.bulk_create([Task() for _ in range(3)])
    HandlerRunFactory(handler=HandlerFactory(name="tasks"), status=RunStatus.RUNNING)
    few = queries()
    Task.objects.bulk_create([Task() for _ in range(50)])
    HandlerRunFactory(handler=HandlerFactory(name="jobs"), status=RunStatus.RUNNING)
    WorkerFactory.create_batch(5)
    many = queries()

    assert len(many) == len(few)
    # The QuerySetHandler: one count and one row of its claimable rows.
    assert sum('"testapp_task"' in sql for sql in many) == 2


@pytest.mark.django_db
def test_view_leaves_out_a_handler_whose_figures_raise(client, monkeypatch, caplog):
    from tests.testapp.handlers import TaskHandler

    def broken(self):
        raise RuntimeError("the source is down")

    monkeypatch.setattr(TaskHandler, "get_queryset", broken)
    samples = view_samples(client)
    assert value(samples, "workitems_backlog", handler="tasks") is None
    assert value(samples, "workitems_workers_alive") == 0
    assert "Handler tasks: its metrics could not be read" in caplog.text


@pytest.mark.django_db
def test_view_is_503_when_the_database_cannot_be_read(client, monkeypatch):
    from django_workitems.models import WorkerQuerySet

    def down(self, lease_timeout):
        raise DatabaseError("connection refused")

    monkeypatch.setattr(WorkerQuerySet, "alive", down)
    response = client.get("/metrics/")
    assert response.status_code == 503
    assert b"connection refused" not in response.content


@pytest.mark.django_db
def test_view_refuses_writes(client):
    assert client.post("/metrics/").status_code == 405
