"""Cron schedules: the next-slot function, registration, and one run per slot across workers."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from django.utils import timezone

from django_workitems.models import Handler, HandlerRun, RunStatus, Worker
from django_workitems.recording import sync_handlers
from django_workitems.registry import HandlerRegistry
from django_workitems.schedules import CronSchedule
from django_workitems.slots import SlotKeeper
from tests.conftest import wait_for
from tests.factories import WorkerFactory
from tests.testapp.handlers import JobHandler, ScheduledHandler
from tests.testapp.models import ProcessLog

BERLIN = ZoneInfo("Europe/Berlin")

# -- the next-slot function ----------------------------------------------------------------


def _slots(expression: str, start: datetime, count: int) -> list[datetime]:
    cron = CronSchedule.parse(expression)
    slots = [cron.next_after(start)]
    while len(slots) < count:
        slots.append(cron.next_after(slots[-1]))
    return slots


@override_settings(TIME_ZONE="Europe/Berlin")
def test_a_daily_slot_is_neither_skipped_nor_doubled_when_the_clocks_go_forward():
    # 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
    slots = _slots("30 2 * * *", datetime(2026, 3, 27, 12, tzinfo=BERLIN), 4)
    local = [s.astimezone(BERLIN) for s in slots]
    assert [s.day for s in local] == [28, 29, 30, 31]  # one slot per day
    assert (local[1].hour, local[1].minute) == (3, 0)  # runs when the clock jumps past it
    assert [(s.hour, s.minute) for s in local[2:]] == [(2, 30), (2, 30)]


@override_settings(TIME_ZONE="Europe/Berlin")
def test_a_daily_slot_is_neither_skipped_nor_doubled_when_the_clocks_go_back():
    # 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice that day.
    slots = _slots("30 2 * * *", datetime(2026, 10, 23, 12, tzinfo=BERLIN), 4)
    local = [s.astimezone(BERLIN) for s in slots]
    assert [s.day for s in local] == [24, 25, 26, 27]
    assert all((s.hour, s.minute) == (2, 30) for s in local)
    assert slots[2].astimezone(UTC) - slots[1].astimezone(UTC) == timedelta(hours=25)


@override_settings(TIME_ZONE="Europe/Berlin")
def test_six_fields_with_seconds_0_keep_the_daylight_saving_rules():
    assert CronSchedule.parse("0 30 2 * * *").expression == "30 2 * * *"
    for start in (
        datetime(2026, 3, 27, 12, tzinfo=BERLIN),
        datetime(2026, 10, 23, 12, tzinfo=BERLIN),
    ):
        days = [s.astimezone(BERLIN).day for s in _slots("0 30 2 * * *", start, 4)]
        assert days == [start.day + 1 + i for i in range(4)]


@override_settings(TIME_ZONE="Europe/Berlin")
def test_slots_are_evaluated_in_time_zone():
    cron = CronSchedule.parse("0 3 * * *")
    after = cron.next_after(datetime(2026, 7, 1, 0, 0, tzinfo=UTC))
    assert after == datetime(2026, 7, 1, 1, 0, tzinfo=UTC)  # 03:00 CEST


def test_six_fields_put_seconds_first():
    cron = CronSchedule.parse("*/2 * * * * *")
    start = datetime(2026, 12, 3, 12, 0, 0, 500_000, tzinfo=UTC)
    assert cron.next_after(start) == datetime(2026, 12, 3, 12, 0, 2, tzinfo=UTC)
    assert cron.latest_at_or_before(start) == datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
    assert cron.period(start) == timedelta(seconds=2)


def test_the_latest_slot_includes_the_moment_itself():
    cron = CronSchedule.parse("15 * * * *")
    on = datetime(2026, 12, 3, 12, 15, tzinfo=UTC)
    assert cron.latest_at_or_before(on) == on
    assert cron.latest_at_or_before(on - timedelta(microseconds=1)) == on - timedelta(hours=1)
    assert cron.next_after(on) == on + timedelta(hours=1)


def test_expressions_are_explained_in_words():
    assert CronSchedule.parse("0 3 * * *").description == "At 03:00 every day"
    assert CronSchedule.parse("0 8 * * 1").description == "At 08:00 on Monday"


# -- registration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"schedule": "61 * * * *"}, "'61 * * * *' is not a cron expression"),
        ({"schedule": "* * *"}, "'* * *' has 3 fields"),
        ({"schedule": "0 3 * * *", "poll_interval": 5}, "a schedule ('0 3 * * *') or a poll"),
        ({"schedule_catch_up": "01:00:00"}, "schedule_catch_up '01:00:00' needs a schedule"),
        ({"schedule": ["0 3 * * *"]}, "must be a cron expression string"),
        ({"schedule": "0 " * 150}, "longer than 200 characters"),
    ],
)
def test_a_bad_schedule_is_refused_naming_the_handler_and_the_expression(options, expected):
    with pytest.raises(ImproperlyConfigured, match="Handler 'nightly'") as caught:
        HandlerRegistry().add_handler(JobHandler, name="nightly", **options)
    assert expected in str(caught.value)


def test_a_schedule_is_normalised_and_its_catch_up_defaults_to_one_period():
    registry = HandlerRegistry().add_handler(JobHandler, name="nightly", schedule=" 0  3 * * * ")
    registration = registry.get("nightly")
    assert registration.schedule == "0 3 * * *"
    assert registration.catch_up(datetime(2026, 12, 3, 3, tzinfo=UTC)) == timedelta(days=1)


# -- taking slots on the database ------------------------------------------------------------


def _scheduled(schedule: str, **options: Any) -> HandlerRegistry:
    registry = HandlerRegistry().add_handler(
        ScheduledHandler, name="scheduled", schedule=schedule, **options
    )
    sync_handlers(registry)
    return registry


def _keeper(registry: HandlerRegistry, worker: Worker) -> SlotKeeper:
    return SlotKeeper(registry, worker_id=worker.pk, lease_timeout=timedelta(seconds=10))


@pytest.mark.django_db
def test_the_first_read_sets_the_next_slot_and_runs_nothing():
    registry = _scheduled("0 3 * * *")
    keeper = _keeper(registry, WorkerFactory())
    taken, until = keeper.take()
    assert taken == []
    row = Handler.objects.get(name="scheduled")
    assert row.schedule == "0 3 * * *"
    assert row.next_slot_at == CronSchedule("0 3 * * *").next_after(timezone.now())
    assert until is not None and 0 < until <= 86_400


@pytest.mark.django_db
def test_of_two_workers_reading_a_due_slot_one_takes_it():
    registry = _scheduled("* * * * *")
    Handler.objects.update(next_slot_at=timezone.now() - timedelta(seconds=1))
    first, second = WorkerFactory(), WorkerFactory()
    keepers = [_keeper(registry, first), _keeper(registry, second)]
    # Both read the row before either writes: only the conditional UPDATE decides.
    taken = [keeper.take()[0] for keeper in keepers]
    assert sorted(len(t) for t in taken) == [0, 1]
    row = Handler.objects.get(name="scheduled")
    winner = first if taken[0] else second
    assert row.slot_taken_by_id == winner.pk
    assert row.next_slot_at > timezone.now()
    assert [keeper.take()[0] for keeper in keepers] == [[], []]  # the slot is gone


@pytest.mark.django_db
def test_a_missed_slot_runs_once_within_its_catch_up_and_not_once_per_missed_slot():
    # Slots on 29 February only: the latest one (2024) is years old, the next in 2028.
    registry = _scheduled("0 0 29 2 *")  # catch-up: one period (four years)
    Handler.objects.update(next_slot_at=datetime(2024, 2, 29, tzinfo=UTC) - timedelta(days=366))
    keeper = _keeper(registry, WorkerFactory())
    [slot] = keeper.take()[0]
    assert slot.at == CronSchedule("0 0 29 2 *").latest_at_or_before(timezone.now())
    assert keeper.take()[0] == []
    assert Handler.objects.get().next_slot_at.astimezone(UTC).year == 2028


@pytest.mark.django_db
def test_a_missed_slot_older_than_its_catch_up_is_skipped():
    registry = _scheduled("0 0 29 2 *", schedule_catch_up="1 00:00:00")
    Handler.objects.update(next_slot_at=datetime(2024, 2, 29, tzinfo=UTC))
    keeper = _keeper(registry, WorkerFactory())
    assert keeper.take()[0] == []
    row = Handler.objects.get()
    assert row.next_slot_at.astimezone(UTC).year == 2028 and row.slot_taken_by is None


@pytest.mark.django_db
def test_the_slot_of_a_worker_that_died_before_its_activation_ended_runs_again_once():
    registry = _scheduled("* * * * *")
    Handler.objects.update(next_slot_at=timezone.now() - timedelta(seconds=1))
    dead, alive = WorkerFactory(), WorkerFactory()
    [slot] = _keeper(registry, dead).take()[0]
    survivor = _keeper(registry, alive)
    assert survivor.take()[0] == []  # its worker still heartbeats
    Worker.objects.filter(pk=dead.pk).update(stopped_at=timezone.now())
    [again] = survivor.take()[0]
    assert (again.at, again.taken_over) == (slot.at, True)
    assert survivor.take()[0] == []
    survivor.ended("scheduled", ran=True)
    survivor.flush()
    assert Handler.objects.get().slot_taken_by is None


@pytest.mark.django_db
def test_a_slot_that_ended_is_not_run_again_and_one_that_could_not_run_is_retried():
    registry = _scheduled("* * * * *")
    Handler.objects.update(next_slot_at=timezone.now() - timedelta(seconds=1))
    worker = WorkerFactory()
    keeper = _keeper(registry, worker)
    [slot] = keeper.take()[0]
    keeper.ended("scheduled", ran=False)  # e.g. another process held the lease
    assert keeper.take()[0] == [slot]
    keeper.ended("scheduled", ran=True)
    assert keeper.take()[0] == []
    Worker.objects.filter(pk=worker.pk).update(stopped_at=timezone.now())
    assert _keeper(registry, WorkerFactory()).take()[0] == []  # nothing left to take over


@pytest.mark.django_db
def test_a_changed_schedule_starts_its_slots_afresh():
    _scheduled("* * * * *")
    Handler.objects.update(next_slot_at=timezone.now() - timedelta(seconds=1))
    _scheduled("0 3 * * *")
    row = Handler.objects.get()
    assert (row.schedule, row.next_slot_at) == ("0 3 * * *", None)


# -- real workers ----------------------------------------------------------------------------


def _runs_by_slot(period: float) -> dict[int, int]:
    counts: dict[int, int] = {}
    for at in ProcessLog.objects.filter(task_id=0).values_list("at", flat=True):
        slot = int(at.timestamp() // period)
        counts[slot] = counts.get(slot, 0) + 1
    return counts


@pytest.mark.django_db(transaction=True)
def test_three_workers_run_a_two_second_schedule_once_per_slot(start_worker):
    env = {"WORKITEMS_TEST_SCHEDULE": "*/2 * * * * *"}
    workers = [start_worker("--handler", "scheduled", **env) for _ in range(3)]
    wait_for(lambda: all("started" in w.output() for w in workers), timeout=60, message="3 workers")
    wait_for(lambda: ProcessLog.objects.exists(), timeout=30, message="a first slot")
    start = time.time()
    wait_for(lambda: time.time() >= start + 11.5, timeout=30, message="11 seconds")
    for worker in workers:
        worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        assert worker.wait() == 0, worker.output()
    window = ProcessLog.objects.filter(
        task_id=0,
        at__gte=datetime.fromtimestamp(start, UTC),
        at__lt=datetime.fromtimestamp(start + 11, UTC),
    )
    assert 5 <= window.count() <= 6
    counts = _runs_by_slot(2.0)
    assert set(counts.values()) == {1}, counts  # never two for one slot
    assert HandlerRun.objects.filter(handler__name="scheduled").count() == sum(counts.values())


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_right_after_taking_a_slot_leaves_it_to_the_next_live_worker(
    start_worker,
):
    # A yearly slot, due now (missed, within its catch-up): one run owed, and no other slot
    # comes due while the test runs.
    env = {
        "WORKITEMS_TEST_SCHEDULE": "0 0 1 1 *",
        "WORKITEMS_TEST_SCHEDULE_CATCH_UP": "400 00:00:00",
        "WORKITEMS_TEST_SCHEDULE_SECONDS": "60",
        "WORKITEMS_LEASE_TIMEOUT": "00:00:02",
    }
    registry = HandlerRegistry().add_handler(
        ScheduledHandler, name="scheduled", schedule="0 0 1 1 *"
    )
    sync_handlers(registry)
    Handler.objects.update(next_slot_at=timezone.now() - timedelta(seconds=1))

    first = start_worker("--handler", "scheduled", **env)
    wait_for(lambda: ProcessLog.objects.count() == 1, timeout=60, message="the slot to start")
    first.proc.kill()  # SIGKILL: no chance to say anything
    first.wait()
    assert Handler.objects.get(name="scheduled").slot_taken_by_id is not None

    env["WORKITEMS_TEST_SCHEDULE_SECONDS"] = "0"
    second = start_worker("--handler", "scheduled", **env)
    wait_for(
        lambda: HandlerRun.objects.filter(status=RunStatus.SUCCEEDED).exists(),
        timeout=60,
        message="the slot to run again on the live worker",
    )
    wait_for(
        lambda: Handler.objects.get(name="scheduled").slot_taken_by_id is None,
        timeout=30,
        message="the slot to be recorded as ended",
    )
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == 0, second.output()
    pids = list(ProcessLog.objects.order_by("pk").values_list("pid", flat=True))
    assert pids == [first.proc.pid, second.proc.pid]
    assert "which died before its activation ended" in second.output()
    assert os.getpid() not in pids


@pytest.mark.django_db(transaction=True)
def test_list_shows_the_schedule_in_words_and_the_next_slot_with_its_zone(start_worker):
    worker = start_worker(
        "--list", "--handler", "scheduled", "--handler", "jobs", WORKITEMS_TEST_SCHEDULE="0 3 * * *"
    )
    assert worker.wait() == 0, worker.output()
    lines = {line.split()[0]: line for line in worker.output().splitlines()}
    slot = CronSchedule("0 3 * * *").next_after(timezone.now())
    zone = timezone.localtime(slot).strftime("%Z")
    assert "0 3 * * * (At 03:00 every day)" in lines["scheduled"]
    assert timezone.localtime(slot).strftime(f"%Y-%m-%d 03:00:00 {zone}") in lines["scheduled"]
    assert "every 0:" in lines["jobs"] and "when a worker starts" in lines["jobs"]
