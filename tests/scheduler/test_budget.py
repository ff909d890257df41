"""Power budgets and the power-on timeline (scheduler/budget.py)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.errors import SettingsError, ToolMissingError
from scheduler.budget import (
    NO_PDU,
    Budget,
    BudgetError,
    Budgets,
    PlanNode,
    Resource,
    Step,
    format_duration,
    nodes_from_index,
    parse_budgets,
    parse_duration,
    plan_timeline,
    plot_timeline,
    render_timeline,
    verify,
)
from scheduler.inventory import NodeInfo

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 10 ", 10.0),
        (".25s", 0.25),
        (7, 7.0),
        (0.2, 0.2),
    ],
)
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["", "soon", "10 sec", "-1s", "0s", 0, -2, True, None, [1],
                                 float("inf"), float("nan"), "1e3s"])
def test_bad_durations_name_their_path(raw: object) -> None:
    with pytest.raises(SettingsError, match=r"^budgets\.pdu\.window: "):
        parse_duration(raw, "budgets.pdu.window")


def test_format_duration() -> None:
    assert [format_duration(s) for s in (10.0, 0.5, 120.0, 90.0, 1.25)] == [
        "10s", "500ms", "2m", "90s", "1.25s"
    ]


def test_budgets_parse_and_round_trip() -> None:
    raw = {
        "pdu": {"max_starts": 8, "window": "10s"},
        "pdus": {"pdu-a1": {"max_starts": 4, "window": "500ms"}},
        "rack": {"max_starts": 20, "window": 10},
        "racks": {"r1": {"max_starts": 10, "window": "5s"}},
        "global": {"max_starts": 100, "window": "1m"},
    }
    budgets = parse_budgets(raw)
    assert budgets == Budgets(
        pdu=Budget(8, 10.0),
        pdus={"pdu-a1": Budget(4, 0.5)},
        rack=Budget(20, 10.0),
        racks={"r1": Budget(10, 5.0)},
        fleet=Budget(100, 60.0),
    )
    assert parse_budgets(budgets.to_dict()) == budgets
    assert budgets.for_pdu("pdu-a1") == Budget(4, 0.5)
    assert budgets.for_pdu("pdu-zz") == Budget(8, 10.0)
    assert budgets.for_pdu(None) is None
    assert budgets.for_rack("r1") == Budget(10, 5.0) and budgets.for_rack("r2") == Budget(20, 10.0)
    assert budgets.constraints("r2", "pdu-a1") == [
        (Resource("pdu", "pdu-a1"), Budget(4, 0.5)),
        (Resource("rack", "r2"), Budget(20, 10.0)),
        (Resource("global", ""), Budget(100, 60.0)),
    ]
    assert budgets.describe() == "pdu 8/10s (pdu-a1 4/500ms), rack 20/10s (r1 10/5s), global 100/1m"
    assert parse_budgets(None) == Budgets() and not Budgets()
    assert Budgets().describe() == "no budgets"


def test_budget_errors_list_every_path() -> None:
    raw = {
        "pdu": {"max_starts": 0, "window": "10s"},
        "pdus": {"pdu-a1": {"max_starts": 4, "window": "soon"}, "bad/name": {}},
        "rack": {"window": "1s", "burst": 3},
        "racks": [1],
        "global": "100 per 10s",
        "fleet": {},
    }
    with pytest.raises(BudgetError) as err:
        parse_budgets(raw)
    assert [path for path, _ in err.value.problems] == [
        "budgets.fleet",
        "budgets.pdu.max_starts",
        "budgets.pdus.pdu-a1.window",
        "budgets.pdus.bad/name",
        "budgets.rack.burst",
        "budgets.rack.max_starts",
        "budgets.racks",
        "budgets.global",
    ]
    assert isinstance(err.value, SettingsError)
    assert "budgets.pdus.pdu-a1.window: must be a duration" in err.value.message
    with pytest.raises(BudgetError, match="budgets: must be a mapping"):
        parse_budgets([])
    with pytest.raises(BudgetError, match=r"budgets.pdu.window: required"):
        parse_budgets({"pdu": {"max_starts": 3}})


# --------------------------------------------------------------------------- planning


def fleet(
    count: int, pdus: int, racks: int, *, storage_every: int = 0
) -> list[PlanNode]:
    """``count`` nodes spread over ``pdus`` PDUs, ``pdus / racks`` PDUs to a rack;
    every ``storage_every``-th node has priority 10."""
    per_rack = pdus // racks
    out: list[PlanNode] = []
    for i in range(count):
        pdu = i % pdus
        priority = 10 if storage_every and i % storage_every == 0 else 100
        out.append(PlanNode(f"node{i + 1:04d}", f"r{pdu // per_rack + 1}", f"pdu-{pdu + 1:02d}",
                            priority))
    return out


def same_resources_keep_priority_and_name_order(nodes: list[PlanNode], starts: dict[str, float]
                                                ) -> None:
    """Two nodes on the same rack and PDU start in (priority, natural name) order."""
    from scheduler.nodeset import natural_key

    groups: dict[tuple[str, str | None], list[PlanNode]] = {}
    for node in nodes:
        groups.setdefault((node.rack, node.pdu), []).append(node)
    for members in groups.values():
        members.sort(key=lambda n: (n.priority, natural_key(n.name)))
        times = [starts[n.name] for n in members]
        assert times == sorted(times)


def test_two_thousand_nodes_on_24_pdus_within_budget_and_near_the_minimum() -> None:
    nodes = fleet(2_100, 24, 6, storage_every=9)
    # one weak circuit and one small rack, so the bottleneck is not simply the global cap
    budgets = parse_budgets({
        "pdu": {"max_starts": 8, "window": "10s"},
        "pdus": {"pdu-07": {"max_starts": 3, "window": "10s"}},
        "rack": {"max_starts": 30, "window": "10s"},
        "racks": {"r6": {"max_starts": 12, "window": "5s"}},
        "global": {"max_starts": 150, "window": "10s"},
    })
    began = time.perf_counter()
    timeline = plan_timeline(nodes, budgets)
    elapsed = time.perf_counter() - began
    assert elapsed < 1.0, f"planning took {elapsed:.2f}s"

    assert sorted(timeline.starts) == sorted(n.name for n in nodes)
    assert verify(timeline.starts, budgets, nodes) == []
    assert timeline.verify() == []
    assert timeline.lower_bound == 290.0  # pdu-07: 88 nodes, 3 per 10 s
    assert timeline.lower_bound <= timeline.makespan <= timeline.lower_bound * 1.05
    same_resources_keep_priority_and_name_order(nodes, timeline.starts)
    # every PDU's budget holds at each step too (a cheap, independent check)
    for pdu, counts in timeline.per_resource_counts("pdu").items():
        assert max(counts.values()) <= budgets.for_pdu(pdu).max_starts  # type: ignore[union-attr]
    assert sum(sum(c.values()) for c in timeline.per_resource_counts("rack").values()) == 2_100


def test_global_cap_is_honoured() -> None:
    nodes = fleet(400, 40, 4)
    budgets = Budgets(pdu=Budget(10, 1.0), fleet=Budget(25, 3.0))
    timeline = plan_timeline(nodes, budgets)
    assert timeline.verify() == []
    counts = timeline.per_resource_counts("global")[""]
    assert max(counts.values()) == 25
    assert timeline.makespan == timeline.lower_bound == 15 * 3.0  # 400 / 25 = 16 windows
    # sliding, not fixed, windows: no 3 s span anywhere holds more than 25 starts
    times = sorted(timeline.starts.values())
    assert all(times[i + 25] - times[i] >= 3.0 for i in range(len(times) - 25))


def test_priority_order() -> None:
    nodes = [PlanNode(f"c{i}", "r1", f"p{i % 4}", 100) for i in range(40)]
    nodes += [PlanNode(f"s{i}", "r1", f"p{i % 4}", 10) for i in range(12)]
    budgets = Budgets(pdu=Budget(2, 10.0), rack=Budget(6, 10.0))
    timeline = plan_timeline(nodes, budgets)
    assert timeline.verify() == []
    storage = [timeline.starts[f"s{i}"] for i in range(12)]
    compute = [timeline.starts[f"c{i}"] for i in range(40)]
    assert max(storage) <= min(compute)
    assert max(storage) == 10.0 and timeline.makespan == timeline.lower_bound == 80.0


def test_lower_priority_fills_slots_a_busy_pdu_leaves_free() -> None:
    # the priority-10 nodes all draw from pdu-a (2 per 10 s): pdu-b's nodes need not wait
    nodes = [PlanNode(f"s{i}", "r1", "pdu-a", 10) for i in range(4)]
    nodes += [PlanNode(f"c{i}", "r1", "pdu-b", 100) for i in range(4)]
    timeline = plan_timeline(nodes, Budgets(pdu=Budget(2, 10.0)))
    assert [s.offset for s in timeline.steps()] == [0.0, 10.0]
    assert timeline.steps()[0] == Step(0.0, ["c0", "c1", "s0", "s1"])


def test_a_lower_priority_never_delays_a_higher_one() -> None:
    # the compute node could start first on the free pdu-b, but then it would take the
    # rack's only slot at 0 and push the storage node back: it waits instead
    nodes = [PlanNode("s1", "r1", "pdu-a", 10), PlanNode("s2", "r1", "pdu-a", 10),
             PlanNode("c1", "r1", "pdu-b", 100)]
    timeline = plan_timeline(nodes, Budgets(pdu=Budget(1, 10.0), rack=Budget(1, 5.0)))
    assert timeline.starts == {"s1": 0.0, "c1": 5.0, "s2": 10.0}


def test_a_lower_priority_respects_later_higher_priority_starts() -> None:
    # s1, s2 (rack r1: 1 per 5 s) start at 0 and 5 on pdu-p (2 per 10 s). c1 shares
    # pdu-p from another rack: at 0 the window ending at 0 has room, but [0, 10) would
    # then hold three starts; its first slot is 10
    nodes = [PlanNode("s1", "r1", "pdu-p", 10), PlanNode("s2", "r1", "pdu-p", 10),
             PlanNode("c1", "r2", "pdu-p", 100)]
    budgets = Budgets(pdu=Budget(2, 10.0), racks={"r1": Budget(1, 5.0)})
    timeline = plan_timeline(nodes, budgets)
    assert timeline.starts == {"s1": 0.0, "s2": 5.0, "c1": 10.0}
    assert timeline.verify() == []


def test_the_bottleneck_is_not_starved_by_name_order() -> None:
    # "b" nodes sort first by name but have a roomier PDU; the global cap is shared
    nodes = [PlanNode(f"a{i:03d}", "r1", "pdu-slow", 100) for i in range(100)]
    nodes += [PlanNode(f"b{i:03d}", "r1", "pdu-fast", 100) for i in range(100)]
    budgets = Budgets(
        pdus={"pdu-slow": Budget(5, 10.0), "pdu-fast": Budget(10, 10.0)},
        fleet=Budget(10, 10.0),
    )
    timeline = plan_timeline(nodes, budgets)
    assert timeline.verify() == []
    assert timeline.makespan == timeline.lower_bound == 190.0


def test_unbudgeted_nodes_start_at_once_and_edge_cases() -> None:
    nodes = [PlanNode("n1", "r1"), PlanNode("n2", "r1", "pdu-x"), ("n3", "r2", None, 5)]
    timeline = plan_timeline(nodes, Budgets(), start=1_700_000_000.0)
    assert timeline.starts == {"n1": 0.0, "n2": 0.0, "n3": 0.0}
    assert timeline.makespan == timeline.lower_bound == 0.0
    assert timeline.at("n2") == 1_700_000_000.0
    assert set(timeline.absolute().values()) == {1_700_000_000.0}
    assert timeline.per_resource_counts("pdu") == {"pdu-x": {0.0: 1}, NO_PDU: {0.0: 2}}
    empty = plan_timeline([], Budgets(fleet=Budget(1, 1.0)))
    assert (len(empty), empty.makespan, empty.steps()) == (0, 0.0, [])
    with pytest.raises(SettingsError, match=r"more than once: n1"):
        plan_timeline([PlanNode("n1", "r"), PlanNode("n1", "r")], Budgets())
    with pytest.raises(ValueError, match="kind"):
        timeline.per_resource_counts("room")


def test_sub_second_windows() -> None:
    nodes = [PlanNode(f"n{i}", "r1", "p1") for i in range(50)]
    budgets = Budgets(pdu=Budget(3, 0.1), rack=Budget(7, 0.3))
    timeline = plan_timeline(nodes, budgets)
    assert timeline.verify() == []
    assert timeline.makespan <= timeline.lower_bound * 1.05


def test_nodes_from_index() -> None:
    index = {
        "a": NodeInfo("r1", "manual", (), "pdu-1", 10),
        "b": NodeInfo("r2", "manual", ()),
    }
    assert nodes_from_index(["b", "a"], index) == [
        PlanNode("b", "r2", None, 100),
        PlanNode("a", "r1", "pdu-1", 10),
    ]
    with pytest.raises(SettingsError, match=r"unknown node\(s\): x\[1-2\]"):
        nodes_from_index(["a", "x1", "x2"], index)


# --------------------------------------------------------------------------- verify


def test_verify_catches_violations() -> None:
    nodes = [PlanNode(f"n{i}", "r1", "pdu-a1") for i in range(1, 11)]
    budgets = Budgets(pdu=Budget(4, 10.0))
    # five at once: one too many
    starts = {f"n{i}": 0.0 for i in range(1, 6)}
    [violation] = verify(starts, budgets, nodes)
    assert violation.resource == Resource("pdu", "pdu-a1")
    assert (violation.worst, violation.nodes) == (5, ("n1", "n2", "n3", "n4", "n5"))
    assert str(violation) == (
        "pdu:pdu-a1: 5 starts within 10s (budget 4/10s) between 0 and 0: n[1-5]"
    )
    # a sliding window, not fixed steps: 4 at 0 then 4 at 9.9 is 8 within 10 s
    starts = {f"n{i}": 0.0 if i <= 4 else 9.9 for i in range(1, 9)}
    [violation] = verify(starts, budgets, nodes)
    assert violation.worst == 8 and violation.nodes == tuple(f"n{i}" for i in range(1, 9))
    # exactly a window apart is fine, as is real clock jitter within the tolerance
    origin = 1_700_000_000.0
    starts = {f"n{i}": origin + (0.0 if i <= 4 else 10.0 - 2e-7) for i in range(1, 9)}
    assert verify(starts, budgets, nodes) == []
    # two separate runs are reported separately; rack and global budgets are checked too
    starts = {f"n{i}": (0.0 if i <= 5 else 100.0) for i in range(1, 11)}
    both = Budgets(pdu=Budget(4, 10.0), rack=Budget(9, 1000.0), fleet=Budget(20, 1.0))
    found = verify(starts, both, nodes)
    assert [(str(v.resource), v.worst, v.first, v.last) for v in found] == [
        ("pdu:pdu-a1", 5, 0.0, 0.0),
        ("pdu:pdu-a1", 5, 100.0, 100.0),
        ("rack:r1", 10, 0.0, 100.0),
    ]
    # a node that never started is not counted
    assert verify({"n1": 0.0}, budgets, nodes) == []


def test_verify_refuses_unknown_nodes_and_bad_times() -> None:
    nodes = [PlanNode("n1", "r1", "p")]
    with pytest.raises(SettingsError, match="not in the plan: ghost"):
        verify({"n1": 0.0, "ghost": 1.0}, Budgets(), nodes)
    with pytest.raises(SettingsError, match="not finite"):
        verify({"n1": math.nan}, Budgets(), nodes)


# --------------------------------------------------------------------------- display


def test_render_timeline() -> None:
    nodes = [PlanNode(f"node{i:03d}", "r1", f"pdu-a{1 + (i - 1) % 2}") for i in range(1, 11)]
    nodes.append(PlanNode("desk", "lab"))
    budgets = Budgets(pdu=Budget(4, 10.0), rack=Budget(5, 2.5))
    timeline = plan_timeline(nodes, budgets)
    assert render_timeline(timeline, nodes).splitlines() == [
        "11 nodes in 3 steps over 10s (lower bound 10s); budgets: pdu 4/10s, rack 5/2.5s",
        "+0.0s   6 nodes  pdu-a1:3 pdu-a2:2 (no pdu):1  desk,node[001-005]",
        "+2.5s   3 nodes  pdu-a1:1 pdu-a2:2  node[006-008]",  # pdu-a1 has its 4 in 10 s
        "+10.0s  2 nodes  pdu-a1:1 pdu-a2:1  node[009-010]",
    ]
    assert render_timeline(timeline) == render_timeline(timeline, nodes)
    assert timeline.to_dict()["steps"][1] == {"offset": 2.5, "count": 3, "nodes": "node[006-008]"}
    odd = plan_timeline(nodes[:3], Budgets(pdu=Budget(1, 0.125)))
    assert render_timeline(odd).splitlines()[1:] == [
        "+0.0s    2 nodes  pdu-a1:1 pdu-a2:1  node[001-002]",
        "+0.125s  1 node   pdu-a1:1  node003",
    ]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    nodes = fleet(600, 24, 6, storage_every=7)
    budgets = Budgets(pdu=Budget(8, 10.0), rack=Budget(30, 10.0), fleet=Budget(100, 10.0))
    timeline = plan_timeline(nodes, budgets)
    path = plot_timeline(timeline, nodes, tmp_path / "timeline.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    timeline = plan_timeline([PlanNode("n1", "r1")], Budgets())
    with pytest.raises(ToolMissingError, match=r"pip install 'powerq\[plot\]'"):
        plot_timeline(timeline, None, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- properties

WINDOWS = st.sampled_from([0.1, 0.25, 0.3, 1.0, 2.0, 2.5, 5.0, 10.0])
BUDGET = st.builds(Budget, st.integers(1, 5), WINDOWS)


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[PlanNode], Budgets]:
    pdus = [f"p{i}" for i in range(draw(st.integers(1, 5)))]
    racks = [f"r{i}" for i in range(draw(st.integers(1, 3)))]
    count = draw(st.integers(0, 40))
    nodes = [
        PlanNode(
            f"n{i}",
            draw(st.sampled_from(racks)),
            draw(st.sampled_from([*pdus, None])),
            draw(st.sampled_from([10, 50, 100])),
        )
        for i in range(count)
    ]
    budgets = Budgets(
        pdu=draw(st.none() | BUDGET),
        pdus=draw(st.dictionaries(st.sampled_from(pdus), BUDGET, max_size=2)),
        rack=draw(st.none() | BUDGET),
        racks=draw(st.dictionaries(st.sampled_from(racks), BUDGET, max_size=2)),
        fleet=draw(st.none() | BUDGET),
    )
    return nodes, budgets


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_plans_never_violate_a_budget(case: tuple[list[PlanNode], Budgets]) -> None:
    nodes, budgets = case
    timeline = plan_timeline(nodes, budgets)
    assert sorted(timeline.starts) == sorted(n.name for n in nodes)  # each exactly once
    assert sum(len(s.nodes) for s in timeline.steps()) == len(nodes)
    assert all(offset >= 0 and math.isfinite(offset) for offset in timeline.starts.values())
    assert verify(timeline.starts, budgets, nodes) == []
    assert timeline.makespan >= timeline.lower_bound - 1e-9
    same_resources_keep_priority_and_name_order(nodes, timeline.starts)
    # the first node of the plan starts at once, and the highest class's first node too
    if nodes:
        assert min(timeline.starts.values()) == 0.0


def brute_force_ok(starts: dict[str, float], budgets: Budgets, nodes: list[PlanNode]) -> bool:
    """Every window opening at a start holds at most its budget: verify's meaning, naively."""
    by_name = {n.name: n for n in nodes}
    for resource_node in nodes:
        for resource, budget in budgets.constraints(resource_node.rack, resource_node.pdu):
            members = [
                starts[n] for n in starts
                if resource in {r for r, _ in budgets.constraints(by_name[n].rack, by_name[n].pdu)}
            ]
            for s in members:
                if sum(1 for x in members if s <= x < s + budget.window - 1e-6) > budget.max_starts:
                    return False
    return True


@settings(max_examples=200, deadline=None)
@given(fleets(), st.lists(st.sampled_from([0.0, 0.1, 0.25, 1.0, 2.0, 2.5, 4.9, 5.0]), max_size=40))
def test_verify_agrees_with_brute_force(
    case: tuple[list[PlanNode], Budgets], times: list[float]
) -> None:
    nodes, budgets = case
    starts = {n.name: times[i] for i, n in enumerate(nodes) if i < len(times)}
    found = verify(starts, budgets, nodes)
    assert (found == []) == brute_force_ok(starts, budgets, nodes)
    if nodes:
        assert brute_force_ok(plan_timeline(nodes, budgets).starts, budgets, nodes)


@settings(max_examples=150, deadline=None)
@given(fleets(), st.integers(0, 39), st.floats(-0.5, 0.5))
def test_verify_sees_a_node_moved_into_a_full_window(
    case: tuple[list[PlanNode], Budgets], which: int, shift: float
) -> None:
    """Moving one start anywhere is either still within budget, or verify says which
    resource broke, and that resource is one of the moved node's."""
    nodes, budgets = case
    if not nodes:
        return
    timeline = plan_timeline(nodes, budgets)
    node = nodes[which % len(nodes)]
    starts = dict(timeline.starts)
    starts[node.name] = max(0.0, starts[node.name] + shift * 10)
    for violation in verify(starts, budgets, nodes):
        assert node.name in violation.nodes
        assert violation.resource in {r for r, _ in budgets.constraints(node.rack, node.pdu)}
        assert violation.worst > violation.budget.max_starts
