"""Unit tests of FairChannel: accounting, fairness, limits, blocking and shutdown."""

from __future__ import annotations

import threading
import time
import types

import pytest

from django_workitems.channel import FairChannel

WAIT = 5.0  # generous upper bound for thread hand-offs; tests finish far sooner


def fill(channel, key, entries):
    """Reserve room for ``entries`` of ``key`` and put them, as a fetch does."""
    granted = channel.reserve(key, len(entries))
    assert granted == len(entries)
    assert channel.put(key, entries, granted) is True


def take_all(channel):
    taken = []
    while (found := channel.take(timeout=0)) is not None:
        taken.append(found)
    return taken


class Recorder:
    """A waker that counts its calls and lets a test wait for one."""

    def __init__(self):
        self.calls = 0
        self.event = threading.Event()

    def wake(self):
        self.calls += 1
        self.event.set()


def start_taker(channel, timeout=None):
    """Run ``channel.take(timeout)`` on a thread; returns (thread, started, result list)."""
    started = threading.Event()
    result = []

    def run():
        started.set()
        result.append(channel.take(timeout=timeout))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(WAIT)
    return thread, result


# -- capacity, reservations, room ------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_must_be_positive(capacity):
    with pytest.raises(ValueError, match="capacity"):
        FairChannel(capacity)


def test_empty_channel():
    channel = FairChannel(5)
    assert channel.capacity == 5
    assert channel.room() == 5
    assert len(channel) == 0
    assert channel.queued("a") == 0
    assert channel.in_process("a") == 0
    assert channel.closed is False


def test_reserve_takes_room_and_counts_as_queued():
    channel = FairChannel(10)
    assert channel.reserve("a", 4) == 4
    assert channel.room() == 6
    assert channel.queued("a") == 4
    assert channel.queued("b") == 0
    assert len(channel) == 0  # reserved slots are not entries


def test_reserve_grants_at_most_the_room():
    channel = FairChannel(10)
    assert channel.reserve("a", 7) == 7
    assert channel.reserve("b", 7) == 3
    assert channel.room() == 0
    assert channel.reserve("c", 1) == 0
    assert channel.queued("c") == 0


@pytest.mark.parametrize("count", [0, -5])
def test_reserve_nothing(count):
    channel = FairChannel(10)
    assert channel.reserve("a", count) == 0
    assert channel.room() == 10
    assert channel.queued("a") == 0


def test_unreserve_gives_room_back():
    channel = FairChannel(10)
    channel.reserve("a", 6)
    channel.unreserve("a", 4)
    assert channel.room() == 8
    assert channel.queued("a") == 2
    channel.unreserve("a", 2)
    assert channel.room() == 10
    assert channel.queued("a") == 0


def test_unreserve_more_than_reserved_does_not_go_negative():
    channel = FairChannel(10)
    channel.reserve("a", 2)
    channel.unreserve("a", 5)
    assert channel.queued("a") == 0
    assert channel.room() == 10
    channel.unreserve("never-reserved", 3)
    assert channel.room() == 10


def test_put_replaces_the_reservation_with_entries():
    channel = FairChannel(10)
    granted = channel.reserve("a", 3)
    assert channel.put("a", [1, 2, 3], granted) is True
    assert len(channel) == 3
    assert channel.room() == 7
    assert channel.queued("a") == 3


def test_a_short_batch_releases_the_rest_of_its_reservation():
    channel = FairChannel(10)
    channel.reserve("a", 5)
    channel.put("a", [1, 2], 5)
    assert channel.room() == 8
    assert channel.queued("a") == 2


def test_an_empty_batch_releases_its_reservation():
    channel = FairChannel(10)
    channel.reserve("a", 5)
    assert channel.put("a", [], 5) is True
    assert channel.room() == 10
    assert channel.take(timeout=0) is None


def test_entries_beyond_the_reservation_are_accepted():
    channel = FairChannel(3)
    granted = channel.reserve("a", 3)
    assert channel.put("a", [1, 2, 3, 4, 5], granted) is True
    assert len(channel) == 5
    assert channel.room() == 0  # never negative, though past capacity
    assert channel.reserve("b", 1) == 0
    assert [entry for _, entry in take_all(channel)] == [1, 2, 3, 4, 5]


def test_room_stays_zero_until_the_overflow_is_taken():
    channel = FairChannel(2)
    channel.put("a", [1, 2, 3, 4], channel.reserve("a", 2))
    channel.take(timeout=0)
    channel.take(timeout=0)
    assert channel.room() == 0
    channel.take(timeout=0)
    assert channel.room() == 1


def test_taking_frees_room():
    channel = FairChannel(4)
    fill(channel, "a", [1, 2, 3, 4])
    assert channel.room() == 0
    channel.take(timeout=0)
    assert channel.room() == 1
    assert channel.queued("a") == 3
    assert channel.in_process("a") == 1


# -- close ----------------------------------------------------------------------------------------


def test_put_returns_false_after_close():
    channel = FairChannel(10)
    granted = channel.reserve("a", 2)
    channel.close()
    assert channel.closed is True
    assert channel.put("a", [1, 2], granted) is False
    assert len(channel) == 0
    assert channel.queued("a") == 0  # the reservation was released all the same
    assert channel.room() == 10


def test_take_returns_none_once_closed_even_with_entries_queued():
    channel = FairChannel(10)
    fill(channel, "a", [1, 2])
    channel.close()
    assert channel.take(timeout=0) is None
    assert channel.take() is None  # does not block
    assert len(channel) == 2


def test_drain_returns_the_unstarted_entries():
    channel = FairChannel(10)
    fill(channel, "a", [1, 2, 3])
    fill(channel, "b", ["x", "y"])
    assert channel.take(timeout=0) == ("a", 1)  # started: not drained
    channel.close()
    drained = channel.drain()
    assert sorted(drained, key=str) == sorted([("a", 2), ("a", 3), ("b", "x"), ("b", "y")], key=str)
    assert len(channel) == 0
    assert channel.drain() == []
    assert channel.in_process("a") == 1


def test_drain_keeps_the_order_within_a_key():
    channel = FairChannel(10)
    fill(channel, "a", [1, 2, 3])
    fill(channel, "b", [4])
    fill(channel, "a", [5])
    drained = channel.drain()
    assert [entry for key, entry in drained if key == "a"] == [1, 2, 3, 5]


def test_drain_without_close_empties_the_channel():
    channel = FairChannel(10)
    fill(channel, "a", [1, 2])
    assert channel.drain() == [("a", 1), ("a", 2)]
    assert channel.take(timeout=0) is None
    assert channel.room() == 10
    fill(channel, "a", [3])  # still usable
    assert channel.take(timeout=0) == ("a", 3)


# -- fairness -------------------------------------------------------------------------------------


def test_round_robin_a_small_key_is_not_starved_by_a_big_one():
    channel = FairChannel(200)
    fill(channel, "A", [f"A{i}" for i in range(100)])
    fill(channel, "B", [f"B{i}" for i in range(5)])
    first_ten = [channel.take(timeout=0) for _ in range(10)]
    assert [entry for key, entry in first_ten if key == "B"] == [f"B{i}" for i in range(5)]
    rest = take_all(channel)
    assert len(rest) == 95
    assert all(key == "A" for key, _ in rest)
    assert [entry for _, entry in first_ten + rest if entry.startswith("A")] == [
        f"A{i}" for i in range(100)
    ]


def test_keys_take_turns():
    channel = FairChannel(20)
    fill(channel, "a", [1, 2, 3])
    fill(channel, "b", [1, 2, 3])
    fill(channel, "c", [1, 2, 3])
    keys = [key for key, _ in take_all(channel)]
    assert keys == ["a", "b", "c"] * 3


def test_a_key_arriving_later_joins_the_rotation():
    channel = FairChannel(20)
    fill(channel, "a", list(range(6)))
    assert channel.take(timeout=0)[0] == "a"
    fill(channel, "b", [0, 1])
    keys = [channel.take(timeout=0)[0] for _ in range(4)]
    assert keys.count("b") == 2
    assert keys[:2] in (["a", "b"], ["b", "a"])


def test_a_refilled_key_rejoins_the_rotation():
    channel = FairChannel(20)
    fill(channel, "a", [1])
    fill(channel, "b", [1, 2, 3])
    assert [channel.take(timeout=0)[0] for _ in range(2)] == ["a", "b"]
    fill(channel, "a", [2, 3])
    keys = [key for key, _ in take_all(channel)]
    assert sorted(keys) == ["a", "a", "b", "b"]
    assert keys[:2] in (["a", "b"], ["b", "a"])


# -- concurrency limits ---------------------------------------------------------------------------


def test_set_limit_caps_entries_in_process_per_key():
    channel = FairChannel(20)
    channel.set_limit("a", 2)
    fill(channel, "a", [1, 2, 3, 4, 5])
    fill(channel, "b", [1, 2, 3])
    taken = take_all(channel)
    assert [key for key, _ in taken].count("a") == 2
    assert [key for key, _ in taken].count("b") == 3
    assert channel.in_process("a") == 2
    assert channel.queued("a") == 3
    assert channel.take(timeout=0) is None  # only a's entries remain, and a is at its limit


def test_task_done_releases_a_slot_under_the_limit():
    channel = FairChannel(20)
    channel.set_limit("a", 1)
    fill(channel, "a", [1, 2, 3])
    assert channel.take(timeout=0) == ("a", 1)
    assert channel.take(timeout=0) is None
    channel.task_done("a")
    assert channel.in_process("a") == 0
    assert channel.take(timeout=0) == ("a", 2)
    assert channel.take(timeout=0) is None


def test_set_limit_wakes_a_taker_blocked_by_the_old_limit():
    channel = FairChannel(20)
    channel.set_limit("a", 1)
    fill(channel, "a", [1, 2])
    channel.take(timeout=0)
    thread, result = start_taker(channel)
    try:
        thread.join(0.05)
        assert thread.is_alive()
        channel.set_limit("a", None)
        thread.join(WAIT)
        assert not thread.is_alive()
        assert result == [("a", 2)]
    finally:
        channel.close()


def test_set_limit_none_lifts_the_limit():
    channel = FairChannel(20)
    channel.set_limit("a", 1)
    fill(channel, "a", [1, 2, 3])
    channel.take(timeout=0)
    assert channel.take(timeout=0) is None
    channel.set_limit("a", None)
    assert len(take_all(channel)) == 2


def test_raising_the_limit_lets_more_through():
    channel = FairChannel(20)
    channel.set_limit("a", 1)
    fill(channel, "a", [1, 2, 3])
    channel.take(timeout=0)
    channel.set_limit("a", 2)
    assert channel.take(timeout=0) == ("a", 2)
    assert channel.take(timeout=0) is None


@pytest.mark.parametrize("limit", [0, -1, False])
def test_set_limit_rejects_limits_that_would_block_a_key_forever(limit):
    channel = FairChannel(5)
    with pytest.raises(ValueError, match="limit"):
        channel.set_limit("a", limit)


def test_task_done_wakes_a_taker_blocked_by_the_limit():
    channel = FairChannel(20)
    channel.set_limit("a", 1)
    fill(channel, "a", [1, 2])
    assert channel.take(timeout=0) == ("a", 1)
    # No time-out: only task_done's notification can wake it (a time-out would retry and hide
    # a missing notify).
    thread, result = start_taker(channel)
    try:
        thread.join(0.05)
        assert thread.is_alive()  # blocked: a is at its limit
        channel.task_done("a")
        thread.join(WAIT)
        assert not thread.is_alive()
        assert result == [("a", 2)]
    finally:
        channel.close()


def test_in_process_counts_without_a_limit():
    channel = FairChannel(20)
    fill(channel, "a", [1, 2, 3])
    channel.take(timeout=0)
    channel.take(timeout=0)
    assert channel.in_process("a") == 2
    channel.task_done("a")
    assert channel.in_process("a") == 1
    channel.task_done("a")
    assert channel.in_process("a") == 0


# -- blocking take --------------------------------------------------------------------------------


def test_take_timeout_zero_returns_none_when_empty():
    channel = FairChannel(5)
    started = time.monotonic()
    assert channel.take(timeout=0) is None
    assert time.monotonic() - started < 1.0


def test_take_with_a_timeout_returns_none_after_it():
    channel = FairChannel(5)
    started = time.monotonic()
    assert channel.take(timeout=0.05) is None
    assert time.monotonic() - started >= 0.05


def test_take_blocks_until_another_thread_puts():
    channel = FairChannel(5)
    thread, result = start_taker(channel)  # no time-out: only put's notification wakes it
    try:
        thread.join(0.05)
        assert thread.is_alive()
        assert result == []
        fill(channel, "a", ["item"])
        thread.join(WAIT)
        assert not thread.is_alive()
        assert result == [("a", "item")]
    finally:
        channel.close()


def test_take_receives_an_entry_put_by_a_producer_thread():
    channel = FairChannel(5)
    go = threading.Event()

    def produce():
        assert go.wait(WAIT)
        fill(channel, "p", [42])

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    go.set()
    assert channel.take(timeout=WAIT) == ("p", 42)
    producer.join(WAIT)


def test_close_wakes_a_blocked_take():
    channel = FairChannel(5)
    thread, result = start_taker(channel)  # no time-out: only close() can end it
    thread.join(0.05)
    assert thread.is_alive()
    channel.close()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert result == [None]


def test_close_wakes_every_blocked_take():
    channel = FairChannel(5)
    takers = [start_taker(channel) for _ in range(4)]
    channel.close()
    for thread, result in takers:
        thread.join(WAIT)
        assert not thread.is_alive()
        assert result == [None]


def test_concurrent_takers_get_every_entry_exactly_once():
    channel = FairChannel(1000)
    expected = set()
    for key in ("a", "b", "c"):
        entries = [f"{key}{i}" for i in range(200)]
        fill(channel, key, entries)
        expected.update((key, entry) for entry in entries)
    taken = []
    lock = threading.Lock()

    def consume():
        while (found := channel.take(timeout=0)) is not None:
            with lock:
                taken.append(found)
            channel.task_done(found[0])

    threads = [threading.Thread(target=consume, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert len(taken) == 600
    assert set(taken) == expected
    assert len(channel) == 0
    assert channel.room() == 1000


# -- waking the coordinator ----------------------------------------------------------------------


def test_waker_when_a_keys_queue_empties():
    recorder = Recorder()
    channel = FairChannel(100, waker=recorder)
    fill(channel, "a", [1, 2, 3])
    channel.take(timeout=0)
    channel.take(timeout=0)
    assert recorder.calls == 0  # a still has an entry queued, far above the low-water mark
    channel.take(timeout=0)
    assert recorder.calls == 1


def test_waker_at_the_low_water_mark():
    recorder = Recorder()
    channel = FairChannel(4, waker=recorder)  # low water: 2 free slots
    fill(channel, "a", [1, 2, 3, 4])
    channel.take(timeout=0)
    assert recorder.calls == 0  # room 1
    channel.take(timeout=0)
    assert recorder.calls == 1  # room 2: half the channel is free


def test_waker_on_unreserve():
    recorder = Recorder()
    channel = FairChannel(10, waker=recorder)
    channel.reserve("a", 5)
    channel.unreserve("a", 5)
    assert recorder.calls == 1


def test_waker_when_a_short_batch_gives_back_its_reservation():
    recorder = Recorder()
    channel = FairChannel(10, waker=recorder)
    channel.put("a", [1], channel.reserve("a", 5))
    assert recorder.calls == 1
    channel.put("b", [1, 2], channel.reserve("b", 2))  # full batch: no room freed
    assert recorder.calls == 1


def test_waker_is_called_outside_the_lock():
    channel = None
    finished = []

    def wake():
        # Another thread must be able to use the channel while the callback runs.
        other = threading.Thread(target=lambda: finished.append(channel.room()), daemon=True)
        other.start()
        other.join(WAIT)

    channel = FairChannel(10, waker=types.SimpleNamespace(wake=wake))
    fill(channel, "a", [1])
    channel.take(timeout=0)
    assert finished == [10]
    channel.reserve("a", 2)
    channel.unreserve("a", 2)
    assert finished == [10, 10]


def test_no_waker_is_fine():
    channel = FairChannel(2)
    fill(channel, "a", [1])
    assert channel.take(timeout=0) == ("a", 1)
    channel.unreserve("a", 0)


def test_urgent_entries_go_before_those_of_their_key_already_queued():
    channel: FairChannel[str] = FairChannel(10)
    channel.put("a", ["a1", "a2"], 0)
    channel.put("a", ["taken-back", "a3"], 0, urgent=1)
    order = [channel.take(timeout=1) for _ in range(4)]
    assert [entry for _, entry in order] == ["taken-back", "a1", "a2", "a3"]


def test_make_way_takes_the_newest_movable_entries_of_a_key():
    recorder = Recorder()
    channel = FairChannel(10, waker=recorder)
    granted = channel.reserve("a", 5)
    solo = [False, False, False, True, False]
    channel.put("a", ["a1", "keep", "a3", "solo", "a5"], granted, solo)
    fill(channel, "b", ["b1"])
    calls = recorder.calls

    moved = channel.make_way("a", 3, lambda entry: entry != "keep")

    assert moved == ["a5", "a3", "a1"]  # newest first; the solo entry and "keep" stay
    assert len(channel) == 3 and recorder.calls == calls + 1
    assert sorted(channel.drain()) == [("a", "keep"), ("a", "solo"), ("b", "b1")]


def test_make_way_never_takes_more_than_asked_nor_from_other_keys():
    channel = FairChannel(10)
    fill(channel, "a", [1, 2, 3])
    fill(channel, "b", [4])
    assert channel.make_way("a", 2, lambda entry: True) == [3, 2]
    assert channel.make_way("a", 0, lambda entry: True) == []
    assert channel.make_way("c", 5, lambda entry: True) == []
    assert channel.make_way("a", 5, lambda entry: True) == [1]
    assert take_all(channel) == [("b", 4)]  # "a" left the turn order once empty
