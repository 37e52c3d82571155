"""The retry policy, the adaptive limit on guests in flight and the retry
statistics (probe/retry.py), without a daemon: every step is taken by hand
(try_acquire, release), so no outcome depends on thread timing."""

from __future__ import annotations

import random
import threading

import pytest

from kvmcpuid_virt.errors import ProbeError
from kvmcpuid_virt.probe.retry import AdaptiveLimit, RetryPolicy, RetryStats, Slot


def test_backoff_is_jittered_within_half_to_full_ceiling_and_capped() -> None:
    policy = RetryPolicy(attempts=10, base=0.1, cap=1.0, total=60.0)
    rng = random.Random(1)
    for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        pauses = {policy.backoff(retry, rng) for _ in range(200)}
        assert all(ceiling / 2 <= p <= ceiling for p in pauses), retry
        assert len(pauses) > 100  # jittered, not one value


def test_policy_gives_up_on_tries_or_time() -> None:
    policy = RetryPolicy(attempts=3, base=0.1, cap=1.0, total=5.0)
    assert not policy.gives_up(1, 0.0, 0.1)
    assert policy.gives_up(3, 0.0, 0.1)  # the third try was the last
    assert policy.gives_up(1, 4.95, 0.1)  # the pause would end past the budget
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base=2.0, cap=1.0)


def _fill(limit: AdaptiveLimit) -> list[Slot]:
    slots = []
    while (slot := limit.try_acquire()) is not None:
        slots.append(slot)
    return slots


def test_limit_admits_up_to_its_value() -> None:
    limit = AdaptiveLimit(4)
    slots = _fill(limit)
    assert len(slots) == 4 and limit.in_flight == 4 and limit.peak == 4
    assert limit.try_acquire() is None


def test_a_refusal_halves_the_guests_in_flight_once_per_burst() -> None:
    limit = AdaptiveLimit(8)
    slots = _fill(limit)
    assert len(slots) == 8
    # Three of the eight started together are refused: one halving, from
    # the eight in flight, not three.
    for slot in slots[:3]:
        slot.refused = True
        limit.release(slot)
    assert limit.limit == 4 and limit.decreases == 1 and limit.lowest == 4
    for slot in slots[3:]:
        limit.release(slot)
    assert limit.in_flight == 0
    # A refusal of a guest started under the new limit halves it again.
    again = _fill(limit)
    assert len(again) == limit.limit
    again[0].refused = True
    limit.release(again[0])
    assert limit.decreases == 2 and limit.limit == len(again) // 2


def test_halving_starts_from_the_guests_in_flight_and_stops_at_the_minimum() -> None:
    limit = AdaptiveLimit(16, minimum=2)
    one = limit.try_acquire()
    assert one is not None
    one.refused = True
    limit.release(one)  # only one guest was in flight: 1 // 2, held at the minimum
    assert limit.limit == 2 and limit.lowest == 2


def test_successes_raise_the_limit_by_one_per_window_up_to_the_maximum() -> None:
    limit = AdaptiveLimit(6, initial=2)
    for expected in (3, 4, 5, 6, 6):
        # `limit` guests in a row that ran add one.
        for _ in range(limit.limit):
            slot = limit.try_acquire()
            assert slot is not None
            limit.release(slot)
        assert limit.limit == expected


def test_waiting_for_a_slot_stops_when_cancelled() -> None:
    limit = AdaptiveLimit(1)
    held = limit.try_acquire()
    assert held is not None
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ProbeError, match="probe cancelled"):
        limit.acquire(cancel)
    limit.release(held)
    with limit.slot(cancel=threading.Event()) as slot:
        assert slot is not None and limit.in_flight == 1
    assert limit.in_flight == 0


def test_stats_count_and_summarize() -> None:
    stats = RetryStats()
    limit = AdaptiveLimit(16)
    for _ in range(3):
        stats.guest()
    for _ in range(5):
        stats.attempt()
    stats.retried("cgroup-bpf-eagain", 0.25, "createXML: failed to load cgroup BPF prog")
    stats.retried("connection", 0.5, "state: Cannot write data: Broken pipe")
    stats.give_up("connection", "connect: Connection refused")
    doc = stats.as_json(limit)
    assert doc["guests"] == 3 and doc["attempts"] == 5
    assert doc["retries"] == {"cgroup-bpf-eagain": 1, "connection": 1}
    assert doc["gave_up"] == {"connection": 1} and doc["backoff_seconds"] == 0.75
    assert doc["messages"] == {"cgroup-bpf-eagain": "createXML: failed to load cgroup BPF prog",
                               "connection": "connect: Connection refused"}
    assert stats.summary(limit) == (
        "3 guests, 5 attempts, 2 retries (cgroup-bpf-eagain: 1, connection: 1), "
        "given up: connection: 1, 0.8 s backing off; "
        "in flight: at most 0, limit 16 of 16 (lowest 16, 0 decrease(s))")
