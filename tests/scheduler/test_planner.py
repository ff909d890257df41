"""Planning: blast radius, the power-on timeline in the plan, and what submit records."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import redis

from scheduler.budget import parse_budgets
from scheduler.inventory import NodeInfo
from scheduler.planner import (
    BlastRadiusExceeded,
    ConfirmationRequired,
    PlanError,
    check_blast_radius,
    make_plan,
    submit,
)
from scheduler.store import Store

LIMITS = SimpleNamespace(confirm_threshold=20, confirm_racks=1, max_nodes=100, max_racks=3)


def index(racks: int, per_rack: int, pdus: int = 2) -> dict[str, NodeInfo]:
    out = {}
    for r in range(1, racks + 1):
        for i in range(1, per_rack + 1):
            out[f"n{r}-{i:03d}"] = NodeInfo(f"r{r}", "manual", (), f"r{r}-pdu{i % pdus}",
                                            10 if i <= 2 else 100)
    return out


@pytest.mark.parametrize(("racks", "per_rack", "yes", "force", "error"), [
    (1, 20, False, False, None),                     # at the threshold: fine
    (1, 21, False, False, ConfirmationRequired),     # one node more: ask
    (2, 2, False, False, ConfirmationRequired),      # two racks: ask
    (1, 21, True, False, None),
    (1, 101, True, False, BlastRadiusExceeded),      # over the maximum: --yes is not enough
    (4, 2, True, False, BlastRadiusExceeded),        # too many racks
    (1, 101, True, True, None),
    (1, 101, False, True, ConfirmationRequired),     # --force does not imply --yes
])
def test_blast_radius(racks: int, per_rack: int, yes: bool, force: bool, error: type[Exception] | None) -> None:
    for action in ("off", "cycle"):
        plan = make_plan(action, "@all", index(racks, per_rack), chunk_size=50)
        if error is None:
            check_blast_radius(plan, LIMITS, yes=yes, force=force)
        else:
            with pytest.raises(error) as info:
                check_blast_radius(plan, LIMITS, yes=yes, force=force)
            assert info.value.code in ("confirmation_required", "blast_radius_exceeded")


def test_on_query_and_boot_have_no_blast_radius() -> None:
    for action in ("on", "query"):
        check_blast_radius(make_plan(action, "@all", index(5, 50), chunk_size=50), LIMITS)


def test_zero_means_no_maximum() -> None:
    plan = make_plan("off", "@all", index(5, 50), chunk_size=50)
    check_blast_radius(plan, SimpleNamespace(confirm_threshold=20, confirm_racks=1, max_nodes=0, max_racks=0),
                       yes=True)


BUDGETS = parse_budgets({"pdu": {"max_starts": 2, "window": "5s"}})


def test_on_under_budgets_gets_a_timeline_and_one_chunk_per_rack_in_its_order() -> None:
    plan = make_plan("on", "@all", index(2, 30), chunk_size=7, budgets=BUDGETS)
    assert plan.timeline is not None and len(plan.timeline) == 60
    assert [rack for rack, _ in plan.chunks] == ["r1", "r2"]
    for _, nodes in plan.chunks:
        offsets = [plan.timeline.starts[n] for n in nodes]
        assert offsets == sorted(offsets)
        assert nodes[:2] == sorted(n for n in nodes if index(2, 30)[n].priority == 10)[:2]
    assert plan.timeline.verify() == []


def test_without_budgets_or_for_other_actions_there_is_no_timeline() -> None:
    assert make_plan("on", "@all", index(1, 30), chunk_size=7).timeline is None
    for action in ("off", "query"):
        plan = make_plan(action, "@all", index(1, 30), chunk_size=7, budgets=BUDGETS)
        assert plan.timeline is None
        assert [len(n) for _, n in plan.chunks] == [7, 7, 7, 7, 2]


def test_submit_sets_the_origin_and_each_chunk_carries_its_offsets(redis_client: redis.Redis, prefix: str) -> None:
    store = Store(redis_client, prefix)
    plan = make_plan("cycle", "@all", index(2, 10), chunk_size=50, budgets=BUDGETS)
    sent: list[dict[str, Any]] = []

    def send(job_id: str, p: Any) -> int:
        sent.extend(p.options_for(nodes) for _, nodes in p.chunks)
        return len(p.chunks)

    before = store.now()
    job_id = submit(plan, store, racks_without_worker=lambda racks: [], send=send, requested_by="test",
                    lead=3.0)
    job = store.job(job_id)
    assert job is not None
    assert before + 3.0 <= job["origin"] <= store.now() + 3.0
    assert job["makespan"] == plan.timeline.makespan  # type: ignore[union-attr]
    assert [set(o["release"]["offsets"]) for o in sent] == [set(n) for _, n in plan.chunks]
    assert all(o["release"]["origin"] == job["origin"] for o in sent)


def test_refused_submit_records_nothing(redis_client: redis.Redis, prefix: str) -> None:
    store = Store(redis_client, prefix)
    plan = make_plan("on", "@all", index(2, 3), chunk_size=50, budgets=BUDGETS)
    with pytest.raises(PlanError):
        submit(plan, store, racks_without_worker=lambda racks: ["r2"], send=lambda j, p: 0, requested_by="t")
    assert store.recent_jobs() == []


def test_cancel_marks_the_job_and_a_finished_job_stays_as_it_was(redis_client: redis.Redis, prefix: str) -> None:
    store = Store(redis_client, prefix)
    store.create_job("j1", action="on", nodeset="x", nodes=2, chunks=1, options={}, requested_by="t")
    job = store.cancel("j1", "cli:op")
    assert job is not None and job["status"] == "cancelling" and job["cancel"]["by"] == "cli:op"
    store.chunk_started("j1")
    assert store.job("j1")["status"] == "cancelling"  # type: ignore[index]
    assert store.chunk_finished("j1")
    assert store.job("j1")["status"] == "cancelled"  # type: ignore[index]
    store.create_job("j2", action="on", nodeset="x", nodes=1, chunks=1, options={}, requested_by="t")
    store.chunk_finished("j2")
    assert store.cancel("j2", "cli:op")["status"] == "done"  # type: ignore[index]
    assert store.cancel("nope", "cli:op") is None


def test_enlist_options_and_power_types() -> None:
    from scheduler.planner import check_options

    assert check_options("enlist", {}) == {"username": "powerq"}
    assert check_options("enlist", {"username": "ops.bmc-1"}) == {"username": "ops.bmc-1"}
    for bad in ("has space", "x" * 17, "semi;colon", "tab\there"):
        with pytest.raises(PlanError):
            check_options("enlist", {"username": bad})
    with pytest.raises(PlanError) as info:
        make_plan("enlist", "@all", index(1, 2), chunk_size=10)
    assert "cannot create BMC users" in info.value.message
