"""Health: the command's exit status and JSON, the HTTP probe view, backlogs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection
from django.db.backends.base.base import BaseDatabaseWrapper
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import django_workitems as workitems
from django_workitems import health
from django_workitems.health import check_health, handler_backlog
from django_workitems.models import Handler, RunStatus
from django_workitems.recording import sync_handlers
from django_workitems.registry import registry as default_registry
from tests.conftest import ROOT, wait_for
from tests.factories import HandlerRunFactory, WorkerFactory
from tests.testapp.models import Task

pytestmark = pytest.mark.django_db


def health_command(*args: str) -> tuple[str, CommandError | None]:
    out = StringIO()
    try:
        call_command("workitems_health", *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


# The command -----------------------------------------------------------------------------


def test_healthy_when_a_worker_heartbeated_within_the_lease_timeout():
    WorkerFactory(last_heartbeat_at=timezone.now() - timedelta(seconds=3))  # LEASE_TIMEOUT 10s
    out, failure = health_command()
    assert failure is None
    assert out.strip() == "healthy: 1 worker heartbeated within 0:00:10"


def test_unhealthy_when_no_worker_ever_started():
    _, failure = health_command()
    assert failure is not None
    assert str(failure) == "unhealthy: no worker has ever started (run manage.py runworkitems)"


def test_unhealthy_when_the_only_worker_stopped_heartbeating():
    worker = WorkerFactory(last_heartbeat_at=timezone.now() - timedelta(seconds=60))
    _, failure = health_command()
    assert failure is not None
    message = str(failure)
    assert message.startswith("unhealthy: no worker has heartbeated within 0:00:10")
    assert f"from {worker}, was 60s ago" in message


def test_unhealthy_when_every_worker_stopped():
    WorkerFactory(last_heartbeat_at=timezone.now(), stopped_at=timezone.now())
    _, failure = health_command()
    assert failure is not None and "no worker is running" in str(failure)


@override_settings(WORKITEMS={"LEASE_TIMEOUT": "00:05:00"})
def test_the_lease_timeout_setting_decides_what_is_alive():
    WorkerFactory(last_heartbeat_at=timezone.now() - timedelta(seconds=60))
    out, failure = health_command()
    assert failure is None and "within 0:05:00" in out


@override_settings(WORKITEMS={"LEASE_TIMEOUT": "soon"})
def test_a_bad_setting_is_an_unhealthy_exit_with_the_reason():
    _, failure = health_command()
    assert failure is not None and "LEASE_TIMEOUT" in str(failure)


def test_json_lists_workers_handlers_last_success_and_backlog():
    handlers = sync_handlers(default_registry)
    now = timezone.now()
    worker = WorkerFactory(hostname="box-1", pid=77, last_heartbeat_at=now)
    WorkerFactory(stopped_at=now)  # stopped workers are not listed
    HandlerRunFactory(
        handler=handlers["jobs"],
        status=RunStatus.SUCCEEDED,
        started_at=now - timedelta(minutes=5),
        finished_at=now - timedelta(minutes=4),
    )
    HandlerRunFactory(handler=handlers["jobs"], status=RunStatus.PARTIAL, started_at=now)
    Task.objects.bulk_create([Task(), Task(), Task()])

    out, failure = health_command("--json")

    assert failure is None
    report = json.loads(out)
    assert report["status"] == "ok" and report["workers_alive"] == 1
    assert report["lease_timeout_seconds"] == 10
    assert [(w["hostname"], w["pid"], w["alive"]) for w in report["workers"]] == [
        (worker.hostname, 77, True)
    ]
    by_name = {h["name"]: h for h in report["handlers"]}
    assert set(by_name) == set(handlers)
    jobs = by_name["jobs"]
    assert jobs["last_run_status"] == "partial"
    assert 230 <= jobs["last_success_age_seconds"] <= 300
    assert jobs["backlog"] is None  # JobHandler does not report one
    tasks = by_name["tasks"]
    assert tasks["backlog"] == 3 and tasks["oldest_waiting_age_seconds"] >= 0
    assert tasks["last_success_at"] is None and tasks["backlog_error"] is None
    assert by_name["django_workitems.prune-runs"]["backlog"] == 0


def test_json_is_printed_when_unhealthy_too():
    out, failure = health_command("--json")
    assert failure is not None
    assert json.loads(out)["status"] == "unhealthy"


def test_json_names_only_the_type_of_a_backlog_error(monkeypatch):
    from tests.testapp.handlers import TaskHandler

    def broken(self):
        raise ConnectionError("postgres://user:secret@db/queue is down")

    monkeypatch.setattr(TaskHandler, "backlog", broken)
    sync_handlers(default_registry)
    out, _ = health_command("--json")
    assert "secret" not in out
    tasks = next(h for h in json.loads(out)["handlers"] if h["name"] == "tasks")
    assert tasks["backlog_error"] == "ConnectionError" and tasks["backlog"] is None


@pytest.mark.django_db(transaction=True)
def test_the_command_exit_status_for_an_orchestrator(worker_env):
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "django", "workitems_health"],
            cwd=ROOT,
            env=worker_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    down = run()
    assert down.returncode == 1
    assert "unhealthy: no worker has ever started" in down.stderr
    WorkerFactory()
    up = run()
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith("healthy: 1 worker")


# Liveness: the file a worker touches, checked without the database ------------------------


def test_touch_creates_the_file_then_advances_its_mtime(tmp_path):
    path = tmp_path / "alive"
    health.touch_liveness_file(str(path))
    assert path.exists()
    os.utime(path, (1_000_000, 1_000_000))  # as if touched long ago
    health.touch_liveness_file(str(path))
    assert path.stat().st_mtime > 1_000_000
    assert health.liveness_file_age(str(path)) < 60


def test_touch_never_raises_and_warns_once_about_an_unwritable_path(tmp_path, caplog):
    path = str(tmp_path / "no-such-dir" / "alive")
    with caplog.at_level(logging.WARNING, logger="django_workitems.health"):
        for _ in range(3):
            health.touch_liveness_file(path)
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and path in warnings[0].getMessage()
    health.touch_liveness_file("bad\0path")  # ValueError from the OS layer: swallowed too

    (tmp_path / "no-such-dir").mkdir()  # it recovers: a later failure warns again
    health.touch_liveness_file(path)
    assert os.path.exists(path)
    (tmp_path / "no-such-dir" / "alive").unlink()
    (tmp_path / "no-such-dir").rmdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="django_workitems.health"):
        health.touch_liveness_file(path)
    assert len([r for r in caplog.records if "cannot be written" in r.getMessage()]) == 1


@pytest.fixture
def no_database(monkeypatch):
    """Any attempt to use a database connection fails the test."""

    def refuse(self):
        raise AssertionError(f"the database {self.alias!r} was used")

    monkeypatch.setattr(BaseDatabaseWrapper, "ensure_connection", refuse)


def test_file_check_passes_on_a_fresh_file_without_the_database(tmp_path, no_database):
    path = tmp_path / "alive"
    path.touch()
    out, failure = health_command("--file", str(path))
    assert failure is None, failure
    assert out.startswith(f"healthy: {path} was touched ") and out.strip().endswith("s ago")


def test_file_check_fails_on_a_stale_file_naming_path_and_age(tmp_path, no_database):
    path = tmp_path / "alive"
    path.touch()
    old = path.stat().st_mtime - 120
    os.utime(path, (old, old))
    out, failure = health_command("--file", str(path), "--max-age", "60")
    assert failure is not None and out == ""
    message = str(failure)
    assert message.startswith(f"unhealthy: {path} was last touched 1")  # 120.x s
    assert "s ago, more than --max-age 60s" in message
    _, failure = health_command("--file", str(path))  # the default max age is 60 too
    assert failure is not None
    assert health_command("--file", str(path), "--max-age", "600")[1] is None


def test_file_check_fails_when_the_file_does_not_exist(tmp_path, no_database):
    path = tmp_path / "never"
    _, failure = health_command("--file", str(path))
    assert failure is not None
    assert str(failure) == (
        f"unhealthy: {path} does not exist (runworkitems --health-file {path} has not touched it)"
    )


@pytest.mark.parametrize("bad", ["0", "-5", "soon", "inf"])
def test_max_age_must_be_a_positive_number(tmp_path, bad):
    with pytest.raises(CommandError, match="max-age"):
        call_command("workitems_health", "--file", str(tmp_path / "f"), "--max-age", bad)


def run_health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "django", "workitems_health", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_file_check_works_with_the_database_down(tmp_path, worker_env):
    """A subprocess whose database is a closed port: --file passes, the other modes fail."""
    path = tmp_path / "alive"
    path.touch()
    env = worker_env(DATABASE_URL="postgres://postgres@127.0.0.1:1/nowhere")
    alive = run_health(env, "--file", str(path), "--max-age", "60")
    assert alive.returncode == 0, alive.stderr
    assert alive.stdout.startswith(f"healthy: {path} was touched")
    # The control: this environment really has no database.
    deployment = run_health(env)
    assert deployment.returncode == 1
    assert "the database could not be read" in deployment.stderr
    ready = run_health(env, "--ready")
    assert ready.returncode == 1 and "not ready: the database refused" in ready.stderr


def process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (``T`` when stopped); ``T`` without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "T"


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_keeps_its_file_fresh_and_a_stopped_one_fails_the_probe(
    tmp_path, start_worker, worker_env
):
    path = tmp_path / "alive"
    env = worker_env()
    worker = start_worker("--handler", "jobs", "--health-file", str(path))

    wait_for(path.exists, timeout=60, message="the worker to create its health file")
    first = path.stat().st_mtime_ns
    wait_for(
        lambda: path.stat().st_mtime_ns > first,
        timeout=60,
        message="the worker to refresh its health file",
    )
    alive = run_health(env, "--file", str(path), "--max-age", "60")
    assert alive.returncode == 0, alive.stderr + worker.output()

    worker.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: process_state(worker.proc.pid) == "T", message="the worker to stop")
        frozen = path.stat().st_mtime_ns
        stale = wait_for(
            lambda: (
                (r := run_health(env, "--file", str(path), "--max-age", "2")).returncode == 1 and r
            ),
            timeout=60,
            message="the probe to fail on the stopped worker's file",
        )
        assert f"unhealthy: {path} was last touched" in stale.stderr
        assert "more than --max-age 2s" in stale.stderr
        assert path.stat().st_mtime_ns == frozen  # a stopped worker touched nothing
    finally:
        worker.proc.send_signal(signal.SIGCONT)

    # Resumed, it touches the file again and the strict probe passes once more.
    wait_for(
        lambda: path.stat().st_mtime_ns > frozen,
        timeout=60,
        message="the resumed worker to touch its file",
    )
    wait_for(
        lambda: run_health(env, "--file", str(path), "--max-age", "2").returncode == 0,
        timeout=60,
        message="the probe to pass on the resumed worker's file",
    )
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.output()


# Readiness: the database takes the lease keeper's writes ----------------------------------


def test_ready_when_the_database_takes_the_lease_keepers_writes():
    handler = Handler.objects.create(name="held", lease_owner="other", lease_expires_at=None)
    with CaptureQueriesContext(connection) as queries:
        out, failure = health_command("--ready")
    assert failure is None, failure
    assert out.startswith(f"ready: the database ({connection.vendor}) takes")
    updates = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(updates) == 2
    assert Handler._meta.db_table in updates[0] and "lease_expires_at" in updates[0]
    assert "last_heartbeat_at" in updates[1]
    handler.refresh_from_db()
    assert (handler.lease_owner, handler.lease_expires_at) == ("other", None)  # untouched


@pytest.fixture
def read_only_database():
    """The database refuses writes, like a hot standby or a read-only replica."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("PRAGMA query_only = ON")
        else:
            cursor.execute("SET transaction_read_only = on")  # until the test's rollback
    try:
        yield
    finally:
        if connection.vendor == "sqlite":
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA query_only = OFF")


def test_not_ready_when_the_database_refuses_writes(read_only_database):
    assert check_health(detail=False).workers_alive == 0  # reads still work
    _, failure = health_command("--ready")
    assert failure is not None
    message = str(failure)
    assert message.startswith("not ready: the database refused the lease keeper's writes: ")
    assert "read" in message.lower()  # "readonly database", "read-only transaction"


def test_not_ready_when_the_database_raises(monkeypatch):
    def down(*args, **kwargs):
        raise DatabaseError("could not connect to server")

    monkeypatch.setattr(Handler.objects, "filter", down)
    _, failure = health_command("--ready")
    assert failure is not None
    assert str(failure) == (
        "not ready: the database refused the lease keeper's writes: could not connect to server"
    )


@override_settings(WORKITEMS={"LEASE_TIMEOUT": "soon"})
def test_not_ready_with_a_bad_lease_timeout():
    _, failure = health_command("--ready")
    assert failure is not None and "LEASE_TIMEOUT" in str(failure)


def test_json_goes_with_neither_file_nor_ready(tmp_path):
    _, failure = health_command("--ready", "--json")
    assert failure is not None and "--json" in str(failure)


# The view --------------------------------------------------------------------------------


def test_the_view_tells_anyone_only_whether_it_is_healthy(client):
    WorkerFactory(hostname="secret-host", pid=9840, stopped_at=timezone.now())
    assert "secret-host" in check_health(detail=False).reason  # what must not leak

    response = client.get("/health/")
    assert response.status_code == 503
    assert response.json() == {"healthy": False}
    assert b"secret-host" not in response.content and b"9840" not in response.content
    assert "no-cache" in response["Cache-Control"]

    WorkerFactory(hostname="secret-host", pid=9841)
    response = client.get("/health/")
    assert response.status_code == 200
    assert response.json() == {"healthy": True}


def test_a_user_who_is_not_staff_is_anonymous_to_the_view(client, django_user_model):
    user = django_user_model.objects.create_user("visitor", password="pw")  # noqa: S106
    client.force_login(user)
    WorkerFactory(hostname="secret-host", stopped_at=timezone.now())
    response = client.get("/health/")
    assert (response.status_code, response.json()) == (503, {"healthy": False})


def test_the_view_gives_staff_the_reason_naming_host_and_pid(admin_client):
    worker = WorkerFactory(hostname="box-9", pid=9840, stopped_at=timezone.now())
    response = admin_client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy" and f"the last one, {worker}, stopped" in body["reason"]
    assert "box-9" in body["reason"]


def test_the_view_gives_staff_the_same_json_as_the_command(admin_client):
    sync_handlers(default_registry)
    WorkerFactory(hostname="box-2")
    response = admin_client.get("/health/")
    assert response.status_code == 200
    body = response.json()
    out, _ = health_command("--json")
    command = json.loads(out)
    assert set(body) == set(command)
    assert [w["hostname"] for w in body["workers"]] == ["box-2"]
    assert [h["name"] for h in body["handlers"]] == [h["name"] for h in command["handlers"]]


def test_the_view_refuses_writes_and_survives_a_database_error(client, admin_client, monkeypatch):
    assert client.post("/health/").status_code == 405

    def down(**kwargs):
        raise DatabaseError("connection refused to db.internal:5432")

    monkeypatch.setattr(health, "check_health", down)
    response = client.get("/health/")
    assert (response.status_code, response.json()) == (503, {"healthy": False})
    response = admin_client.get("/health/")
    assert response.status_code == 503
    assert response.json() == {"status": "unhealthy", "reason": "the database could not be read"}


def test_check_health_without_detail_does_not_read_backlogs(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a backlog was read")

    monkeypatch.setattr(health, "handler_backlog", fail)
    report = check_health(detail=False)
    assert report.handlers == [] and report.workers == [] and not report.healthy


# Backlogs --------------------------------------------------------------------------------


class Counted(workitems.WorkItemHandler[int]):
    closed = 0

    def fetch_next(self, max_items, cancel):
        return []

    def process(self, item, cancel):
        pass

    def backlog(self):
        return 5

    def oldest_waiting(self):
        return timezone.now() - timedelta(minutes=2)

    def close(self):
        Counted.closed += 1


class AsyncCounted(Counted):
    async def backlog(self):
        return 7


class Raising(Counted):
    def backlog(self):
        raise TimeoutError("slow source")


def test_handler_backlog_asks_a_fresh_instance_and_closes_it(registry):
    registry.add_handler(Counted, name="counted").add_handler(AsyncCounted, name="async")
    registry.add_handler(Raising, name="raising")
    Counted.closed = 0

    backlog = handler_backlog("counted", registry)
    assert backlog.count == 5 and backlog.error == ""
    assert timedelta(minutes=2) <= backlog.age() < timedelta(minutes=3)
    assert handler_backlog("async", registry).count == 7
    failed = handler_backlog("raising", registry)
    assert (failed.count, failed.error) == (None, "TimeoutError: slow source")
    assert Counted.closed == 3  # closed after an error too
    assert handler_backlog("unknown", registry).registered is False


def test_unregistered_handlers_get_no_backlog_in_the_report():
    Handler.objects.create(name="retired", is_registered=False)
    report = check_health()
    retired = next(h for h in report.as_dict()["handlers"] if h["name"] == "retired")
    assert retired["registered"] is False and retired["backlog"] is None
