"""WorkItemModel claims and QuerySetHandler outcomes, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import django_workitems as workitems
from django_workitems import models
from django_workitems.background import run_once
from django_workitems.handlers import current_worker_id
from django_workitems.models import Handler, WorkItemQuerySet
from django_workitems.testing import run_handler
from tests.conftest import wait_for
from tests.factories import WorkerFactory
from tests.testapp.handlers import TaskHandler
from tests.testapp.models import ProcessLog, Task

LEASE = timedelta(seconds=10)


@pytest.mark.django_db
def test_claim_takes_available_rows_once_with_a_fresh_token():
    worker = WorkerFactory()
    Task.objects.bulk_create([Task() for _ in range(10)])
    Task.objects.create(available_at=timezone.now() + timedelta(hours=1))  # not yet

    first = Task.objects.claim(6, worker_id=worker.pk)
    second = Task.objects.claim(6, worker_id=worker.pk)
    third = Task.objects.claim(6, worker_id=worker.pk)

    assert len(first) == 6 and len(second) == 4 and third == []
    assert not {t.pk for t in first} & {t.pk for t in second}
    assert {t.status for t in first} == {"processing"} and {t.attempts for t in first} == {1}
    assert {t.claimed_by_id for t in first} == {worker.pk}
    assert len({t.claim_token for t in first}) == 1
    assert first[0].claim_token != second[0].claim_token


@pytest.mark.django_db
def test_claiming_costs_a_constant_number_of_queries():
    Task.objects.bulk_create([Task() for _ in range(120)])
    with CaptureQueriesContext(connection) as small:
        assert len(Task.objects.claim(5, worker_id=None)) == 5
    with CaptureQueriesContext(connection) as large:
        assert len(Task.objects.claim(100, worker_id=None)) == 100
    assert len(small) == len(large) <= 6


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_never_hand_a_row_to_two_claimers():
    Task.objects.bulk_create([Task() for _ in range(300)])
    claimed: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def claimer(index: int) -> None:
        try:
            start.wait()
            while rows := Task.objects.claim(7, worker_id=None):
                claimed[index].extend(row.pk for row in rows)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not errors
    everything = [pk for part in claimed for pk in part]
    assert len(everything) == len(set(everything)) == 300


@pytest.mark.django_db
def test_failures_are_retried_with_back_off_then_failed_after_max_attempts():
    task = Task.objects.create(action="fail")
    for attempt in (1, 2):
        result = run_handler(TaskHandler)
        assert result.failed == 1
        task.refresh_from_db()
        assert (task.status, task.attempts) == ("queued", attempt)
        assert f"task {task.pk} is set to fail" in task.last_error
        assert task.available_at > timezone.now() - timedelta(seconds=1)
        assert task.claim_token is None
        # Back-off: not claimable again before available_at.
        assert run_handler(TaskHandler).items == []
        Task.objects.filter(pk=task.pk).update(available_at=timezone.now())
    run_handler(TaskHandler)
    task.refresh_from_db()
    assert (task.status, task.attempts) == ("failed", 3)
    assert ProcessLog.objects.filter(task_id=task.pk).count() == 3


@pytest.mark.django_db
def test_back_off_doubles_with_each_attempt():
    class Slow(TaskHandler):
        retry_backoff = 100

    task = Task.objects.create(action="fail")
    delays = []
    for _ in range(2):
        before = timezone.now()
        run_handler(Slow)
        task.refresh_from_db()
        delays.append((task.available_at - before).total_seconds())
        Task.objects.filter(pk=task.pk).update(available_at=timezone.now())
    assert 99 <= delays[0] <= 102 and 199 <= delays[1] <= 202


@pytest.mark.django_db
def test_successes_are_marked_and_the_backlog_counts_queued_rows():
    Task.objects.bulk_create([Task() for _ in range(5)])
    handler = TaskHandler()
    assert handler.backlog() == 5
    assert handler.oldest_waiting() == Task.objects.order_by("created").first().created

    result = run_handler(TaskHandler, max_items=3)

    assert result.succeeded == 3
    assert Task.objects.filter(status="succeeded").count() == 3
    assert TaskHandler().backlog() == 2


@pytest.mark.django_db
def test_outcomes_are_fenced_by_the_claim_token():
    Task.objects.create()
    (task,) = Task.objects.claim(1, worker_id=None)
    # Another worker took the row back meanwhile (a new claim token).
    Task.objects.filter(pk=task.pk).update(claim_token=uuid.UUID(int=1))

    handler = TaskHandler()
    handler.process(task, workitems.CancellationToken())
    handler.close()
    with pytest.raises(ValueError):
        task.action = "fail"
        handler.process(task, workitems.CancellationToken())

    task.refresh_from_db()
    assert task.status == "processing" and str(task.claim_token).endswith("1")
    assert task.last_error == ""


@pytest.mark.django_db
def test_rows_of_a_dead_worker_are_taken_back_in_a_batch_and_count_as_an_attempt():
    dead = WorkerFactory(last_heartbeat_at=timezone.now() - timedelta(minutes=5))
    alive = WorkerFactory()
    Task.objects.bulk_create([Task() for _ in range(3)])
    orphans = Task.objects.claim(3, worker_id=dead.pk)
    Task.objects.create()  # queued: claimed after the rows taken back
    slow = Task.objects.create()
    Task.objects.filter(pk=slow.pk).update(
        status="processing", claimed_by=alive, claimed_at=timezone.now() - timedelta(hours=1)
    )

    token = current_worker_id.set(alive.pk)
    try:
        handler = TaskHandler()
        batch = handler.fetch_next(10, workitems.CancellationToken())
    finally:
        current_worker_id.reset(token)

    # Their first take-back: processed normally, beside the queued row, none alone.
    assert {t.pk for t in orphans} <= {t.pk for t in batch} and len(batch) == 4
    assert not any(handler.isolate(t) for t in batch)
    taken_back = [t for t in batch if t.pk in {o.pk for o in orphans}]
    assert {(t.attempts, t.claimed_by_id) for t in taken_back} == {(2, alive.pk)}
    # The slow item of a live worker is never taken from it.
    assert Task.objects.get(pk=slow.pk).claimed_by_id == alive.pk


@pytest.mark.django_db
def test_a_row_on_its_last_attempt_is_taken_back_alone_and_runs_alone():
    dead = WorkerFactory(stopped_at=timezone.now())
    alive = WorkerFactory()
    Task.objects.bulk_create([Task() for _ in range(3)])
    rows = Task.objects.claim(3, worker_id=dead.pk)
    # Its worker died with it before: one more death and it has no attempt left.
    Task.objects.filter(pk__in=[r.pk for r in rows[:2]]).update(attempts=2)

    token = current_worker_id.set(alive.pk)
    try:
        handler = TaskHandler()
        first = handler.fetch_next(10, workitems.CancellationToken())
        assert [t.pk for t in first] == [rows[2].pk] and not handler.isolate(first[0])
        [suspect] = handler.fetch_next(10, workitems.CancellationToken())
        assert handler.isolate(suspect) and suspect.attempts == 3
        assert handler.fetch_next(10, workitems.CancellationToken()) == []  # one suspect at once
        handler.process(suspect, workitems.CancellationToken())
        handler.close()
        assert Task.objects.get(pk=suspect.pk).status == "succeeded"
        [after] = handler.fetch_next(10, workitems.CancellationToken())  # the next suspect
        assert handler.isolate(after)
    finally:
        current_worker_id.reset(token)


@pytest.mark.django_db
def test_a_row_whose_worker_died_max_attempts_times_ends_failed():
    dead = WorkerFactory(stopped_at=timezone.now())
    task = Task.objects.create(
        status="processing", attempts=3, claimed_by=dead, claimed_at=timezone.now()
    )

    assert run_handler(TaskHandler).items == []

    task.refresh_from_db()
    assert task.status == "failed" and "died" in task.last_error


@pytest.mark.django_db
def test_release_puts_rows_back_without_counting_an_attempt():
    Task.objects.bulk_create([Task() for _ in range(3)])
    handler = TaskHandler()
    rows = handler.fetch_next(3, workitems.CancellationToken())
    handler.release(rows[1:])
    statuses = dict(Task.objects.values_list("pk", "status"))
    assert [statuses[r.pk] for r in rows] == ["processing", "queued", "queued"]
    assert list(
        Task.objects.filter(status="queued").values_list("attempts", "claim_token").distinct()
    ) == [(0, None)]


@pytest.mark.django_db(transaction=True)
def test_run_once_drives_a_queryset_handler(registry):
    Task.objects.bulk_create([Task(action="fail" if i % 10 == 0 else "ok") for i in range(40)])
    registry.add_handler(TaskHandler, name="tasks", max_items_per_cycle=40)
    assert registry.get("tasks").exclusive is False

    result = run_once(registry=registry)

    assert (result["tasks"].succeeded, result["tasks"].failed) == (36, 4)
    assert Task.objects.filter(status="succeeded").count() == 36
    assert Task.objects.filter(status="queued", attempts=1).count() == 4


@pytest.mark.django_db(transaction=True)
def test_a_suspect_runs_with_nothing_else_in_process(registry, recorder):
    lock = threading.Lock()
    state = {"busy": 0, "overlap": False, "suspect_done": False}

    class Watched(workitems.WorkItemHandler[int]):
        def fetch_next(self, max_items, cancel):
            return list(range(12))

        def isolate(self, item):
            return item == 5

        def process(self, item, cancel):
            with lock:
                state["busy"] += 1
                if item == 5 and state["busy"] > 1:
                    state["overlap"] = True
            try:
                cancel.wait(0.01)
                if item == 5:
                    with lock:
                        state["overlap"] |= state["busy"] > 1
                        state["suspect_done"] = True
            finally:
                with lock:
                    state["busy"] -= 1

    registry.add_handler(Watched, name="watched", max_items_per_cycle=12)
    result = run_once(registry=registry)
    assert result["watched"].succeeded == 12 and state["suspect_done"]
    assert not state["overlap"], "another item was in process beside the suspect"


@pytest.mark.django_db(transaction=True)
def test_a_model_with_notify_handler_wakes_its_handler_when_a_row_is_queued(
    registry, run_in_background, monkeypatch
):
    first = Task.objects.create()  # before the patch: processed by the worker's first fetch
    monkeypatch.setattr(Task, "notify_handler", "tasks")
    registry.add_handler(TaskHandler, name="tasks", poll_interval="01:00:00")
    run_in_background(registry=registry)
    wait_for(lambda: Task.objects.get(pk=first.pk).status == "succeeded", message="the first fetch")

    task = Task.objects.create()  # only a wake-up can get it processed within the hour

    wait_for(
        lambda: Task.objects.get(pk=task.pk).status == "succeeded", timeout=10, message="a wake-up"
    )
    assert Handler.objects.get(name="tasks").run_requested_at is not None


@pytest.mark.django_db
def test_run_handler_releases_rows_after_cancellation_as_the_worker_does():
    Task.objects.bulk_create([Task(seconds=30) for _ in range(3)])
    token = workitems.CancellationToken()
    token.cancel()  # cancelled before anything starts: the first row's handle raises Cancelled

    result = run_handler(TaskHandler, cancel=token)

    assert (result.succeeded, result.failed) == (0, 0)
    assert len(result.released) == 3
    assert list(Task.objects.values_list("status", "attempts").distinct()) == [("queued", 0)]


@pytest.mark.django_db
def test_should_retry_and_retry_delay_are_hooks():
    class Picky(TaskHandler):
        def should_retry(self, obj, exc):
            return "permanent" not in str(exc)

        def retry_delay(self, attempts):
            return 3600.0 * attempts

        def handle(self, obj, cancel):
            raise ValueError("permanent" if obj.action == "fail" else "transient")

    permanent = Task.objects.create(action="fail")
    transient = Task.objects.create(action="ok")
    before = timezone.now()

    assert run_handler(Picky).failed == 2

    permanent.refresh_from_db()
    transient.refresh_from_db()
    assert (permanent.status, permanent.attempts) == ("failed", 1)
    assert transient.status == "queued"
    assert 3599 <= (transient.available_at - before).total_seconds() <= 3610


@pytest.mark.django_db
def test_rows_taken_back_are_urgent_and_fresh_claims_are_not():
    dead = WorkerFactory(stopped_at=timezone.now())
    alive = WorkerFactory()
    Task.objects.bulk_create([Task() for _ in range(3)])
    orphans = {t.pk for t in Task.objects.claim(2, worker_id=dead.pk)}
    token = current_worker_id.set(alive.pk)
    try:
        handler = TaskHandler()
        rows = handler.fetch_next(10, workitems.CancellationToken())
    finally:
        current_worker_id.reset(token)
    assert {t.pk for t in rows if handler.urgent(t)} == orphans
    assert len([t for t in rows if not handler.urgent(t)]) == 1


@pytest.mark.django_db
def test_a_suspect_given_up_as_hung_no_longer_holds_back_take_backs():
    dead = WorkerFactory(stopped_at=timezone.now())
    alive = WorkerFactory()
    Task.objects.bulk_create([Task() for _ in range(2)])
    rows = Task.objects.claim(2, worker_id=dead.pk)
    Task.objects.filter(pk__in=[r.pk for r in rows]).update(attempts=2)  # last attempts
    token = current_worker_id.set(alive.pk)
    try:
        handler = TaskHandler()
        [suspect] = handler.fetch_next(10, workitems.CancellationToken())
        assert handler.isolate(suspect)
        assert handler.fetch_next(10, workitems.CancellationToken()) == []  # held back
        handler.given_up(suspect)  # what the engine does with an item hung past its timeout
        [other] = handler.fetch_next(10, workitems.CancellationToken())
    finally:
        current_worker_id.reset(token)
    assert other.pk != suspect.pk and handler.isolate(other)
    # The hung one stays claimed by this live worker: nobody takes it back meanwhile.
    assert Task.objects.get(pk=suspect.pk).claimed_by_id == alive.pk


postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="PostgreSQL only: its claim is one compiled statement"
)


@pytest.mark.django_db
def test_claimed_rows_are_built_as_a_read_of_the_row_would_build_them():
    Task.objects.create(payload={"tags": ["a", "b"], "n": 1}, price="12.50")
    (claimed,) = Task.objects.claim(5, worker_id=None)

    read = Task.objects.get(pk=claimed.pk)
    for field in Task._meta.concrete_fields:
        assert getattr(claimed, field.attname) == getattr(read, field.attname), field.name
    assert claimed.payload == {"tags": ["a", "b"], "n": 1}  # JSON decoded, not a string
    assert str(claimed.price) == "12.50"
    assert claimed._state.adding is False and claimed._state.db == "default"


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_claim_of_its_own_does_not_wait_for_its_wal_flush_and_leaves_the_session_as_it_was():
    Task.objects.bulk_create([Task() for _ in range(3)])
    assert len(Task.objects.claim(1, worker_id=None)) == 1
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone() == ("on",)  # the setting was local to the claim's commit


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_claim_inside_the_callers_transaction_leaves_its_durability_alone():
    from django.db import transaction

    Task.objects.bulk_create([Task() for _ in range(3)])
    with transaction.atomic(), connection.cursor() as cursor:
        assert len(Task.objects.claim(1, worker_id=None)) == 1
        Handler.objects.create(name="anything")
        assert models.request_run("anything")  # the same holds for a wake-up request
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone() == ("on",)


@postgres_only
@pytest.mark.django_db
def test_a_handler_compiles_its_claim_once_for_every_activation():
    from django_workitems import claims
    from django_workitems.models import ClaimStatement

    Task.objects.bulk_create([Task() for _ in range(5)])
    compiled: list[ClaimStatement[Task]] = []
    original = ClaimStatement.__init__

    def counting(self: ClaimStatement[Task], candidates: object) -> None:
        compiled.append(self)
        original(self, candidates)

    claims._statements.pop(TaskHandler.queryset, None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClaimStatement, "__init__", counting)
        token = workitems.CancellationToken()
        for _ in range(5):  # a new handler each time, as each activation makes one
            assert len(TaskHandler().fetch_next(1, token)) == 1
    claimed = [c for c in compiled if c.model is Task]
    # Once each: the plain claim, and the two kinds of take-back of a sweep for dead workers.
    assert len(claimed) <= 3
    assert Task.objects.filter(status="processing").count() == 5


@pytest.mark.django_db
def test_a_handler_whose_get_queryset_changes_claims_from_the_queryset_of_each_fetch():
    Task.objects.bulk_create([Task(action=a) for a in ("ok", "fail", "ok", "fail")])

    class Picky(TaskHandler):
        wanted = "ok"

        def get_queryset(self) -> WorkItemQuerySet[Task]:
            return super().get_queryset().filter(action=self.wanted)

    handler = Picky()
    token = workitems.CancellationToken()
    assert {t.action for t in handler.fetch_next(10, token)} == {"ok"}
    handler.wanted = "fail"
    assert [t.action for t in handler.fetch_next(10, token)] == ["fail", "fail"]
