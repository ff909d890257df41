"""Budget admission in Redis (workers/release.py), against a real Redis server."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from scheduler.budget import parse_budgets
from workers.policy import Cancelled
from workers.release import Admission, BudgetSlot, CancelWatch, Release


@pytest.fixture()
def admission(redis_client: redis.Redis, prefix: str) -> Admission:
    return Admission(redis_client, prefix)


def test_slots_follow_the_nodes_pdu_rack_and_global_budgets(admission: Admission) -> None:
    budgets = parse_budgets({"pdu": {"max_starts": 8, "window": "10s"},
                             "racks": {"r1": {"max_starts": 20, "window": "10s"}},
                             "global": {"max_starts": 100, "window": "1m"}})
    slots = admission.slots(budgets, "r1", "pdu-a")
    p = admission.prefix
    assert sorted((s.key, s.max_starts, s.window) for s in slots) == sorted([
        (f"{p}:budget:pdu:pdu-a", 8, 10.0), (f"{p}:budget:global:", 100, 60.0),
        (f"{p}:budget:rack:r1", 20, 10.0),
    ])
    assert [(s.key, s.max_starts) for s in admission.slots(budgets, "r2", None)] == [
        (f"{p}:budget:global:", 100)]


def test_at_most_max_starts_within_the_window_then_the_wait_until_the_oldest_leaves(
    admission: Admission, prefix: str,
) -> None:
    slot = BudgetSlot(f"{prefix}:budget:pdu:a", 3, 0.6)
    times = []
    for i in range(3):
        ok, at = admission.try_admit([slot], f"n{i}", 0.0)
        assert ok
        times.append(at)
    ok, wait = admission.try_admit([slot], "n3", 0.0)
    assert not ok and 0.0 < wait <= 0.6
    time.sleep(wait + 0.01)
    ok, at = admission.try_admit([slot], "n3", 0.0)
    assert ok and at - times[0] >= 0.6


def test_every_budget_must_have_room_and_a_refusal_takes_no_slot(admission: Admission, prefix: str) -> None:
    small = BudgetSlot(f"{prefix}:budget:pdu:b", 1, 30.0)
    big = BudgetSlot(f"{prefix}:budget:rack:r", 10, 30.0)
    assert admission.try_admit([small, big], "n1", 0.0)[0]
    assert not admission.try_admit([small, big], "n2", 0.0)[0]
    assert admission.client.zcard(big.key) == 1  # n2 was not counted in the rack budget


def test_not_before_is_read_on_the_redis_clock(admission: Admission, prefix: str) -> None:
    slot = BudgetSlot(f"{prefix}:budget:global:", 100, 1.0)
    ok, wait = admission.try_admit([slot], "n1", admission.now() + 5.0)
    assert not ok and 4.0 < wait <= 5.0


def test_release_waits_for_its_turn_and_a_cancel_wakes_it(admission: Admission, redis_client: redis.Redis,
                                                          prefix: str) -> None:
    job_key = f"{prefix}:job:j1"
    redis_client.hset(job_key, "status", "running")
    watch = CancelWatch(redis_client, job_key, interval=0.05).start()
    try:
        gate = Release(admission, [], "n1", admission.now() + 30.0, watch,
                       clock_offset=admission.now() - time.time())
        raised: list[BaseException] = []

        def wait() -> None:
            try:
                gate.wait_turn()
            except Cancelled as exc:
                raised.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.2)
        assert thread.is_alive()
        redis_client.hset(job_key, "cancel", "{}")
        thread.join(5)
        assert not thread.is_alive() and raised
    finally:
        watch.stop()


def test_admit_waits_for_room_and_records_the_start(admission: Admission, prefix: str, redis_client: redis.Redis) -> None:
    slot = BudgetSlot(f"{prefix}:budget:pdu:c", 1, 0.5)
    watch = CancelWatch(redis_client, None)
    first = Release(admission, [slot], "n1", 0.0, watch)
    second = Release(admission, [slot], "n2", 0.0, watch)
    a = first.admit()
    b = second.admit(cancellable=False)
    assert b - a >= 0.5 and second.admitted_at == b


def test_readmit_takes_a_further_slot_and_keeps_the_earlier_one(
    admission: Admission, prefix: str, redis_client: redis.Redis,
) -> None:
    # A retried power-on: its first attempt may have started the node, so that slot stays
    # counted, and the retry waits for a slot of its own within the budget.
    slot = BudgetSlot(f"{prefix}:budget:pdu:d", 2, 0.5)
    watch = CancelWatch(redis_client, None)
    gate = Release(admission, [slot], "n1", 0.0, watch)
    first = gate.admit()
    again = gate.readmit(2)
    assert redis_client.zcard(slot.key) == 2
    third = gate.readmit(3)  # the window holds two starts: wait until the first leaves it
    assert third - first >= 0.5 and again >= first and gate.admitted_at == third


def test_a_start_counts_from_when_its_call_returned(
    admission: Admission, prefix: str, redis_client: redis.Redis,
) -> None:
    # The BMC ran the power-on somewhere between the slot and the call's return: the next
    # start in the budget waits a window from the return, so it is a window apart at the BMCs.
    slot = BudgetSlot(f"{prefix}:budget:pdu:e", 1, 0.4)
    watch = CancelWatch(redis_client, None)
    first = Release(admission, [slot], "n1", 0.0, watch)
    admitted = first.admit()
    time.sleep(0.2)  # the call to the BMC
    first.sent()
    returned = float(redis_client.zscore(slot.key, "n1"))  # type: ignore[arg-type]
    assert returned - admitted >= 0.2
    second = Release(admission, [slot], "n2", 0.0, watch).admit(cancellable=False)
    assert second - returned >= 0.4
    first.sent(2)  # a retry's slot that already left the window is counted again
    assert redis_client.zscore(slot.key, "n1#2") is not None
