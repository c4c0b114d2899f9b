"""Fairness and claims with real workers: many handlers, little room, slow items.

Real ``runworkitems`` subprocesses on a real database (issue 10: every handler is served in
turn whatever their number; a worker does not hoard claims while another has idle threads).
"""

from __future__ import annotations

from collections import Counter

import pytest
from django.db.models import Count

from tests.conftest import wait_for
from tests.test_scaleout import postgres_only, stop_all
from tests.testapp.models import Job, ProcessLog, Task

pytestmark = pytest.mark.django_db(transaction=True)

HANDLERS = 200
PER_HANDLER = 6


def served() -> Counter[str]:
    """Items processed so far per handler (a Job or a Task row of its queue)."""
    counts: Counter[str] = Counter(
        dict(
            Job.objects.filter(queue__startswith="many-", status="done")
            .values_list("queue")
            .annotate(n=Count("id"))
        )
    )
    counts.update(
        dict(
            Task.objects.filter(action__startswith="many-", status="succeeded")
            .values_list("action")
            .annotate(n=Count("id"))
        )
    )
    return counts


def test_200_backlogged_handlers_with_little_room_are_all_served_in_turn(start_worker):
    """More backlogged handlers than channel room: each is served before any is served again."""
    names = [f"many-{i:03d}" for i in range(HANDLERS)]
    Job.objects.bulk_create(
        [Job(queue=n) for i, n in enumerate(names) if i % 2 == 0 for _ in range(PER_HANDLER)]
    )
    Task.objects.bulk_create(
        [Task(action=n) for i, n in enumerate(names) if i % 2 == 1 for _ in range(PER_HANDLER)]
    )
    worker = start_worker(
        "--workers",
        "4",
        WORKITEMS_TEST_MANY_HANDLERS=str(HANDLERS),
        WORKITEMS_QUEUE_SIZE="20",
        WORKITEMS_POLL_INTERVAL="00:00:30",  # only the drain brings a handler back
    )

    first_round: dict[str, int] = {}

    def everyone_served() -> bool:
        counts = served()
        first_round.clear()
        first_round.update({n: counts.get(n, 0) for n in names})
        return min(first_round.values()) >= 1

    wait_for(everyone_served, timeout=240, message="every handler served once")
    # When the last handler got its first item, nobody had been served far ahead: the channel
    # room (20) goes round the 200 handlers, so no handler had its whole allowance twice over.
    most = max(first_round.values())
    assert most <= 2 * 10, f"a handler was served {most} items before another got one"
    exclusive = [first_round[n] for i, n in enumerate(names) if i % 2 == 0]
    claiming = [first_round[n] for i, n in enumerate(names) if i % 2 == 1]
    assert min(exclusive) >= 1 and min(claiming) >= 1

    wait_for(
        lambda: sum(served().values()) == HANDLERS * PER_HANDLER,
        timeout=600,
        message="every backlog worked off",
    )
    stop_all([worker])
    assert set(Job.objects.values_list("times_processed", flat=True)) == {1}
    per_task = Counter(ProcessLog.objects.values_list("task_id", flat=True))
    assert set(per_task.values()) == {1}, "a claimed row was processed twice"


def test_slow_items_are_not_hoarded_a_second_worker_gets_work_at_once(start_worker):
    """Two workers of one thread each and 1-second items: both are busy within seconds."""
    postgres_only()  # SQLite serialises the two processes' claims behind its write lock
    Task.objects.bulk_create([Task(seconds=1.0) for _ in range(12)])
    first = start_worker("--handler", "tasks", "--workers", "1")
    wait_for(lambda: ProcessLog.objects.exists(), timeout=60, message="the first worker to start")
    # The first worker claims about what its one thread starts within a second or so, not a
    # batch of 20 for its channel: most rows stay queued for anyone else.
    claimed = Task.objects.filter(status="processing").count()
    assert claimed <= 3, f"one thread with 1-second items holds {claimed} claims"

    second = start_worker("--handler", "tasks", "--workers", "1")
    wait_for(
        lambda: ProcessLog.objects.values("pid").distinct().count() == 2,
        timeout=60,
        message="the second worker to get a row",
    )
    wait_for(
        lambda: Task.objects.filter(status="succeeded").count() == 12,
        timeout=120,
        message="every row",
    )
    stop_all([first, second])
    pids = Counter(ProcessLog.objects.values_list("pid", flat=True))
    assert len(pids) == 2 and min(pids.values()) >= 3, f"the work was not shared: {pids}"
