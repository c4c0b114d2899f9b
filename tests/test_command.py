"""``manage.py runworkitems`` in a real subprocess, with real signals."""

from __future__ import annotations

import signal

import pytest

from django_workitems.models import Handler, HandlerRun, RunStatus, Worker
from tests.conftest import wait_for
from tests.testapp.models import Job

pytestmark = pytest.mark.django_db(transaction=True)


def test_once_processes_a_cycle_and_exits_0_even_with_item_failures(start_worker):
    Job.objects.bulk_create([Job(action="fail" if i == 2 else "ok") for i in range(5)])

    worker = start_worker("--once", "--handler", "jobs")
    assert worker.wait() == 0, worker.output()

    assert Job.objects.filter(status="done").count() == 4
    run = HandlerRun.objects.get(handler__name="jobs")
    assert run.status == RunStatus.PARTIAL and (run.items_succeeded, run.items_failed) == (4, 1)
    assert "jobs: partial, 5 fetched, 4 succeeded, 1 failed" in worker.output()
    assert Worker.objects.get().stopped_at is not None


def test_once_exits_1_when_a_fetch_raises(start_worker):
    worker = start_worker("--once", "--handler", "broken-fetch", "--handler", "jobs")
    assert worker.wait() == 1
    assert "fetch failed for: broken-fetch" in worker.output()
    assert HandlerRun.objects.get(handler__name="broken-fetch").status == RunStatus.FAILED


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--handler", "no-such-handler"], {}, "Unknown work item handler 'no-such-handler'"),
        (["--purpose", "nonsense"], {}, "invalid choice: 'nonsense'"),
        (["--workers", "0"], {}, "must be >= 1"),
        (["--poll-interval", "soon"], {}, "invalid duration 'soon'"),
        ([], {"WORKITEMS_WORKERS": "0"}, "django_workitems.E003"),
        ([], {"WORKITEMS_POLL_INTERVAL": "every now and then"}, "django_workitems.E002"),
    ],
)
def test_bad_usage_or_configuration_exits_2_before_touching_any_handler(
    start_worker, args, env, expected
):
    Job.objects.create()
    worker = start_worker("--once", *args, **env)
    assert worker.wait() == 2
    assert expected in worker.output()
    assert Job.objects.get().status == "queued"
    assert not HandlerRun.objects.exists()


def test_bad_setting_message_names_the_key_and_value(start_worker):
    worker = start_worker("--once", WORKITEMS_WORKERS="-3")
    assert worker.wait() == 2
    assert "WORKERS" in worker.output() and "-3" in worker.output()


def test_list_prints_the_handlers(start_worker):
    worker = start_worker("--list", "--purpose", "export")
    assert worker.wait() == 0
    output = worker.output()
    assert "slow-jobs" in output and "export" in output and "never" in output
    assert "broken-fetch" not in output


def test_sigterm_finishes_items_in_process_releases_the_rest_and_exits_0(start_worker):
    # One worker thread: the first job is in process, the others wait in the channel.
    Job.objects.bulk_create([Job(queue="slow", action="stubborn", seconds=1.5) for _ in range(4)])
    worker = start_worker(
        "--handler", "slow-jobs", "--workers", "1", WORKITEMS_SHUTDOWN_TIMEOUT="00:00:20"
    )
    wait_for(
        lambda: Job.objects.filter(started_at__isnull=False).exists(), message="a job to start"
    )

    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()

    jobs = list(Job.objects.order_by("id"))
    assert jobs[0].status == "done" and jobs[0].times_processed == 1  # given time to finish
    assert [(j.status, j.times_processed, j.started_at) for j in jobs[1:]] == [
        ("queued", 0, None)
    ] * 3
    run = HandlerRun.objects.get(handler__name="slow-jobs")
    assert run.status == RunStatus.CANCELLED
    assert (run.items_fetched, run.items_succeeded) == (4, 1)
    assert Worker.objects.get().stopped_at is not None


def test_sigterm_gives_up_on_items_after_the_shutdown_timeout(start_worker):
    Job.objects.create(queue="slow", action="stubborn", seconds=60)
    worker = start_worker("--handler", "slow-jobs", WORKITEMS_SHUTDOWN_TIMEOUT="00:00:01")
    wait_for(
        lambda: Job.objects.filter(started_at__isnull=False).exists(), message="the job to start"
    )

    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()

    assert HandlerRun.objects.get(handler__name="slow-jobs").status == RunStatus.CANCELLED
    assert Job.objects.get().status == "queued"
    assert "still in process after the shutdown timeout" in worker.output()


def test_sigint_cancels_the_token_and_a_second_sigint_exits_at_once(start_worker):
    Job.objects.create(queue="slow", action="stubborn", seconds=120)
    Job.objects.create(queue="slow", action="sleep", seconds=120)
    worker = start_worker("--handler", "slow-jobs", WORKITEMS_SHUTDOWN_TIMEOUT="00:05:00")
    wait_for(
        lambda: Job.objects.filter(started_at__isnull=False).count() == 2,
        message="both jobs to start",
    )

    worker.proc.send_signal(signal.SIGINT)
    # The cancellable job stops at once; the stubborn one would hold the shutdown for minutes.
    wait_for(
        lambda: "released 1 item " in worker.output() or "Cancelled" in worker.output(),
        message="the cancellable job to stop",
    )
    worker.proc.send_signal(signal.SIGINT)
    assert worker.wait(15) == 130
    assert "Second interrupt" in worker.output()


def test_a_running_worker_picks_up_new_work_and_runs_requested_handlers(start_worker):
    worker = start_worker("--handler", "jobs", "--poll-interval", "01:00:00")
    wait_for(lambda: Handler.objects.filter(name="jobs").exists(), message="the handler rows")
    wait_for(lambda: "Worker" in worker.output() and "started" in worker.output(), message="start")
    Job.objects.create()

    from django_workitems.background import notify

    notify("jobs")
    wait_for(lambda: Job.objects.filter(status="done").count() == 1, message="the job after notify")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_a_worker_with_more_hung_threads_than_workers_exits_3_for_a_fresh_process(start_worker):
    # Items that ignore cancellation and outlast their timeout and grace (0.3 s + 0.3 s).
    Job.objects.bulk_create([Job(queue="slow", action="stubborn", seconds=30) for _ in range(3)])
    worker = start_worker(
        "--handler", "slow-jobs", "--workers", "1", WORKITEMS_ITEM_TIMEOUT="00:00:00.3"
    )
    assert worker.wait(90) == 3, worker.output()
    output = worker.output()
    assert "did not finish within" in output and "given up on hung calls" in output
    assert HandlerRun.objects.filter(handler__name="slow-jobs", items_failed__gte=1).exists()
