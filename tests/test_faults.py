"""Faults made to happen (issue 11): real ``runworkitems`` subprocesses, real signals, and a
loopback TCP proxy of our own between the worker and PostgreSQL (``tests/faultproxy.py``)."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from django.db import connection

from django_workitems.models import HandlerRun
from tests.conftest import database_url, wait_for
from tests.faultproxy import FaultProxy, fault_proxy
from tests.test_scaleout import postgres_only, stop_all
from tests.testapp.models import Activity, Job, ProcessLog, Task

pytestmark = pytest.mark.django_db(transaction=True)

SKEW_PROBE = (
    "import django, time; django.setup(); from django.utils import timezone; "
    "print(timezone.now().timestamp() - time.time())"
)

SHUTDOWN = 3.0  # WORKITEMS_SHUTDOWN_TIMEOUT of these workers, in seconds


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    postgres_only()
    settings = connection.settings_dict
    with fault_proxy((settings["HOST"] or "127.0.0.1", int(settings["PORT"] or 5432))) as p:
        yield p


def through(proxy: FaultProxy) -> dict[str, str]:
    """Worker settings that reach the test database through the proxy."""
    url = database_url()
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    return {
        "DATABASE_URL": url.replace(f"@{host_port}/", f"@127.0.0.1:{proxy.port}/"),
        "WORKITEMS_SHUTDOWN_TIMEOUT": f"00:00:0{int(SHUTDOWN)}",
        "WORKITEMS_LEASE_TIMEOUT": "00:00:04",
    }


def test_a_claim_whose_reply_was_lost_is_recovered_while_the_worker_lives(start_worker, proxy):
    """Defect 1: the claim committed, its reply never arrived; the rows must not stay stuck
    under the live worker, and the lost claim costs no attempt."""
    Task.objects.bulk_create([Task() for _ in range(20)])
    # The normal claim orders by availability (the take-back of dead workers' rows does not).
    proxy.drop_reply_to(b'ORDER BY "testapp_task"."available_at"')
    worker = start_worker("--handler", "tasks", "--workers", "2", **through(proxy))
    assert proxy.dropped.wait(60), "the claim never went through the proxy"

    wait_for(
        lambda: Task.objects.filter(status="succeeded").count() == 20,
        timeout=60,
        message="every row, including those of the lost claim",
    )
    assert worker.proc.poll() is None, "recovered only because the worker stopped"
    stop_all([worker])
    assert set(Task.objects.values_list("attempts", flat=True)) == {1}
    assert set(Counter(ProcessLog.objects.values_list("task_id", flat=True)).values()) == {1}
    assert "put back in the queue" in worker.output()


@pytest.mark.parametrize("fault", ["freeze", "refuse"])
def test_sigterm_ends_the_worker_in_bounded_time_whatever_the_database_does(
    start_worker, proxy, fault
):
    """Defects 2 and 3: a database that refuses, or never answers (half-open), must not hold
    the worker past SHUTDOWN_TIMEOUT plus a few seconds."""
    Task.objects.bulk_create([Task(seconds=30) for _ in range(6)])
    worker = start_worker("--handler", "tasks", "--workers", "2", **through(proxy))
    wait_for(lambda: ProcessLog.objects.count() >= 2, timeout=60, message="two rows in process")
    proxy.set_mode(fault)
    sent = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    rc = worker.wait(SHUTDOWN + 30)
    took = time.monotonic() - sent
    assert rc == 0, worker.output()
    assert took < SHUTDOWN + 15, f"the worker took {took:.1f}s to stop\n{worker.output()}"


def test_a_second_sigint_exits_at_once_even_with_the_database_frozen(start_worker, proxy):
    Task.objects.bulk_create([Task(seconds=30) for _ in range(4)])
    settings = {**through(proxy), "WORKITEMS_SHUTDOWN_TIMEOUT": "00:01:00"}
    worker = start_worker("--handler", "tasks", "--workers", "2", **settings)
    wait_for(lambda: ProcessLog.objects.count() >= 1, timeout=60, message="a row in process")
    proxy.set_mode("freeze")
    worker.proc.send_signal(signal.SIGINT)
    wait_for(lambda: "stopping" in worker.output(), timeout=20, message="the first SIGINT seen")
    worker.proc.send_signal(signal.SIGINT)
    assert worker.wait(20) == 130, worker.output()


def test_a_run_whose_end_could_not_be_written_for_long_is_written_once_the_database_is_back(
    start_worker, proxy
):
    """Defect 4: the item ends while the database refuses every connection for longer than the
    recorder once tried; the run must not stay ``running`` under the live worker."""
    task = Task.objects.create(seconds=1.5)
    worker = start_worker("--handler", "tasks", "--workers", "1", **through(proxy))
    wait_for(lambda: ProcessLog.objects.filter(task_id=task.pk).exists(), timeout=60)
    proxy.set_mode("refuse")
    outage = time.monotonic()
    wait_for(lambda: time.monotonic() >= outage + 10, timeout=30, message="a 10 s outage")
    proxy.set_mode("pass")
    # (Fetches tried during the outage are runs of their own, recorded failed.)
    runs = HandlerRun.objects.filter(handler__name="tasks", items_fetched__gt=0)
    run = wait_for(
        lambda: runs.exclude(status="running").first(),
        timeout=60,
        message="the run's end written after the outage",
    )
    assert worker.proc.poll() is None, "written only because the worker stopped"
    assert (run.status, run.items_fetched, run.items_succeeded) == ("succeeded", 1, 1)
    wait_for(
        lambda: Task.objects.get(pk=task.pk).status == "succeeded",
        timeout=60,
        message="the row's kept outcome written",
    )
    assert worker.proc.poll() is None
    stop_all([worker])


def test_a_worker_stalled_past_its_lease_does_not_double_an_exclusive_handler(start_worker):
    """Defect 10: SIGSTOP past LEASE_TIMEOUT, another worker takes the lease, then SIGCONT:
    the resumed worker starts none of its queued items and fetches nothing without the lease.
    Only the one item in process at the stall can run twice (it cannot be un-started)."""
    postgres_only()
    Job.objects.bulk_create(
        [Job(queue="exclusive", action="sleep", seconds=0.2) for _ in range(40)]
    )
    lease = {"WORKITEMS_LEASE_TIMEOUT": "00:00:02"}
    stalled = start_worker("--handler", "exclusive-jobs", "--workers", "1", **lease)
    done = Job.objects.filter(queue="exclusive", status="done")
    wait_for(lambda: done.count() >= 3, timeout=60, message="the first worker under way")
    stalled.proc.send_signal(signal.SIGSTOP)
    try:
        before = done.count()
        other = start_worker("--handler", "exclusive-jobs", "--workers", "1", **lease)
        wait_for(lambda: done.count() >= before + 5, timeout=60, message="the lease taken over")
    finally:
        stalled.proc.send_signal(signal.SIGCONT)
    wait_for(
        lambda: not Job.objects.filter(queue="exclusive").exclude(status="done").exists(),
        timeout=120,
        message="every job",
    )
    stop_all([stalled, other])

    twice = Job.objects.filter(queue="exclusive", times_processed__gt=1).count()
    assert twice <= 1, f"{twice} jobs processed twice"
    assert not Job.objects.filter(queue="exclusive", times_processed=0).exists()


def test_a_host_whose_clock_is_ahead_takes_no_live_workers_row_nor_its_lease(
    start_worker, worker_env
):
    """Defect 12, with real workers: one process's clock 30 s ahead, LEASE_TIMEOUT 10 s."""
    postgres_only()
    probe = subprocess.run(
        [sys.executable, "-c", SKEW_PROBE],
        env=worker_env(WORKITEMS_TEST_CLOCK_SKEW="30"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 29 < float(probe.stdout) < 40, probe.stderr  # the hook really skews that process
    Task.objects.bulk_create([Task(seconds=4) for _ in range(4)])
    Job.objects.bulk_create([Job(queue="exclusive", action="sleep", seconds=4) for _ in range(2)])
    lease = {"WORKITEMS_LEASE_TIMEOUT": "00:00:10"}
    handlers = ["--handler", "tasks", "--handler", "exclusive-jobs", "--workers", "6"]
    live = start_worker(*handlers, **lease)
    wait_for(lambda: ProcessLog.objects.count() == 4, timeout=60, message="every row claimed")
    wait_for(lambda: Job.objects.filter(started_at__isnull=False).exists(), timeout=60)
    ahead = start_worker(*handlers, WORKITEMS_TEST_CLOCK_SKEW="30", **lease)
    wait_for(lambda: "started" in ahead.output(), timeout=60, message="the skewed worker")
    wait_for(
        lambda: (
            Task.objects.filter(status="succeeded").count() == 4
            and not Job.objects.exclude(status="done").exists()
        ),
        timeout=90,
        message="every row and job done",
    )
    stop_all([live, ahead])

    assert set(ProcessLog.objects.values_list("pid", flat=True)) == {live.proc.pid}
    assert set(Job.objects.values_list("times_processed", flat=True)) == {1}
    assert not HandlerRun.objects.filter(status="abandoned").exists()
    spans = sorted(Activity.objects.values_list("started", "ended"))
    for (_, ended), (started, _) in itertools.pairwise(spans):
        assert started >= ended, "two activations of the exclusive handler overlapped"
