"""The poll schedule fires at its offset inside every interval, whatever the start time."""

from __future__ import annotations

from datetime import datetime, timezone

from workers.beat import offset_schedule


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)  # noqa: UP017


def test_due_once_per_interval_at_its_offset() -> None:
    now = [1000.0]
    sched = offset_schedule(60, 15, clock=lambda: now[0])
    # slot start at or before 1000 with offset 15: 975
    assert sched.slot_start(1000.0) == 975.0
    due, next_in = sched.is_due(at(960.0))
    assert due and next_in == 35.0
    due, _ = sched.is_due(at(976.0))
    assert not due
    now[0] = 1035.0
    due, _ = sched.is_due(at(976.0))
    assert due


def test_offset_wraps_into_the_interval() -> None:
    sched = offset_schedule(60, 75, clock=lambda: 0.0)
    assert sched.offset == 15.0
