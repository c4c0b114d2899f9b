"""Handlers the worker subprocess tests run; they take their work from ``Job`` rows."""

from __future__ import annotations

import os
import signal
import time

from django.db.models import F
from django.utils import timezone

import django_workitems as workitems

from .models import Activity, Job, ProcessLog, Task


class JobHandler(workitems.WorkItemHandler[Job]):
    """Reads queued jobs of its queue (no claim: an exclusive handler) and runs them."""

    queue = "jobs"

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[Job]:
        return list(Job.objects.filter(queue=self.queue, status="queued")[:max_items])

    def process(self, item: Job, cancel: workitems.CancellationToken) -> None:
        Job.objects.filter(pk=item.pk).update(started_at=timezone.now())
        if item.action == "fail":
            raise ValueError(f"job {item.pk} is set to fail")
        if item.action == "sleep" and cancel.wait(item.seconds):
            raise workitems.Cancelled()
        if item.action == "stubborn":  # ignores cancellation, like a blocking call would
            time.sleep(item.seconds)
        Job.objects.filter(pk=item.pk).update(
            status="done", times_processed=F("times_processed") + 1, finished_at=timezone.now()
        )


class SlowJobHandler(JobHandler):
    queue = "slow"


class BrokenFetchHandler(workitems.WorkItemHandler[Job]):
    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[Job]:
        raise RuntimeError("the source is down")

    def process(self, item: Job, cancel: workitems.CancellationToken) -> None:  # pragma: no cover
        raise AssertionError("never reached")


class TaskHandler(workitems.QuerySetHandler[Task]):
    """Claims Task rows; ``action`` says what handling does (``crash`` kills the worker)."""

    queryset = Task.objects.all()
    retry_backoff = 0.05

    def handle(self, obj: Task, cancel: workitems.CancellationToken) -> None:
        ProcessLog.objects.create(task_id=obj.pk, pid=os.getpid())
        if obj.action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if obj.action == "fail":
            raise ValueError(f"task {obj.pk} is set to fail")
        if obj.action == "fail-first":  # slow and failing the first time, fine after that
            if ProcessLog.objects.filter(task_id=obj.pk).count() == 1:
                time.sleep(obj.seconds)
                raise ValueError(f"task {obj.pk} failed on its first run")
            return
        if obj.seconds and cancel.wait(obj.seconds):
            raise workitems.Cancelled()


class ExclusiveJobHandler(JobHandler):
    """Reads without claiming (so it must never run in two processes at once) and logs spans."""

    queue = "exclusive"

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[Job]:
        self.started = timezone.now()
        return super().fetch_next(max_items, cancel)

    def close(self) -> None:
        if hasattr(self, "started"):
            Activity.objects.create(pid=os.getpid(), started=self.started, ended=timezone.now())


class QueueJobHandler(JobHandler):
    """An exclusive handler of one queue, made by a factory: ``QueueJobHandler(queue)``."""

    def __init__(self, queue: str) -> None:
        self.queue = queue


class QueueTaskHandler(workitems.QuerySetHandler[Task]):
    """A claiming handler of the Task rows whose ``action`` is its queue's name."""

    queryset = Task.objects.all()

    def __init__(self, queue: str) -> None:
        super().__init__()
        self.queue = queue
        self.queryset = Task.objects.filter(action=queue)

    def handle(self, obj: Task, cancel: workitems.CancellationToken) -> None:
        ProcessLog.objects.create(task_id=obj.pk, pid=os.getpid())
        if obj.seconds and cancel.wait(obj.seconds):
            raise workitems.Cancelled()


class ScheduledHandler(workitems.WorkItemHandler[str]):
    """One item per activation, logged in ``ProcessLog`` (task_id 0) by the process that ran it;
    it takes ``WORKITEMS_TEST_SCHEDULE_SECONDS`` (so a test can kill a worker mid-slot)."""

    def fetch_next(self, max_items: int, cancel: workitems.CancellationToken) -> list[str]:
        return [f"slot-{time.time():.3f}"]

    def process(self, item: str, cancel: workitems.CancellationToken) -> None:
        ProcessLog.objects.create(task_id=0, pid=os.getpid())
        if cancel.wait(float(os.environ.get("WORKITEMS_TEST_SCHEDULE_SECONDS", "0"))):
            raise workitems.Cancelled()
