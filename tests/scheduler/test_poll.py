from __future__ import annotations

import pytest

from scheduler.poll import poll_plan


def test_every_node_once_and_offsets_spread_over_the_interval() -> None:
    index = {f"r{r}n{i:02d}": (f"r{r}", "ipmi", []) for r in range(3) for i in range(50)}
    plan = poll_plan(index, 60.0, 20)
    names = [n for c in plan for n in c.nodes]
    assert sorted(names) == sorted(index)
    assert len(plan) == 9  # 3 racks x ceil(50/20)
    offsets = [c.offset for c in plan]
    assert offsets == sorted(offsets)
    assert offsets[0] == 0 and offsets[-1] < 60
    assert max(b - a for a, b in zip(offsets, offsets[1:], strict=False)) == pytest.approx(60 / 9, abs=0.01)
    # racks interleaved: the first three chunks are three different racks
    assert len({c.rack for c in plan[:3]}) == 3


def test_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError):
        poll_plan({}, 0, 10)
