"""Unit tests of django_workitems.scheduling: fair_shares and the Scheduler's bookkeeping."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from django.test import override_settings

from django_workitems import Purpose
from django_workitems.registry import Registration
from django_workitems.scheduling import Scheduler, claim_limit, fair_shares, plan_fetches

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


def registration(
    name, *, max_items=10, exclusive=True, poll_interval=None, max_concurrency=None, schedule=None
):
    return Registration(
        name=name,
        factory=object,
        max_items_per_cycle=max_items,
        purpose=Purpose.INTERNAL,
        exclusive=exclusive,
        poll_interval=poll_interval,
        max_concurrency=max_concurrency,
        schedule=schedule,
    )


def scheduler(*registrations, interval=INTERVAL, enabled=True):
    sched = Scheduler(registrations, poll_interval=timedelta(seconds=interval))
    if enabled:
        sched.set_enabled({r.name: True for r in registrations})
    return sched


def due(sched, now):
    return [r.name for r in sched.due(now)]


def activation(sched, name, *, start, end=None, drained=False, failed=False, finish=True):
    """A whole activation as the coordinator reports it: started, stopped fetching, finished."""
    sched.activated(name, start)
    sched.fetching_ended(name, drained=drained, failed=failed, now=start if end is None else end)
    if finish:
        sched.finished(name)


def test_every_enabled_handler_is_due_at_start():
    assert due(scheduler(registration("a"), registration("b")), T0) == ["a", "b"]


def test_nothing_is_due_before_the_handler_rows_say_it_is_enabled():
    sched = scheduler(registration("a"), enabled=False)
    assert due(sched, T0) == []
    sched.set_enabled({"a": True})
    assert due(sched, T0) == ["a"]
    sched.set_enabled({"a": False})
    assert due(sched, T0) == []


def test_not_due_again_before_the_poll_interval_counted_from_the_start():
    sched = scheduler(registration("a"))
    activation(sched, "a", start=T0, end=T0 + 5)
    assert due(sched, T0 + INTERVAL - 0.1) == []
    assert due(sched, T0 + INTERVAL) == ["a"]


def test_not_due_while_its_activation_may_still_fetch():
    sched = scheduler(registration("a", exclusive=False))
    sched.activated("a", T0)
    assert due(sched, T0 + 10 * INTERVAL) == []


def test_drain_an_exclusive_handler_is_due_again_once_its_activation_finished():
    sched = scheduler(registration("a"))
    activation(sched, "a", start=T0, drained=True, finish=False)
    assert due(sched, T0 + 1) == [], "its items may still be in process: it would fetch them again"
    sched.finished("a")
    assert due(sched, T0 + 1) == ["a"]


def test_drain_a_non_exclusive_handler_is_due_again_as_soon_as_it_stops_fetching():
    sched = scheduler(registration("a", exclusive=False))
    activation(sched, "a", start=T0, drained=True, finish=False)
    assert due(sched, T0 + 1) == ["a"]


def test_an_activation_that_did_not_drain_waits_for_the_interval():
    sched = scheduler(registration("a", exclusive=False))
    activation(sched, "a", start=T0, drained=False)
    assert due(sched, T0 + 1) == []


def test_a_scheduled_handler_is_due_only_at_its_slots_and_drains_inside_one():
    sched = scheduler(registration("nightly", schedule="0 3 * * *"), registration("a"))
    assert due(sched, T0) == ["a"]  # due at start: interval handlers only
    assert due(sched, T0 + 100 * INTERVAL) == ["a"]
    sched.request("nightly")  # a slot was taken (or "run now")
    assert sorted(due(sched, T0)) == ["a", "nightly"]
    activation(sched, "nightly", start=T0, drained=True)  # a full batch: its source has more
    assert "nightly" in due(sched, T0 + 1)
    activation(sched, "nightly", start=T0 + 1, drained=False)  # the source is empty
    assert "nightly" not in due(sched, T0 + 100 * INTERVAL)  # waits for the next slot


def test_a_failed_fetch_waits_an_interval_from_the_failure_and_never_drains():
    sched = scheduler(registration("a"))
    activation(sched, "a", start=T0, end=T0 + 30, drained=True, failed=True)
    assert due(sched, T0 + INTERVAL) == []
    assert due(sched, T0 + 30 + INTERVAL) == ["a"]


def test_a_request_makes_a_handler_due_now_and_is_consumed():
    sched = scheduler(registration("a"))
    activation(sched, "a", start=T0)
    sched.request("a")
    sched.request("unknown")  # ignored
    assert due(sched, T0 + 1) == ["a"]
    sched.activated("a", T0 + 1)
    sched.fetching_ended("a", drained=False, failed=False, now=T0 + 1)
    sched.finished("a")
    assert due(sched, T0 + 2) == []


def test_a_request_for_a_busy_exclusive_handler_waits_for_its_activation():
    sched = scheduler(registration("a"))
    activation(sched, "a", start=T0, finish=False)
    sched.request("a")
    assert due(sched, T0 + 1) == []
    sched.finished("a")
    assert due(sched, T0 + 1) == ["a"]


def test_note_requests_first_call_only_seeds_then_newer_ones_make_it_due():
    sched = scheduler(registration("a"))
    activation(sched, "a", start=T0)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    sched.note_requests({"a": at, "ghost": at})
    assert due(sched, T0 + 1) == []
    sched.note_requests({"a": at})  # the same request again: nothing new
    assert due(sched, T0 + 1) == []
    sched.note_requests({"a": at - timedelta(seconds=1)})  # older: ignored
    assert due(sched, T0 + 1) == []
    sched.note_requests({"a": at + timedelta(seconds=1)})
    assert due(sched, T0 + 1) == ["a"]


def test_note_requests_first_request_after_none():
    sched = scheduler(registration("a"))
    activation(sched, "a", start=T0)
    sched.note_requests({"a": None})
    sched.note_requests({"a": datetime(2026, 1, 1, tzinfo=UTC)})
    assert due(sched, T0 + 1) == ["a"]


def test_per_handler_poll_interval_overrides_the_global_one():
    sched = scheduler(registration("fast", poll_interval=timedelta(seconds=5)), registration("b"))
    activation(sched, "fast", start=T0)
    activation(sched, "b", start=T0)
    assert due(sched, T0 + 5) == ["fast"]


@override_settings(WORKITEMS={"POLL_INTERVAL": "00:00:07"})
def test_global_poll_interval_defaults_to_the_setting():
    sched = Scheduler([registration("a")])
    sched.set_enabled({"a": True})
    activation(sched, "a", start=T0)
    assert due(sched, T0 + 6.9) == [] and due(sched, T0 + 7) == ["a"]


def test_seconds_until_due_counts_only_handlers_waiting_on_their_timer():
    sched = scheduler(registration("a"), registration("b"), registration("c"))
    activation(sched, "a", start=T0)
    activation(sched, "b", start=T0 + 10)
    sched.activated("c", T0)  # still fetching: waits on its fetch, not a timer
    assert sched.seconds_until_due(T0 + 20) == pytest.approx(INTERVAL - 20)


def test_seconds_until_due_none_when_nothing_waits_on_a_timer():
    sched = scheduler(registration("a"))
    sched.activated("a", T0)
    assert sched.seconds_until_due(T0) is None


def test_busy_and_finished_never_below_zero():
    sched = scheduler(registration("a"))
    assert not sched.busy()
    sched.activated("a", T0)
    assert sched.busy()
    sched.finished("a")
    sched.finished("a")
    assert not sched.busy()
    sched.activated("a", T0 + INTERVAL)
    assert sched.busy()


def test_an_isolated_item_holds_even_a_non_exclusive_handler_until_its_activation_ends():
    sched = scheduler(registration("a", exclusive=False))
    sched.activated("a", T0)
    sched.fetching_ended("a", drained=True, failed=False, now=T0, hold=True)
    assert due(sched, T0 + 1) == []
    sched.finished("a")
    assert due(sched, T0 + 1) == ["a"]


# -- plan_fetches: who gets the channel's room ----------------------------------------------------


@dataclass
class FakeActivation:
    registration: Registration
    serial: int
    allowance: int = 10
    outstanding: int = 0
    hold: bool = False

    @property
    def name(self) -> str:
        return self.registration.name


def activations(count, *, allowance=10, exclusive=True):
    return [
        FakeActivation(
            registration(f"h{i:03d}", exclusive=exclusive), serial=i, allowance=allowance
        )
        for i in range(count)
    ]


def plan_once(candidates, *, room, capacity=100, queued=None, limit=None, served=None, busy=()):
    return {
        p.activation.name: p.ask
        for p in plan_fetches(
            candidates,
            room=room,
            capacity=capacity,
            queued=queued or (lambda name: 0),
            limit=limit or (lambda a: 10**6),
            served=served or (lambda name: 0),
            busy=busy,
        )
    }


def test_plan_asks_each_for_its_allowance_when_the_room_allows():
    assert plan_once(activations(3, allowance=10), room=100) == {"h000": 10, "h001": 10, "h002": 10}


def test_plan_caps_each_handler_at_its_share_of_the_channel():
    assert plan_once(activations(4, allowance=50), room=100) == {
        "h000": 25,
        "h001": 25,
        "h002": 25,
        "h003": 25,
    }


def test_plan_counts_busy_handlers_as_contenders_for_the_share():
    assert plan_once(activations(1, allowance=100), room=100, busy={"other"}) == {"h000": 50}


def test_plan_never_hands_out_more_than_the_room_and_serves_in_turn():
    asked = plan_once(activations(10, allowance=10), room=34, capacity=100)
    assert sum(asked.values()) <= 34
    assert list(asked) == ["h000", "h001", "h002"], "the next in turn waits: 4 is not half of 10"


def test_the_next_in_turn_takes_the_rest_once_half_its_ask_fits():
    asked = plan_once(activations(10, allowance=10), room=35, capacity=100)
    assert asked == {"h000": 10, "h001": 10, "h002": 10, "h003": 5}
    # One handler draining a backlog refetches when the channel is half empty, not empty.
    assert plan_once(activations(1, allowance=1000), room=50, capacity=100) == {"h000": 50}
    assert plan_once(activations(1, allowance=1000), room=49, capacity=100) == {}


def test_plan_with_no_room_plans_nothing():
    assert plan_once(activations(3), room=0) == {}


def test_plan_respects_the_claim_limit_less_what_is_queued():
    candidates = activations(1, allowance=100, exclusive=False)
    assert plan_once(candidates, room=100, limit=lambda a: 8) == {"h000": 8}
    assert plan_once(candidates, room=100, limit=lambda a: 8, queued=lambda n: 3) == {"h000": 5}
    # More than half its limit still queued: it waits, so backlogs are claimed in batches.
    assert plan_once(candidates, room=100, limit=lambda a: 8, queued=lambda n: 5) == {}


def test_200_handlers_beside_a_channel_of_100_are_each_served_in_turn():
    """No handler is served twice while another waits, whatever the number of handlers."""
    candidates = activations(200, allowance=5)
    served: dict[str, int] = {}
    sequence = 0
    rounds: list[list[str]] = []
    for _ in range(8):
        room = 100  # each round, the pool has drained the channel
        picked = list(
            plan_once(
                candidates,
                room=room,
                capacity=100,
                served=lambda name: served.get(name, 0),
                busy={a.name for a in candidates},
            )
        )
        assert picked, "someone is always served"
        for name in picked:
            sequence += 1
            served[name] = sequence
        rounds.append(picked)
    counts = {a.name: 0 for a in candidates}
    for picked in rounds:
        for name in picked:
            counts[name] += 1
    assert max(counts.values()) - min(counts.values()) <= 1
    assert min(counts.values()) >= 1, "every handler was served within the rounds"
    # A handler is served again only after every other one was served once since.
    first_two = rounds[0] + rounds[1]
    assert len(set(first_two)) == len(first_two) == 200


def test_rotation_starts_with_who_was_served_longest_ago():
    candidates = activations(3)
    served = {"h000": 3, "h001": 1, "h002": 2}
    assert list(plan_once(candidates, room=10, served=served.__getitem__)) == ["h001"]


def test_claim_limit_slow_start_then_about_a_second_of_work():
    reg = registration("a", exclusive=False)
    assert claim_limit(reg, workers=4, item_seconds=None) == 4
    assert claim_limit(reg, workers=1, item_seconds=1.0) == 1
    assert claim_limit(reg, workers=4, item_seconds=0.5) == 8
    assert claim_limit(reg, workers=4, item_seconds=0.0001) == 40_000
    limited = registration("b", exclusive=False, max_concurrency=2)
    assert claim_limit(limited, workers=16, item_seconds=0.5) == 4
    assert claim_limit(reg, workers=2, item_seconds=0.02, is_async=True, async_concurrency=100) == (
        5000
    )
