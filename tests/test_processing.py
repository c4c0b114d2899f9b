"""One cycle: parallel fetches, the fair channel, the pool, recording (real threads)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

import django_workitems as workitems
from django_workitems import recording
from django_workitems.activation import Activation, ItemOutcome, RunSnapshot, Step
from django_workitems.background import run_once
from django_workitems.handlers import CancellationToken
from django_workitems.leases import LeaseKeeper
from django_workitems.models import Handler, HandlerRun, ItemFailure, RunStatus
from django_workitems.registry import HandlerRegistry
from tests.conftest import ListHandler, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_run_once_processes_items_and_records_the_run(registry, list_handler, recorder):
    registry.add_handler(list_handler("alpha", 7), name="alpha", max_items_per_cycle=10)

    result = run_once(registry=registry)

    assert (result["alpha"].fetched, result["alpha"].succeeded, result["alpha"].failed) == (7, 7, 0)
    assert sorted(recorder.of("alpha:done")) == sorted(f"alpha-{i}" for i in range(7))
    run = HandlerRun.objects.get(handler__name="alpha")
    assert run.status == RunStatus.SUCCEEDED
    assert (run.items_fetched, run.items_succeeded, run.items_failed) == (7, 7, 0)
    assert run.finished_at is not None and run.worker is not None
    assert result["alpha"].run_id == run.pk
    handler = Handler.objects.get(name="alpha")
    assert handler.is_registered and handler.max_items_per_cycle == 10
    assert handler.handler_class.endswith("ListHandler[alpha]")


def test_item_failures_are_recorded_with_tracebacks_and_spare_the_other_items(
    registry, list_handler, recorder, caplog
):
    registry.add_handler(
        list_handler("beta", 6, fail=lambda item: item["id"] in {"beta-1", "beta-4"}), name="beta"
    )

    with caplog.at_level(logging.ERROR, logger="django_workitems"):
        result = run_once(registry=registry)

    assert (result["beta"].succeeded, result["beta"].failed) == (4, 2)
    assert sorted(f.item_id for f in result["beta"].failures) == ["beta-1", "beta-4"]
    assert all(isinstance(f.exception, ValueError) for f in result["beta"].failures)
    run = HandlerRun.objects.get(handler__name="beta")
    assert run.status == RunStatus.PARTIAL
    assert (run.items_succeeded, run.items_failed) == (4, 2)
    failures = ItemFailure.objects.filter(run=run).order_by("item_id")
    assert [f.item_id for f in failures] == ["beta-1", "beta-4"]
    assert failures[0].error_type == "builtins.ValueError"
    assert failures[0].message == "item beta-1 is bad"
    assert "Traceback" in failures[0].traceback and "ValueError" in failures[0].traceback
    logged = [r for r in caplog.records if getattr(r, "work_item_id", None) == "beta-1"]
    assert logged and logged[0].handler == "beta" and logged[0].run_id == run.pk
    assert logged[0].exc_info is not None


class BrokenFetch(workitems.WorkItemHandler[Any]):
    def fetch_next(self, max_items, cancel):
        raise ConnectionError("source unreachable")

    def process(self, item, cancel):  # pragma: no cover - never reached
        raise AssertionError


def test_a_failing_fetch_is_recorded_and_does_not_affect_other_handlers(
    registry, list_handler, recorder
):
    registry.add_handler(BrokenFetch, name="broken").add_handler(list_handler("ok", 3), name="ok")

    result = run_once(registry=registry)

    assert result.failed_fetches == ["broken"] and not result.ok
    assert result["ok"].succeeded == 3
    run = HandlerRun.objects.get(handler__name="broken")
    assert run.status == RunStatus.FAILED
    assert "ConnectionError: source unreachable" in run.error
    assert HandlerRun.objects.get(handler__name="ok").status == RunStatus.SUCCEEDED


class CloseRaises(ListHandler):
    def close(self) -> None:
        super().close()
        raise RuntimeError("cannot close")


def test_close_errors_are_recorded_and_close_runs_once_per_activation(registry, recorder):
    source = [{"id": i} for i in range(4)]
    registry.add_handler(lambda: CloseRaises(source, recorder, "c"), name="closing")

    result = run_once(registry=registry)

    assert result["closing"].succeeded == 4
    assert recorder.count("c:close") == 1
    assert recorder.of("c:close") == recorder.of("c:instance")
    run = HandlerRun.objects.get(handler__name="closing")
    assert "close() raised" in run.error and "cannot close" in run.error
    assert run.items_succeeded == 4


def test_each_activation_gets_a_fresh_handler_instance(
    registry, list_handler, recorder, run_in_background
):
    registry.add_handler(list_handler("fresh", 30), name="fresh", max_items_per_cycle=10)

    run_in_background(registry=registry)
    wait_for(lambda: recorder.count("fresh:done") == 30, message="30 items done")
    wait_for(lambda: recorder.count("fresh:close") >= 3, message="three activations closed")

    # An activation may fetch several times (its share of the channel, a slow start), but
    # never more than its allowance, and each instance is closed once, after its last fetch.
    fetched_by = recorder.of("fresh:fetched-by")
    instances = set(fetched_by)
    assert len(instances) >= 3
    for serial, (_asked, got) in zip(fetched_by, recorder.of("fresh:fetch"), strict=True):
        assert serial in instances and got <= 10
    per_instance = dict.fromkeys(instances, 0)
    for serial, (_asked, got) in zip(fetched_by, recorder.of("fresh:fetch"), strict=True):
        per_instance[serial] += got
    assert max(per_instance.values()) <= 10, per_instance
    wait_for(lambda: sorted(recorder.of("fresh:close")) == sorted(instances), message="closes")


class AsyncHandler(workitems.WorkItemHandler[int]):
    seen: list[tuple[int, str]] = []

    async def fetch_next(self, max_items, cancel):
        await asyncio.sleep(0)
        return list(range(min(max_items, 3)))

    async def process(self, item, cancel):
        await asyncio.sleep(0)
        handler = await Handler.objects.aget(name="async")  # the async ORM works in pool threads
        AsyncHandler.seen.append((item, handler.name))


def test_async_fetch_and_process_run_to_completion(registry):
    AsyncHandler.seen = []
    registry.add_handler(AsyncHandler, name="async")

    result = run_once(registry=registry)

    assert result["async"].succeeded == 3 and result["async"].failed == 0
    assert sorted(AsyncHandler.seen) == [(0, "async"), (1, "async"), (2, "async")]


def test_a_slow_fetch_does_not_hold_back_other_handlers(
    registry, list_handler, recorder, run_in_background
):
    release = threading.Event()

    class SlowFetch(workitems.WorkItemHandler[int]):
        def fetch_next(self, max_items, cancel):
            recorder.add("slow:fetch")
            release.wait(30)
            return []

        def process(self, item, cancel):  # pragma: no cover
            raise AssertionError

    registry.add_handler(SlowFetch, name="slow").add_handler(list_handler("quick", 5), name="quick")
    try:
        run_in_background(registry=registry)
        wait_for(lambda: recorder.count("quick:done") == 5, message="quick's items")
        assert recorder.count("slow:fetch") == 1
        assert not release.is_set()
    finally:
        release.set()


@override_settings(WORKITEMS={"WORKERS": 4, "QUEUE_SIZE": 250})
def test_fair_interleaving_a_small_handler_is_not_starved(registry, list_handler, recorder):
    registry.add_handler(list_handler("small", 8, delay=0.01), name="small", max_items_per_cycle=8)
    registry.add_handler(
        list_handler("flood", 200, delay=0.01), name="flood", max_items_per_cycle=200
    )

    run_once(registry=registry)

    order = [kind for kind, _ in recorder.events if kind in ("small:done", "flood:done")]
    assert order.count("small:done") == 8 and order.count("flood:done") == 200
    last_small = max(i for i, kind in enumerate(order) if kind == "small:done")
    flood_before = order[:last_small].count("flood:done")
    assert flood_before < 0.3 * 200, (
        f"{flood_before} flood items finished before the last small one"
    )


@override_settings(WORKITEMS={"WORKERS": 2, "QUEUE_SIZE": 10, "POLL_INTERVAL": 3600})
def test_items_in_flight_stay_bounded_whatever_max_items_per_cycle(
    registry, recorder, run_in_background
):
    source = [{"id": i} for i in range(120)]
    in_flight: list[int] = []

    class Counting(ListHandler):
        def process(self, item, cancel):
            with recorder.lock:
                fetched = sum(
                    got for _, got in (v for k, v in recorder.events if k == "count:fetch")
                )
                finished = sum(1 for k, _ in recorder.events if k == "count:done")
                in_flight.append(fetched - finished)
            super().process(item, cancel)

    registry.add_handler(
        lambda: Counting(source, recorder, "count"), name="count", max_items_per_cycle=1000
    )
    run_in_background(registry=registry)
    wait_for(lambda: recorder.count("count:done") == 120, message="120 items")

    asked = [asked for asked, _ in recorder.of("count:fetch")]
    assert max(asked) <= 10, f"fetch_next was asked for {max(asked)} items with QUEUE_SIZE 10"
    assert max(in_flight) <= 10 + 2


def test_a_full_batch_drains_without_waiting_for_the_poll_interval(registry, run_in_background):
    from tests.testapp.handlers import JobHandler
    from tests.testapp.models import Job

    Job.objects.bulk_create([Job() for _ in range(25)])
    registry.add_handler(JobHandler, name="jobs", max_items_per_cycle=10, poll_interval="01:00:00")

    run_in_background(registry=registry)
    wait_for(
        lambda: not Job.objects.filter(status="queued").exists(), message="the backlog to drain"
    )

    # JobHandler does not claim: a fetch while items are pending would process them twice.
    assert set(Job.objects.values_list("times_processed", flat=True)) == {1}
    wait_for(
        lambda: HandlerRun.objects.filter(status=RunStatus.SUCCEEDED).count() == 3, message="3 runs"
    )
    assert sorted(HandlerRun.objects.values_list("items_fetched", flat=True)) == [5, 10, 10]


@override_settings(WORKITEMS={"WORKERS": 4, "QUEUE_SIZE": 40, "POLL_INTERVAL": 3600})
def test_a_non_exclusive_handler_is_fetched_again_while_its_items_are_in_process(
    registry, list_handler, recorder, run_in_background
):
    factory = list_handler("claims", 300, delay=0.002)
    overlaps = []

    class Watching(ListHandler):
        def fetch_next(self, max_items, cancel):
            with recorder.lock:
                fetched = sum(
                    got for _, got in (v for k, v in recorder.events if k == "claims:fetch")
                )
                done = sum(1 for k, _ in recorder.events if k == "claims:done")
            overlaps.append(fetched - done)
            return super().fetch_next(max_items, cancel)

    registry.add_handler(
        lambda: Watching(factory.source, recorder, "claims", delay=0.002),
        name="claims",
        max_items_per_cycle=20,
        exclusive=False,
    )
    run_in_background(registry=registry)
    wait_for(lambda: recorder.count("claims:done") == 300, message="300 items")

    done = recorder.of("claims:done")
    assert len(set(done)) == 300
    assert any(pending > 0 for pending in overlaps[1:]), "never fetched while items were pending"


def test_per_handler_poll_interval_is_honoured(registry, list_handler, recorder, run_in_background):
    registry.add_handler(list_handler("often", 0), name="often", poll_interval=0.1)
    registry.add_handler(list_handler("rarely", 0), name="rarely", poll_interval="01:00:00")

    run_in_background(registry=registry)
    wait_for(lambda: recorder.count("often:fetch") >= 4, message="four fetches of 'often'")

    assert recorder.count("rarely:fetch") == 1


@override_settings(WORKITEMS={"WORKERS": 8})
def test_max_concurrency_caps_items_in_process(registry, recorder):
    current = {"n": 0, "max": 0}
    gate = threading.Lock()

    class Capped(ListHandler):
        def process(self, item, cancel):
            with gate:
                current["n"] += 1
                current["max"] = max(current["max"], current["n"])
            try:
                cancel.wait(0.02)
            finally:
                with gate:
                    current["n"] -= 1

    source = [{"id": i} for i in range(20)]
    registry.add_handler(
        lambda: Capped(source, recorder, "capped"),
        name="capped",
        max_concurrency=2,
        max_items_per_cycle=20,
    )

    result = run_once(registry=registry)

    assert result["capped"].succeeded == 20
    assert current["max"] == 2


def test_disabled_handlers_are_skipped(registry, list_handler, recorder):
    registry.add_handler(list_handler("off", 3), name="off").add_handler(
        list_handler("on", 3), name="on"
    )
    recording.sync_handlers(registry)
    Handler.objects.filter(name="off").update(is_enabled=False)

    result = run_once(registry=registry)

    assert result["off"].skipped == "disabled" and recorder.count("off:fetch") == 0
    assert result["on"].succeeded == 3


def test_disabled_handler_is_skipped_by_a_running_worker(
    registry, list_handler, recorder, run_in_background
):
    registry.add_handler(list_handler("paused", 3), name="paused")
    registry.add_handler(list_handler("active", 0), name="active", poll_interval=0.1)
    recording.sync_handlers(registry)
    Handler.objects.filter(name="paused").update(is_enabled=False)

    run_in_background(registry=registry)
    wait_for(lambda: recorder.count("active:fetch") >= 3, message="the enabled handler to poll")

    assert recorder.count("paused:fetch") == 0


def test_notify_activates_a_handler_at_once_despite_a_long_poll_interval(
    registry, list_handler, recorder, run_in_background
):
    registry.add_handler(list_handler("wake", 0), name="wake", poll_interval="01:00:00")
    run_in_background(registry=registry)
    wait_for(lambda: recorder.count("wake:fetch") == 1, message="the first fetch")

    from django_workitems.background import notify

    notify("wake", registry=registry)
    wait_for(lambda: recorder.count("wake:fetch") == 2, timeout=10, message="a fetch after notify")


def test_notify_of_an_unknown_handler_is_an_error(registry):
    with pytest.raises(workitems.UnknownHandlerError, match="nope"):
        workitems.notify("nope")


def test_counts_are_written_per_batch_not_per_item(registry, list_handler, monkeypatch):
    calls = []
    original = recording.write_run

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(recording, "write_run", spy)
    registry.add_handler(
        list_handler("batch", 50, fail=lambda item: item["id"].endswith("7")),
        name="batch",
        max_items_per_cycle=50,
    )

    result = run_once(registry=registry)

    assert result["batch"].succeeded == 45 and result["batch"].failed == 5
    assert len(calls) <= 3, f"{len(calls)} writes for 50 items"
    run = HandlerRun.objects.get(handler__name="batch")
    assert (run.items_succeeded, run.items_failed) == (45, 5)
    assert ItemFailure.objects.filter(run=run).count() == 5


def test_an_exclusive_handler_leased_elsewhere_is_skipped(registry, list_handler, recorder):
    from datetime import timedelta

    registry.add_handler(list_handler("leased", 3), name="leased")
    rows = recording.sync_handlers(registry)
    other = LeaseKeeper(owner="worker:other", ttl=timedelta(minutes=1))
    assert other.acquire(rows["leased"].pk) is not None

    result = run_once(registry=registry)

    assert "lease" in result["leased"].skipped and recorder.count("leased:fetch") == 0
    # An expired lease is taken over.
    Handler.objects.filter(name="leased").update(lease_expires_at="2000-01-01T00:00:00Z")
    result = run_once(registry=registry)
    assert result["leased"].succeeded == 3
    assert Handler.objects.get(name="leased").lease_owner == ""  # released at the end


def test_stop_releases_unstarted_items_and_records_the_run_cancelled(registry, recorder):
    started = threading.Event()
    released: list[Any] = []

    class Blocking(ListHandler):
        def process(self, item, cancel):
            started.set()
            cancel.wait(30)
            recorder.add("blocking:done", item["id"])

        def release(self, items):
            released.extend(item["id"] for item in items)

    source = [{"id": i} for i in range(10)]
    # Non-exclusive: it claims its next item while the first is in process (no more: with
    # one thread and no item duration known, one waiting item is what the pool can start).
    registry.add_handler(
        lambda: Blocking(source, recorder, "blocking"), name="blocking", exclusive=False
    )

    from django_workitems.background import BackgroundProcessingService

    service = BackgroundProcessingService(registry=registry, workers=1)
    thread = threading.Thread(target=service.run)
    thread.start()
    assert started.wait(20)
    wait_for(lambda: recorder.count("blocking:fetch") >= 2, message="the next item claimed")
    service.stop()
    thread.join(30)

    fetched = sum(got for _asked, got in recorder.of("blocking:fetch"))
    assert fetched == 2, "claimed more than its one thread would start within a second"
    assert recorder.of("blocking:done") == [0]  # the item in process finished
    assert sorted(released) == [1]  # the one never started was given back untouched
    run = HandlerRun.objects.get(handler__name="blocking")
    assert run.status == RunStatus.CANCELLED
    assert (run.items_fetched, run.items_succeeded, run.items_failed) == (2, 1, 0)
    assert service.worker is not None
    service.worker.refresh_from_db()
    assert service.worker.stopped_at is not None


@override_settings(WORKITEMS={"POLL_INTERVAL": 0.1})
def test_a_database_error_recording_the_run_holds_back_no_item_and_the_run_is_written_later(
    registry, recorder, run_in_background, monkeypatch
):
    from django.db import OperationalError

    source = [{"id": i} for i in range(5)]
    released: list[Any] = []

    class Releasing(ListHandler):
        def release(self, items):
            released.extend(item["id"] for item in items)
            with recorder.lock:
                source[:0] = items  # back in the source, as an un-claim would do

    original = recording.create_run
    failures = iter([True])

    def flaky_create_run(*args, **kwargs):
        if next(failures, False):
            raise OperationalError("server closed the connection unexpectedly")
        return original(*args, **kwargs)

    monkeypatch.setattr(recording, "create_run", flaky_create_run)
    registry.add_handler(lambda: Releasing(source, recorder, "flaky"), name="flaky")

    run_in_background(registry=registry)
    wait_for(lambda: recorder.count("flaky:done") == 5, message="the items after the error")

    assert released == []  # processed at once, not given back
    assert sorted(recorder.of("flaky:done")) == [0, 1, 2, 3, 4]  # each exactly once
    wait_for(
        lambda: HandlerRun.objects.filter(
            handler__name="flaky", status=RunStatus.SUCCEEDED, items_succeeded=5
        ).exists(),
        message="the run recorded",
    )


def test_run_once_selects_by_name_and_purpose(registry, list_handler, recorder):
    registry.add_handler(list_handler("in", 2), name="in", purpose=workitems.Purpose.INGESTION)
    registry.add_handler(list_handler("out", 2), name="out", purpose=workitems.Purpose.EXPORT)
    registry.add_handler(list_handler("other", 2), name="other", purpose=workitems.Purpose.EXPORT)

    assert list(run_once(registry=registry, purpose="export").handlers) == ["other", "out"]
    assert list(run_once(registry=registry, handlers=["in"]).handlers) == ["in"]
    assert recorder.count("in:done") == recorder.count("out:done") == 2
    with pytest.raises(workitems.UnknownHandlerError, match="registered handlers: in, other, out"):
        run_once(registry=registry, handlers=["missing"])


def test_a_handlers_own_log_lines_carry_the_handler_run_and_item(registry, caplog):
    from django_workitems.log import ContextFilter

    class Chatty(workitems.WorkItemHandler[dict]):
        def fetch_next(self, max_items, cancel):
            logging.getLogger("tests.chatty").info("fetching")
            return [{"id": "a"}, {"id": "b"}]

        def process(self, item, cancel):
            logging.getLogger("tests.chatty").info("doing %s", item["id"])

    registry.add_handler(Chatty, name="chatty")
    caplog.handler.addFilter(ContextFilter())
    with caplog.at_level(logging.INFO, logger="tests.chatty"):
        result = run_once(registry=registry)

    lines = {r.getMessage(): r for r in caplog.records if r.name == "tests.chatty"}
    assert lines["fetching"].handler == "chatty" and lines["fetching"].run_id is None
    for item in ("a", "b"):
        record = lines[f"doing {item}"]
        assert (record.handler, record.run_id, record.work_item_id) == (
            "chatty",
            result["chatty"].run_id,
            item,
        )


@pytest.mark.django_db
def test_a_run_reserved_ahead_is_inserted_once_however_often_it_is_written():
    from tests.factories import WorkerFactory

    handler = Handler.objects.create(name="reserved")
    worker = WorkerFactory()
    ids = recording.reserve_run_ids(3)
    if connection.vendor != "postgresql":
        assert ids == []  # elsewhere a run's id comes with its row
        return
    assert len(set(ids)) == 3
    started = timezone.now()
    for _ in range(2):  # a retry after a lost reply writes it again
        assert (
            recording.create_run(
                handler.pk, worker_id=worker.pk, started_at=started, items_fetched=2, run_id=ids[1]
            )
            == ids[1]
        )
    run = HandlerRun.objects.get(handler=handler)
    assert (run.pk, run.items_fetched, run.status) == (ids[1], 2, "running")
    later = recording.create_run(
        handler.pk, worker_id=worker.pk, started_at=timezone.now(), items_fetched=1
    )
    assert later not in ids  # runs inserted without a reserved id take the sequence's next


def _snapshot(succeeded: int, failed: int, status: RunStatus, error: str = "") -> RunSnapshot:
    return RunSnapshot(
        fetched=succeeded + failed,
        succeeded=succeeded,
        failed=failed,
        failures=(),
        status=status,
        error=error,
    )


@pytest.mark.django_db
def test_a_run_ended_in_one_statement_counts_in_the_totals_exactly_once():
    if not recording.RunStatements.usable():
        pytest.skip("PostgreSQL only: elsewhere a run ends through write_run")
    from tests.factories import WorkerFactory

    handler = Handler.objects.create(name="one-statement")
    worker = WorkerFactory()
    statements = recording.RunStatements()
    short, long = recording.reserve_run_ids(2)
    started = timezone.now()
    ended = _snapshot(3, 1, RunStatus.PARTIAL, error="one item failed")
    for attempt in range(2):  # a retry after a lost reply: the row exists, nothing is added
        inserted = statements.insert(
            short, handler.pk, worker_id=worker.pk, started_at=started, snapshot=ended
        )
        assert inserted is (attempt == 0)
    run = HandlerRun.objects.get(pk=short)
    assert (run.status, run.items_fetched, run.items_succeeded, run.items_failed) == (
        RunStatus.PARTIAL,
        4,
        3,
        1,
    )
    assert run.error == "one item failed" and run.finished_at is not None
    assert run.worker_id == worker.pk and run.started_at == started

    recording.create_run(
        handler.pk, worker_id=worker.pk, started_at=started, items_fetched=5, run_id=long
    )
    done = _snapshot(5, 0, RunStatus.SUCCEEDED)
    assert statements.finish(long, done)
    assert not statements.finish(long, done)  # ended already: the totals are not added again
    assert HandlerRun.objects.get(pk=long).status == RunStatus.SUCCEEDED

    handler.refresh_from_db()
    assert (handler.total_runs, handler.total_items_succeeded, handler.total_items_failed) == (
        2,
        8,
        1,
    )


@pytest.mark.django_db(transaction=True)  # the recorder's thread must see the rows
def test_the_recorder_gives_an_abandoned_run_its_counts_but_keeps_its_status():
    from tests.factories import HandlerRunFactory, WorkerFactory

    worker = WorkerFactory()
    run = HandlerRunFactory(
        worker=worker, status=RunStatus.ABANDONED, items_fetched=4, items_succeeded=0
    )

    class Late(workitems.WorkItemHandler[int]):
        def fetch_next(self, max_items, cancel):
            return []

        def process(self, item, cancel):
            pass

    registration = HandlerRegistry().add_handler(Late, name=run.handler.name).get(run.handler.name)
    activation = Activation(registration, handler_id=run.handler_id, token=CancellationToken())
    activation.begin_fetch(4)
    activation.fetch_returned(4)
    activation.run_id = run.pk
    for _ in range(4):
        activation.item_ended(ItemOutcome.SUCCEEDED)
    assert activation.stop_fetching() is Step.FINISH
    activation.conclude()
    recorder = recording.RunRecorder(worker_id=worker.pk)
    recorder.track(activation, run.pk)
    recorder.ended(activation)
    recorder.start()
    try:
        assert recorder.wait_idle(20)
    finally:
        recorder.stop(5)
    run.refresh_from_db()
    assert (run.status, run.items_succeeded) == (RunStatus.ABANDONED, 4)
    handler = Handler.objects.get(pk=run.handler_id)
    assert handler.total_runs == 0, "an abandoned run is not counted again by its late worker"


def test_rows_taken_back_from_a_dead_worker_take_the_place_of_rows_queued_here():
    """A busy worker that takes back a dead worker's rows gives back as many of its own rows
    still queued (the newest), so those that waited longest go first and it hoards no more."""
    from django_workitems.processing import WorkItemProcessingService

    released: list[str] = []

    class Busy(workitems.WorkItemHandler[str]):
        def fetch_next(self, max_items, cancel):
            return []

        def process(self, item, cancel):
            pass

        def urgent(self, item):
            return item.startswith("dead")

        def release(self, items):
            released.extend(items)

    registration = HandlerRegistry().add_handler(Busy, name="busy", exclusive=False).get("busy")
    service = WorkItemProcessingService(workers=1, queue_size=10)
    earlier = service.activate(registration, handler_id=1)
    now = service.activate(registration, handler_id=1)
    assert earlier is not None and now is not None
    batches = ((earlier, ["own1", "own2"]), (now, ["dead0", "own3"]), (now, ["dead1", "own4"]))
    for activation, items in batches:
        activation.handler = Busy()
        activation.begin_fetch(len(items))
        activation.fetch_returned(len(items))
        granted = service.channel.reserve("busy", len(items))
        urgent = sum(item.startswith("dead") for item in items)
        service.channel.put("busy", [(activation, i) for i in items], granted, urgent=urgent)

    # The last fetch took back dead1 (queued first) and claimed own4 beside it.
    service._make_way(now, 1, batch=["dead1", "own4"])

    assert released == ["own3"]  # the newest own row queued before; never a dead one, nor own4
    assert now.result().released == 1 and earlier.result().released == 0
    service._make_way(now, 2, batch=[])
    assert released == ["own3", "own4", "own2"]
    assert earlier.result().released == 1 and now.result().released == 2
    queued = [item for _key, (_a, item) in service.channel.drain()]
    assert queued == ["dead1", "dead0", "own1"]
