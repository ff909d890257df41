"""Issue 6's done-when, on real parts: a budgeted power-on of 2,000 simulated IPMI BMCs
across 20 PDUs and 4 racks, planned by ``powerq on``, run by four real rack workers, and
checked against the start times the workers recorded: no budget exceeded, and the last
start within 5 % of the plan's minimum. Then ``powerq job cancel`` on a running timeline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.budget import nodes_from_index, parse_budgets, verify
from scheduler.inventory import NodeInfo
from tests.fullpath import FullPath
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode

pytestmark = pytest.mark.integration

RACKS = ("p1", "p2", "p3", "p4")
PER_RACK = 500
PDUS_PER_RACK = 5
WINDOW = 2.0
BUDGETS = {
    "pdu": {"max_starts": 8, "window": f"{WINDOW:g}s"},
    "rack": {"max_starts": 36, "window": f"{WINDOW:g}s"},
    "global": {"max_starts": 140, "window": f"{WINDOW:g}s"},
}


def _pdu(rack: str, i: int) -> str:
    return f"{rack}-pdu{(i % PDUS_PER_RACK) + 1}"


@pytest.fixture(scope="module")
def plan_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FullPath, ipmi_bmc.IpmiFleet, list[SimNode]]]:
    workdir = Path(tmp_path_factory.mktemp("power-plan"))
    nodes: list[SimNode] = []
    for r, rack in enumerate(RACKS):
        nodes += ipmi_bmc.make_nodes(PER_RACK, rack, first_address=f"127.40.{r * 2 + 1}.1",
                                     prefix="pp", password="plan-Pass-01")
    fleet = ipmi_bmc.start_fleet(nodes, workdir / "bmcs", shard_size=500)
    fp = FullPath(workdir, racks=RACKS, POWERQ_CONFIRM_INTERVAL="0.5", POWERQ_CALL_TIMEOUT="5",
                  POWERQ_MAX_ATTEMPTS="3", POWERQ_NODE_CONCURRENCY="48", POWERQ_RELEASE_LEAD="2")
    try:
        fp.start()
        entries = []
        for node in nodes:
            i = int(node.name.rsplit("-", 1)[1]) - 1
            entry = node.inventory_entry()
            entry["pdu"] = _pdu(node.rack, i)
            if i < 40:
                entry["priority"] = 10  # "storage" first
            entries.append(entry)
        fp.load(entries, budgets=BUDGETS)
        yield fp, fleet, nodes
    finally:
        fp.stop()
        fleet.stop()


def _job_results(fp: FullPath, job_id: str) -> dict[str, Any]:
    out = fp.pq("job", "show", job_id, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_dry_run_prints_the_timeline_and_plots_it(plan_stack: tuple[FullPath, Any, Any], tmp_path: Path) -> None:
    fp, _, _ = plan_stack
    png = tmp_path / "timeline.png"
    out = fp.pq("on", "@all", "--dry-run", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert "2000 node(s)" in out.stdout and "timeline plot:" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(fp.pq("on", "@all", "--dry-run", "--json").stdout)
    timeline = data["plan"]["timeline"]
    assert timeline["nodes"] == 2000
    assert timeline["makespan"] == pytest.approx(timeline["lower_bound"])
    assert len(data["plan"]["queues"]) == len(RACKS)  # one message per rack
    assert len(fp.pq("job", "list").stdout.strip().splitlines()) == 2  # header only: nothing ran


def test_two_thousand_nodes_start_within_every_budget_and_on_time(
    plan_stack: tuple[FullPath, ipmi_bmc.IpmiFleet, list[SimNode]],
) -> None:
    fp, fleet, nodes = plan_stack
    out = fp.pq("on", "@all", "--json", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = json.loads(out.stdout)["job"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        data = _job_results(fp, job_id)
        if data["job"]["status"] in ("done", "failed") and data["job"]["done"] == 2000:
            break
        time.sleep(1)
    else:
        pytest.fail(f"job did not finish: {data['job']}\n{fp.worker_log()[-3000:]}")
    job, results = data["job"], {r["node"]: r for r in data["results"]}
    failed = {n: r["error"] for n, r in results.items() if r["outcome"] != "ok"}
    assert not failed, list(failed.items())[:5]
    peers = fleet.nodes()
    assert all(peers[n.name]["power"] == "on" for n in nodes)
    assert all(peers[n.name]["counts"].get("on") == 1 for n in nodes)

    starts = {n: r["power_on_at"] for n, r in results.items()}
    assert all(isinstance(t, float) for t in starts.values())
    info = {e.name: NodeInfo(e.rack, "ipmi", (), _pdu(e.rack, int(e.name.rsplit("-", 1)[1]) - 1))
            for e in nodes}
    budgets = parse_budgets(BUDGETS)
    # No budget exceeded, counted on the start times the workers recorded.
    assert verify(starts, budgets, nodes_from_index(starts, info)) == []
    # No node started before its planned time.
    assert all(r["power_on_at"] >= r["planned_at"] - 0.01 for r in results.values())
    # The last start within 5 % of the plan's minimum (its lower bound), from time zero.
    finish = max(starts.values()) - job["origin"]
    assert job["makespan"] == pytest.approx(job["lower_bound"])
    print(f"2000-node power-on: last start at +{finish:.2f}s, plan minimum {job['lower_bound']:.2f}s")
    assert finish <= 1.05 * job["lower_bound"], (finish, job["lower_bound"])
    # Priority 10 nodes all started before any priority-100 node of the same PDU.
    for rack in RACKS:
        first = [starts[f"pp-{rack}-{i:04d}"] for i in range(1, 41)]
        rest = [starts[f"pp-{rack}-{i:04d}"] for i in range(41, PER_RACK + 1)]
        assert min(rest) >= min(first)


def test_cancel_stops_releasing_and_reports_what_ran(
    plan_stack: tuple[FullPath, ipmi_bmc.IpmiFleet, list[SimNode]],
) -> None:
    fp, fleet, nodes = plan_stack
    names = [n.name for n in nodes if n.rack == "p1"][:200]
    for name in names:
        fleet.set_state(name, "off")
    fleet.reset()
    out = fp.pq("on", ",".join(names), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = json.loads(out.stdout)["job"]
    time.sleep(4.5)  # lead 2 s, then a few windows of starts
    cancel = fp.pq("job", "cancel", job_id, "--json", "--timeout", "60")
    assert cancel.returncode == 0, cancel.stderr
    report = json.loads(cancel.stdout)
    assert report["job"]["status"] == "cancelled"
    ran, stopped = set(report["ran"]), set(report["cancelled"])
    assert ran and stopped and not ran & stopped
    assert ran | stopped == set(names)
    peers = fleet.nodes()
    for name in ran:
        assert peers[name]["power"] == "on" and peers[name]["counts"].get("on") == 1, name
    for name in stopped:
        assert peers[name]["power"] == "off" and not peers[name]["counts"].get("on"), name
    again = fp.pq("job", "cancel", job_id, "--json")
    assert json.loads(again.stdout)["job"]["status"] == "cancelled"  # idempotent
    unknown = fp.pq("job", "cancel", "no-such-job")
    assert unknown.returncode == 2 and "no job" in unknown.stderr
