"""Unit tests of django_workitems.scheduling: fair_shares and the Scheduler's bookkeeping."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from django.test import override_settings

from django_workitems import Purpose
from django_workitems.registry import Registration
from django_workitems.scheduling import Scheduler, fair_shares

# -- fair_shares ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "demands", "expected"),
    [
        (100, [8, 200], [8, 92]),
        (100, [200, 8], [92, 8]),
        (100, [10, 20, 30], [10, 20, 30]),
        (100, [50, 50], [50, 50]),
        (90, [100, 100, 100], [30, 30, 30]),
        (7, [1, 2, 100, 100], [1, 2, 2, 2]),
        (10, [1, 1, 50], [1, 1, 8]),
        (0, [5, 5], [0, 0]),
        (5, [], []),
        (5, [0, 0], [0, 0]),
        (5, [0, 9], [0, 5]),
    ],
)
def test_fair_shares_examples(capacity, demands, expected):
    assert fair_shares(capacity, demands) == expected


def test_fair_shares_hands_out_the_remainder_of_an_uneven_split():
    shares = fair_shares(10, [20, 20, 20])
    assert sum(shares) == 10
    assert sorted(shares) == [3, 3, 4]


def test_fair_shares_with_less_capacity_than_demanders():
    shares = fair_shares(2, [5, 5, 5])
    assert sum(shares) == 2
    assert sorted(shares) == [0, 1, 1]


def test_fair_shares_negative_inputs_count_as_zero():
    assert fair_shares(10, [-3, 5]) == [0, 5]
    assert fair_shares(-4, [3, 5]) == [0, 0]


def test_fair_shares_does_not_modify_its_input():
    demands = [30, 5, 12]
    fair_shares(20, demands)
    assert demands == [30, 5, 12]


def _check_water_filling(capacity, demands):
    shares = fair_shares(capacity, demands)
    assert len(shares) == len(demands)
    assert all(share >= 0 for share in shares)
    assert sum(shares) <= max(0, capacity)
    for share, demand in zip(shares, demands, strict=True):
        assert share <= max(0, demand)  # nobody above its demand
    if sum(demands) <= capacity:
        assert shares == demands  # everyone fully served
    else:
        assert sum(shares) == capacity  # no slot wasted while a demand is unmet
    # Max-min fairness: whoever is short of its demand has at least as much as anybody else,
    # give or take the one slot of an uneven integer split.
    for i, (share, demand) in enumerate(zip(shares, demands, strict=True)):
        if share < demand:
            assert all(other <= share + 1 for j, other in enumerate(shares) if j != i)
    # Small demands are fully served: any demand at or below an equal split is met in full.
    if demands:
        for share, demand in zip(shares, demands, strict=True):
            if demand <= capacity // len(demands):
                assert share == demand


def test_fair_shares_water_filling_properties_on_random_inputs():
    rng = random.Random(20240611)  # noqa: S311 - reproducible test data, not secrets
    for _ in range(2000):
        n = rng.randint(0, 8)
        demands = [rng.choice([0, 1, 2, rng.randint(0, 30), rng.randint(0, 300)]) for _ in range(n)]
        capacity = rng.choice([0, 1, 3, rng.randint(0, 50), rng.randint(0, 500)])
        _check_water_filling(capacity, demands)


@pytest.mark.parametrize("capacity", range(0, 40))
def test_fair_shares_water_filling_properties_exhaustive_small(capacity):
    for demands in ([1, 2, 3], [10, 10, 10, 10], [0, 7, 25], [40], [5, 30, 1, 12, 3]):
        _check_water_filling(capacity, demands)


def test_fair_shares_is_monotonic_in_capacity():
    demands = [3, 17, 8, 40]
    previous = [0] * len(demands)
    for capacity in range(0, 80):
        shares = fair_shares(capacity, demands)
        assert sum(shares) >= sum(previous)
        previous = shares


# -- Scheduler ------------------------------------------------------------------------------------

T0 = 1000.0
INTERVAL = 60.0


def registration(name, *, max_items=10, exclusive=True, poll_interval=None):
    return Registration(
        name=name,
        factory=object,
        max_items_per_cycle=max_items,
        purpose=Purpose.INTERNAL,
        exclusive=exclusive,
        poll_interval=poll_interval,
        max_concurrency=None,
    )


def scheduler(*registrations, interval=INTERVAL):
    return Scheduler(registrations, poll_interval=timedelta(seconds=interval))


def plan(sched, now, *, enabled=None, room=100, queued=None, capacity=100):
    planned = sched.plan(
        now,
        enabled=enabled or (lambda name: True),
        room=room,
        queued=queued or (lambda name: 0),
        capacity=capacity,
    )
    return {reg.name: ask for reg, ask in planned}


def run_fetch(sched, name, *, start, end=None, asked=10, fetched=0, failed=False, finish=True):
    """A whole activation as the coordinator reports it: started, fetched, (finished)."""
    sched.fetch_started(name, start)
    sched.fetch_finished(
        name, asked=asked, fetched=fetched, failed=failed, now=start if end is None else end
    )
    if finish:
        sched.activation_finished(name)


def test_every_handler_is_due_at_start():
    sched = scheduler(registration("a"), registration("b", max_items=5), registration("c"))
    assert plan(sched, T0) == {"a": 10, "b": 5, "c": 10}


def test_names():
    sched = scheduler(registration("a"), registration("b"))
    assert sched.names == ["a", "b"]


def test_plan_returns_registrations():
    reg = registration("a")
    sched = scheduler(reg)
    assert sched.plan(T0, enabled=lambda n: True, room=10, queued=lambda n: 0, capacity=10) == [
        (reg, 10)
    ]


def test_not_due_again_before_the_poll_interval():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, fetched=3)
    assert plan(sched, T0 + 1) == {}
    assert plan(sched, T0 + INTERVAL - 0.001) == {}
    assert plan(sched, T0 + INTERVAL) == {"a": 10}


def test_the_interval_counts_from_the_start_of_the_fetch():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, end=T0 + 45, fetched=3)
    assert plan(sched, T0 + 59) == {}
    assert plan(sched, T0 + 60) == {"a": 10}


def test_not_planned_while_its_fetch_is_running():
    sched = scheduler(registration("a"), registration("b", exclusive=False))
    sched.fetch_started("a", T0)
    sched.fetch_started("b", T0)
    assert plan(sched, T0 + 10 * INTERVAL) == {}


def test_empty_fetch_is_not_drain_mode():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, asked=10, fetched=0)
    assert plan(sched, T0 + 1) == {}


def test_drain_mode_after_a_full_batch():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, asked=10, fetched=10)
    assert plan(sched, T0 + 1) == {"a": 10}


def test_drain_mode_when_more_than_asked_came_back():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, asked=4, fetched=6)
    assert plan(sched, T0 + 1) == {"a": 10}


def test_drain_mode_ends_with_a_partial_batch():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, asked=10, fetched=10)
    run_fetch(sched, "a", start=T0 + 2, asked=10, fetched=4)
    assert plan(sched, T0 + 3) == {}
    assert plan(sched, T0 + 2 + INTERVAL) == {"a": 10}


def test_a_full_batch_of_a_reduced_ask_is_drain_mode():
    # The handler was granted 3 slots, not its 10: 3 fetched is still a full batch.
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, asked=3, fetched=3)
    assert plan(sched, T0 + 1) == {"a": 10}


def test_exclusive_handler_not_planned_while_its_activation_is_active():
    sched = scheduler(registration("a", exclusive=True))
    run_fetch(sched, "a", start=T0, asked=10, fetched=10, finish=False)
    assert sched.busy()
    assert plan(sched, T0 + 1) == {}  # drain mode, but its items are still queued here
    assert plan(sched, T0 + 10 * INTERVAL) == {}  # nor when the timer says so
    sched.activation_finished("a")
    assert plan(sched, T0 + 2) == {"a": 10}


def test_exclusive_handler_request_waits_for_the_activation():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, fetched=2, finish=False)
    sched.request("a")
    assert plan(sched, T0 + 1) == {}
    sched.activation_finished("a")
    assert plan(sched, T0 + 1) == {"a": 10}


def test_non_exclusive_handler_planned_again_while_active_when_there_is_room():
    sched = scheduler(registration("a", exclusive=False))
    run_fetch(sched, "a", start=T0, asked=10, fetched=10, finish=False)
    assert sched.busy()
    assert plan(sched, T0 + 1, room=90, queued=lambda n: 10 if n == "a" else 0) == {"a": 10}


def test_non_exclusive_drain_waits_for_room_for_half_a_batch():
    sched = scheduler(registration("a", max_items=10, exclusive=False))
    run_fetch(sched, "a", start=T0, asked=10, fetched=10, finish=False)
    # The channel of 20 holds 16 of a's items: room for 4, less than half a batch.
    assert plan(sched, T0 + 1, room=4, queued=lambda n: 16, capacity=20) == {}
    # Room for 5 (half a batch): fetch again.
    assert plan(sched, T0 + 1, room=5, queued=lambda n: 15, capacity=20) == {"a": 5}


def test_non_exclusive_timer_due_ignores_the_half_batch_rule():
    sched = scheduler(registration("a", max_items=10, exclusive=False))
    run_fetch(sched, "a", start=T0, asked=10, fetched=10, finish=False)
    assert plan(sched, T0 + INTERVAL, room=2, queued=lambda n: 18, capacity=20) == {"a": 2}


def test_non_exclusive_without_drain_waits_for_the_timer():
    sched = scheduler(registration("a", exclusive=False))
    run_fetch(sched, "a", start=T0, asked=10, fetched=3, finish=False)
    assert plan(sched, T0 + 1) == {}
    assert plan(sched, T0 + INTERVAL) == {"a": 10}


def test_disabled_handler_is_skipped():
    sched = scheduler(registration("a"), registration("b"))
    assert plan(sched, T0, enabled=lambda name: name != "b") == {"a": 10}
    assert plan(sched, T0, enabled=lambda name: False) == {}


def test_disabled_handler_is_due_once_enabled():
    sched = scheduler(registration("a"))
    assert plan(sched, T0, enabled=lambda name: False) == {}
    assert plan(sched, T0 + 0.5, enabled=lambda name: True) == {"a": 10}


def test_request_makes_a_handler_due_now():
    sched = scheduler(registration("a"), registration("b"))
    run_fetch(sched, "a", start=T0, fetched=1)
    run_fetch(sched, "b", start=T0, fetched=1)
    sched.request("a")
    sched.request("unknown")  # ignored
    assert plan(sched, T0 + 1) == {"a": 10}
    sched.fetch_started("a", T0 + 1)  # starting the fetch answers the request
    sched.fetch_finished("a", asked=10, fetched=1, failed=False, now=T0 + 1)
    sched.activation_finished("a")
    assert plan(sched, T0 + 2) == {}


def test_note_requests_first_call_only_seeds():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, fetched=1)
    at = datetime(2024, 1, 1, tzinfo=UTC)
    sched.note_requests({"a": at})
    assert plan(sched, T0 + 1) == {}
    sched.note_requests({"a": at})  # the same request seen again: nothing new
    assert plan(sched, T0 + 1) == {}


def test_note_requests_a_newer_request_makes_it_due():
    sched = scheduler(registration("a"), registration("b"))
    run_fetch(sched, "a", start=T0, fetched=1)
    run_fetch(sched, "b", start=T0, fetched=1)
    at = datetime(2024, 1, 1, tzinfo=UTC)
    sched.note_requests({"a": at, "b": at})
    sched.note_requests({"a": at + timedelta(seconds=1), "b": at})
    assert plan(sched, T0 + 1) == {"a": 10}


def test_note_requests_an_older_request_is_ignored():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, fetched=1)
    at = datetime(2024, 1, 1, tzinfo=UTC)
    sched.note_requests({"a": at})
    sched.note_requests({"a": at - timedelta(hours=1)})
    assert plan(sched, T0 + 1) == {}


def test_note_requests_first_request_after_none():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, fetched=1)
    sched.note_requests({"a": None})
    assert plan(sched, T0 + 1) == {}
    sched.note_requests({"a": datetime(2024, 1, 1, tzinfo=UTC)})
    assert plan(sched, T0 + 1) == {"a": 10}


def test_note_requests_ignores_unknown_names_and_none():
    sched = scheduler(registration("a"))
    run_fetch(sched, "a", start=T0, fetched=1)
    sched.note_requests({"a": None, "zzz": datetime(2024, 1, 1, tzinfo=UTC)})
    sched.note_requests({"a": None, "zzz": datetime(2025, 1, 1, tzinfo=UTC)})
    assert plan(sched, T0 + 1) == {}


def test_fetch_failure_waits_an_interval_from_the_failure():
    sched = scheduler(registration("a"))
    sched.fetch_started("a", T0)
    sched.fetch_finished("a", asked=10, fetched=10, failed=True, now=T0 + 30)
    sched.activation_finished("a")
    assert plan(sched, T0 + 31) == {}  # no drain mode after a failure, even if "full"
    assert plan(sched, T0 + 30 + INTERVAL - 1) == {}
    assert plan(sched, T0 + 30 + INTERVAL) == {"a": 10}


def test_per_handler_poll_interval_overrides_the_global_one():
    sched = scheduler(
        registration("fast", poll_interval=timedelta(seconds=10)),
        registration("slow"),
        interval=INTERVAL,
    )
    run_fetch(sched, "fast", start=T0, fetched=1)
    run_fetch(sched, "slow", start=T0, fetched=1)
    assert plan(sched, T0 + 9) == {}
    assert plan(sched, T0 + 10) == {"fast": 10}
    assert plan(sched, T0 + INTERVAL) == {"fast": 10, "slow": 10}


def test_global_poll_interval_defaults_to_the_setting():
    with override_settings(WORKITEMS={"POLL_INTERVAL": "00:00:20"}):
        sched = Scheduler([registration("a")])
    run_fetch(sched, "a", start=T0, fetched=1)
    assert plan(sched, T0 + 19) == {}
    assert plan(sched, T0 + 20) == {"a": 10}


def test_poll_interval_argument_overrides_the_setting():
    with override_settings(WORKITEMS={"POLL_INTERVAL": "01:00:00"}):
        sched = Scheduler([registration("a")], poll_interval=timedelta(seconds=5))
    run_fetch(sched, "a", start=T0, fetched=1)
    assert plan(sched, T0 + 5) == {"a": 10}


def test_plan_splits_the_room_fairly():
    sched = scheduler(
        registration("a", max_items=50), registration("b", max_items=50), registration("c")
    )
    asks = plan(sched, T0, room=30, capacity=100)
    assert asks == {"a": 10, "b": 10, "c": 10}


def test_plan_gives_small_asks_in_full_and_the_rest_to_the_others():
    sched = scheduler(registration("small", max_items=2), registration("big", max_items=50))
    assert plan(sched, T0, room=20, capacity=100) == {"small": 2, "big": 18}


def test_plan_never_asks_for_more_than_the_room():
    sched = scheduler(*(registration(f"h{i}", max_items=7) for i in range(5)))
    for room in range(0, 40):
        asks = plan(sched, T0, room=room, capacity=40)
        assert sum(asks.values()) <= room
        assert all(1 <= ask <= 7 for ask in asks.values())
        if room >= 5:
            assert len(asks) == 5  # everybody gets something


def test_plan_with_no_room_plans_nothing():
    sched = scheduler(registration("a"), registration("b"))
    assert plan(sched, T0, room=0) == {}


def test_plan_caps_each_handler_at_its_share_of_the_channel():
    # Two handlers contend for a channel of 20: neither may ask for more than 10.
    sched = scheduler(registration("a", max_items=50), registration("b", max_items=50))
    assert plan(sched, T0, room=20, capacity=20) == {"a": 10, "b": 10}


def test_plan_counts_items_already_queued_against_the_share():
    sched = scheduler(
        registration("a", max_items=50), registration("b", max_items=50), registration("c")
    )
    queued = {"a": 4, "b": 0, "c": 6}
    # c is not due (disabled) but has items queued: three contend, a share of 10 each, and
    # a already has 4 of its 10 in the channel.
    asks = plan(
        sched,
        T0,
        enabled=lambda name: name != "c",
        room=20,
        capacity=30,
        queued=lambda n: queued.get(n, 0),
    )
    assert asks == {"a": 6, "b": 10}


def test_seconds_until_due():
    sched = scheduler(registration("a"), registration("b", poll_interval=timedelta(seconds=10)))
    run_fetch(sched, "a", start=T0, fetched=1)
    run_fetch(sched, "b", start=T0, fetched=1)
    assert sched.seconds_until_due(T0 + 4) == pytest.approx(6.0)
    run_fetch(sched, "b", start=T0 + 10, fetched=1)
    assert sched.seconds_until_due(T0 + 15) == pytest.approx(5.0)


def test_seconds_until_due_ignores_handlers_that_are_fetching_or_exclusive_and_active():
    sched = scheduler(registration("a"), registration("b"))
    sched.fetch_started("a", T0)
    run_fetch(sched, "b", start=T0, fetched=1, finish=False)
    assert sched.seconds_until_due(T0 + 1) is None


def test_seconds_until_due_never_zero_for_a_handler_that_plan_left_waiting():
    # A disabled handler is due but not started: its wait is not a timer, and reporting 0 would
    # make the coordinator spin until it is enabled.
    sched = scheduler(registration("on"), registration("off"))
    assert plan(sched, T0, enabled=lambda name: name == "on") == {"on": 10}
    sched.fetch_started("on", T0)
    sched.fetch_finished("on", asked=10, fetched=1, failed=False, now=T0)
    sched.activation_finished("on")
    assert sched.seconds_until_due(T0 + 1) == pytest.approx(INTERVAL - 1)


def test_seconds_until_due_none_when_nothing_waits_on_a_timer():
    sched = scheduler(registration("a"))
    assert sched.seconds_until_due(T0) is None  # due already: plan will start it


def test_busy():
    sched = scheduler(registration("a", exclusive=False))
    assert not sched.busy()
    sched.fetch_started("a", T0)
    assert sched.busy()
    sched.fetch_finished("a", asked=10, fetched=3, failed=False, now=T0)
    assert sched.busy()  # its items are still in process
    sched.activation_finished("a")
    assert not sched.busy()


def test_activation_finished_does_not_go_below_zero():
    sched = scheduler(registration("a"))
    sched.activation_finished("a")
    sched.activation_finished("a")
    assert not sched.busy()
    run_fetch(sched, "a", start=T0, fetched=1, finish=False)
    assert plan(sched, T0 + INTERVAL) == {}  # still one activation active


def test_a_fetch_with_an_isolated_item_holds_the_handler_then_drains_at_once():
    # A non-exclusive handler would normally be fetched again while its items are in process;
    # with a suspect pending it waits for the activation, then goes on without the interval.
    sched = scheduler(registration("claims", exclusive=False))
    assert list(plan(sched, 0.0)) == ["claims"]
    sched.fetch_started("claims", 0.0)
    sched.fetch_finished("claims", asked=10, fetched=1, failed=False, now=0.1, isolated=1)

    assert plan(sched, 0.2) == {}
    sched.activation_finished("claims")
    assert list(plan(sched, 0.3)) == ["claims"]


def test_max_concurrency_caps_what_a_fetch_asks_for():
    reg = Registration(
        name="capped",
        factory=object,
        max_items_per_cycle=50,
        purpose=Purpose.INTERNAL,
        exclusive=False,
        poll_interval=None,
        max_concurrency=3,
    )
    sched = scheduler(reg)
    assert plan(sched, 0.0) == {"capped": 6}
    sched.fetch_started("capped", 0.0)
    sched.fetch_finished("capped", asked=6, fetched=6, failed=False, now=0.1)
    # Drain mode: fetched again once half of its cap is free, not before.
    assert plan(sched, 0.2, queued=lambda name: 4) == {}
    assert plan(sched, 0.2, queued=lambda name: 3) == {"capped": 3}
