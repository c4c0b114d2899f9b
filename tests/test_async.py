"""Async items share one event loop: more at once than pool threads, bounded by
``ASYNC_CONCURRENCY``, cancelled for real when they hang."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest
from django.test import override_settings

import django_workitems as workitems
from django_workitems.background import run_once
from django_workitems.models import HandlerRun
from tests.testapp.models import Task

pytestmark = pytest.mark.django_db(transaction=True)


class Gauge:
    """How many items are in ``process`` at once, and the most there ever were."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.threads: set[str] = set()


class GatheringHandler(workitems.WorkItemHandler[int]):
    """Each item waits (up to 20 s) until ``target`` items are in process at once."""

    gauge = Gauge()
    target = 10
    total = 30

    def fetch_next(self, max_items, cancel):
        start = getattr(self, "_next", 0)
        items = list(range(start, min(self.total, start + max_items)))
        self._next = start + len(items)
        return items

    async def process(self, item, cancel):
        gauge = self.gauge
        with gauge.lock:
            gauge.now += 1
            gauge.most = max(gauge.most, gauge.now)
            gauge.threads.add(threading.current_thread().name)
        try:
            for _ in range(2000):
                if gauge.most >= self.target:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"only {gauge.most} items ever ran at once")
        finally:
            with gauge.lock:
                gauge.now -= 1


@override_settings(WORKITEMS={"WORKERS": 2, "QUEUE_SIZE": 100, "ASYNC_CONCURRENCY": 10})
def test_async_items_run_more_at_once_than_threads_and_at_most_async_concurrency(registry):
    GatheringHandler.gauge = Gauge()
    registry.add_handler(GatheringHandler, name="gather", max_items_per_cycle=30)

    result = run_once(registry=registry)

    assert (result["gather"].succeeded, result["gather"].failed) == (30, 0)
    assert GatheringHandler.gauge.most == 10  # 5x the pool threads, never more than allowed
    assert GatheringHandler.gauge.threads == {"workitems-async"}  # one loop for them all


class HangingHandler(workitems.WorkItemHandler[int]):
    def fetch_next(self, max_items, cancel):
        return [1, 2, 3]

    async def process(self, item, cancel):
        if item == 2:
            await asyncio.sleep(3600)  # ignores its token: only cancelling the task ends it


@override_settings(WORKITEMS={"WORKERS": 1, "ASYNC_CONCURRENCY": 10})
def test_a_hung_async_item_is_cancelled_after_its_grace_and_no_thread_is_given_up(registry):
    registry.add_handler(HangingHandler, name="hangs", item_timeout=timedelta(seconds=0.2))

    result = run_once(registry=registry)

    outcome = result["hangs"]
    assert (outcome.succeeded, outcome.failed) == (2, 1)
    [failure] = outcome.failures
    assert failure.item_id == "2" and "did not finish within" in failure.message
    assert "it was cancelled" in failure.message
    assert HandlerRun.objects.get(handler__name="hangs").items_failed == 1


class AsyncTaskHandler(workitems.QuerySetHandler[Task]):
    queryset = Task.objects.all()
    retry_backoff = 0

    async def handle(self, obj, cancel):
        await asyncio.sleep(0)
        if obj.action == "fail":
            raise ValueError(f"task {obj.pk} is set to fail")


@override_settings(WORKITEMS={"WORKERS": 1, "ASYNC_CONCURRENCY": 5})
def test_a_queryset_handler_with_an_async_handle_writes_its_outcomes_from_the_loop(registry):
    Task.objects.bulk_create([Task() for _ in range(8)] + [Task(action="fail")])
    registry.add_handler(AsyncTaskHandler, name="async-tasks", max_items_per_cycle=20)

    result = run_once(registry=registry)

    assert (result["async-tasks"].succeeded, result["async-tasks"].failed) == (8, 1)
    assert Task.objects.filter(status="succeeded").count() == 8
    failed = Task.objects.get(action="fail")
    assert (failed.status, failed.attempts) == ("queued", 1)
    assert "is set to fail" in failed.last_error


def test_the_event_loop_starts_nothing_once_stopped():
    from django_workitems.aio import EventLoop

    loop = EventLoop(1)
    ran = []

    async def item() -> None:
        ran.append(1)

    assert loop.acquire(stopped=lambda: False) and loop.start(item())
    loop.stop(5)  # runs what was started first
    assert ran == [1]
    assert loop.acquire(stopped=lambda: False)
    assert loop.start(item()) is False  # no second loop thread after stop
    assert ran == [1]
    assert loop.acquire(stopped=lambda: True)  # the refused start gave its permit back
