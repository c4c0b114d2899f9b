"""Several worker processes on one database: claims, leases, crashes, stalls, wake-ups.

Real ``runworkitems`` subprocesses, real signals, a real database connection.
"""

from __future__ import annotations

import itertools
import signal
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from django_workitems.background import notify
from django_workitems.models import Handler, HandlerRun, RunStatus, Worker
from tests.conftest import wait_for
from tests.factories import HandlerFactory, HandlerRunFactory, WorkerFactory
from tests.testapp.models import Activity, Job, ProcessLog, Task

pytestmark = pytest.mark.django_db(transaction=True)

FAST_LEASE = {"WORKITEMS_LEASE_TIMEOUT": "00:00:02"}


def postgres_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip(
            "PostgreSQL only; the SQLite run covers claims, retries and leases in one process"
        )


def stop_all(workers) -> None:
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        assert worker.wait(60) in (0, -signal.SIGKILL), worker.output()


def test_three_workers_share_the_rows_each_processed_exactly_once(start_worker):
    postgres_only()
    Task.objects.bulk_create([Task(seconds=0.01) for _ in range(1500)])
    workers = [start_worker("--handler", "tasks") for _ in range(3)]

    wait_for(
        lambda: Task.objects.filter(status="succeeded").count() == 1500,
        timeout=180,
        message="1500 rows",
    )
    stop_all(workers)

    per_task = Counter(ProcessLog.objects.values_list("task_id", flat=True))
    assert len(per_task) == 1500 and set(per_task.values()) == {1}, "a row was processed twice"
    assert ProcessLog.objects.values("pid").distinct().count() > 1, "only one worker took part"


def test_an_exclusive_handler_never_runs_in_two_workers_at_once(start_worker):
    Job.objects.bulk_create(
        [Job(queue="exclusive", action="sleep", seconds=0.01) for _ in range(60)]
    )
    workers = [start_worker("--handler", "exclusive-jobs") for _ in range(3)]

    wait_for(
        lambda: not Job.objects.filter(queue="exclusive").exclude(status="done").exists(),
        timeout=120,
        message="every job",
    )
    stop_all(workers)

    assert set(Job.objects.values_list("times_processed", flat=True)) == {1}
    spans = sorted(Activity.objects.values_list("started", "ended", "pid"))
    assert len(spans) >= 12
    for (_, ended, pid), (started, _, other) in itertools.pairwise(spans):
        assert started >= ended, f"activations of {pid} and {other} overlapped"


def test_kill_9_mid_batch_another_worker_finishes_every_row(start_worker):
    Task.objects.bulk_create([Task(seconds=0.05) for _ in range(120)])
    first = start_worker("--handler", "tasks", **FAST_LEASE)
    wait_for(lambda: ProcessLog.objects.count() >= 20, message="the first worker to get going")

    first.proc.kill()
    assert first.wait(30) == -signal.SIGKILL
    dead = Worker.objects.get(pid=first.proc.pid)
    in_flight = set(
        Task.objects.filter(status="processing", claimed_by=dead).values_list("pk", flat=True)
    )
    assert in_flight, "the kill did not catch anything in flight"

    second = start_worker("--handler", "tasks", **FAST_LEASE)
    wait_for(
        lambda: Task.objects.filter(status="succeeded").count() == 120,
        timeout=180,
        message="every row",
    )
    stop_all([second])

    assert not Task.objects.exclude(status="succeeded").exists()
    processed = set(ProcessLog.objects.values_list("task_id", flat=True))
    assert in_flight <= processed
    assert HandlerRun.objects.filter(worker=dead, status=RunStatus.ABANDONED).exists()
    assert not HandlerRun.objects.filter(worker=dead, status=RunStatus.RUNNING).exists()


def test_an_idle_worker_takes_a_dead_workers_rows_back_without_waiting_for_its_poll(
    start_worker,
):
    """The heartbeat that finds a worker dead asks for its handlers at once: a survivor that
    polls once an hour takes the rows back within seconds of the death becoming visible."""
    dead = WorkerFactory(hostname="gone")
    HandlerRunFactory(handler=HandlerFactory(name="tasks"), worker=dead, status=RunStatus.RUNNING)
    Task.objects.bulk_create(
        [
            Task(
                status="processing",
                claimed_by=dead,
                claimed_at=timezone.now(),
                claim_token=uuid.uuid4(),
                attempts=1,
            )
            for _ in range(10)
        ]
    )

    def heartbeat_and_check() -> bool:
        # The dead worker looks alive until the survivor's first fetch has come back empty.
        Worker.objects.filter(pk=dead.pk).update(last_heartbeat_at=timezone.now())
        return Handler.objects.filter(name="tasks", last_checked_at__isnull=False).exists()

    survivor = start_worker("--handler", "tasks", "--poll-interval", "01:00:00", **FAST_LEASE)
    wait_for(heartbeat_and_check, timeout=60, message="the survivor's first (empty) fetch")
    assert not Task.objects.exclude(status="processing").exists(), "taken from a live worker"

    # The heartbeat stops: the death is visible LEASE_TIMEOUT (2 s) later.
    wait_for(
        lambda: Task.objects.filter(status="succeeded").count() == 10,
        timeout=45,
        message="the dead worker's rows, long before the survivor's next poll",
    )
    stop_all([survivor])
    assert HandlerRun.objects.filter(worker=dead, status=RunStatus.ABANDONED).count() == 1
    assert set(Task.objects.values_list("attempts", flat=True)) == {2}


def test_a_poison_row_ends_failed_and_its_batch_mates_succeed(start_worker):
    Task.objects.bulk_create(
        [Task(action="crash" if i == 3 else "ok", seconds=0.02) for i in range(20)]
    )
    poison = Task.objects.get(action="crash")
    workers = []
    for _ in range(8):  # a supervisor restarting the worker each time it dies
        worker = start_worker("--handler", "tasks", **FAST_LEASE)
        workers.append(worker)
        wait_for(
            lambda worker=worker: (
                worker.proc.poll() is not None
                or not Task.objects.exclude(status__in=["succeeded", "failed"]).exists()
            ),
            timeout=120,
            message="the worker to die or the work to end",
        )
        if worker.proc.poll() is None:
            break
    stop_all(workers)

    poison.refresh_from_db()
    assert poison.status == "failed" and "died" in poison.last_error
    assert ProcessLog.objects.filter(task_id=poison.pk).count() == poison.attempts == 3
    assert set(Task.objects.exclude(pk=poison.pk).values_list("status", flat=True)) == {"succeeded"}
    assert sum(w.proc.returncode == -signal.SIGKILL for w in workers) == 3


def test_a_stalled_worker_cannot_overwrite_the_outcome_of_a_row_taken_back(start_worker):
    task = Task.objects.create(action="fail-first", seconds=3)
    stalled = start_worker("--handler", "tasks", **FAST_LEASE)
    wait_for(lambda: ProcessLog.objects.filter(task_id=task.pk).exists(), message="the first run")
    stalled.proc.send_signal(signal.SIGSTOP)
    try:
        other = start_worker("--handler", "tasks", **FAST_LEASE)
        wait_for(
            lambda: Task.objects.get(pk=task.pk).status == "succeeded",
            timeout=60,
            message="the row taken back and done",
        )
    finally:
        stalled.proc.send_signal(signal.SIGCONT)
    # Its late outcome is fenced off: the failure it meant to write or, if the stop came before
    # its handler looked at ProcessLog (then it sees the other run and succeeds), the success.
    wait_for(
        lambda: any(
            fenced in stalled.output()
            for fenced in ("claim lost", "claimed by another worker meanwhile")
        ),
        timeout=60,
        message="the stalled worker's late write",
    )
    stop_all([stalled, other])

    task.refresh_from_db()
    assert task.status == "succeeded" and task.last_error == ""
    assert ProcessLog.objects.filter(task_id=task.pk).values("pid").distinct().count() == 2


def test_an_idle_worker_wakes_within_a_second_of_notify(start_worker):
    postgres_only()
    worker = start_worker("--handler", "tasks", "--poll-interval", "01:00:00")
    wait_for(lambda: "Listening for wake-ups" in worker.output(), message="the worker to listen")
    latencies = []
    for _ in range(3):
        task = Task.objects.create()
        sent = timezone.now()
        notify("tasks")
        wait_for(
            lambda task=task: ProcessLog.objects.filter(task_id=task.pk).exists(), message="the row"
        )
        latencies.append(ProcessLog.objects.get(task_id=task.pk).at - sent)
    stop_all([worker])

    assert max(latencies) < timedelta(seconds=1), latencies


def test_the_worker_survives_its_connections_being_terminated(start_worker):
    postgres_only()
    Task.objects.bulk_create([Task(seconds=0.01) for _ in range(300)])
    worker = start_worker("--handler", "tasks", **FAST_LEASE)
    for threshold in (50, 150):
        wait_for(
            lambda threshold=threshold: ProcessLog.objects.count() >= threshold, message="progress"
        )
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert cursor.fetchone()[0] >= 1

    wait_for(
        lambda: Task.objects.filter(status="succeeded").count() == 300,
        timeout=180,
        message="every row after the connections were cut",
    )
    assert worker.proc.poll() is None, "the worker died"
    stop_all([worker])


def test_max_cycles_and_max_memory_stop_the_worker_cleanly(start_worker):
    cycles = start_worker("--handler", "tasks", "--poll-interval", "0.2", "--max-cycles", "3")
    assert cycles.wait(60) == 0, cycles.output()
    assert "recycling after 3 cycles" in cycles.output()
    memory = start_worker("--handler", "tasks", "--max-memory", "1")
    assert memory.wait(60) == 0, memory.output()
    assert "over --max-memory" in memory.output()
    assert Worker.objects.filter(stopped_at__isnull=True).count() == 0


def test_sigterm_puts_claimed_rows_back_without_counting_an_attempt(start_worker):
    Task.objects.bulk_create([Task(seconds=60) for _ in range(10)])
    worker = start_worker("--handler", "tasks", "--workers", "2")
    wait_for(lambda: ProcessLog.objects.count() == 2, message="two rows in process")
    # Two started and two waiting: with no item duration known yet, a worker claims no more
    # than its two threads can start, so the other six stay for other workers.
    wait_for(lambda: Task.objects.filter(status="processing").count() == 4, message="two waiting")

    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()

    assert list(Task.objects.values_list("status", "attempts", "claim_token").distinct()) == [
        ("queued", 0, None)
    ]
    assert HandlerRun.objects.get().status == RunStatus.CANCELLED
