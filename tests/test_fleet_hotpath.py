"""The IPMI fleet hot path (issue 4) through the full path: CLI -> rack queue -> worker ->
pyghmi's BMC server. A worker reads a chunk's IPMI nodes in one batch on its RMCP+ client,
keeps the sessions across jobs (a warm read is one Get Chassis Status, no new login), and
its power actions go over the same sessions."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fullpath import FullPath
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode

pytestmark = pytest.mark.integration

N = 40


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ipmi_bmc.IpmiFleet, list[SimNode]]]:
    nodes = ipmi_bmc.make_nodes(N, "fp", first_address="127.60.0.1", prefix="hot", power="on")
    sim = ipmi_bmc.start_fleet(nodes, Path(tmp_path_factory.mktemp("hotpath")), shard_size=20)
    yield sim, nodes
    sim.stop()


def test_polls_reuse_sessions_and_read_in_one_round_trip(
    fullpath: FullPath, fleet: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]
) -> None:
    sim, nodes = fleet
    names = [n.name for n in nodes]
    for name in names[::3]:
        sim.set_state(name, "off")
    fullpath.load(n.inventory_entry() for n in nodes)
    sim.reset()
    jobs = [fullpath.run("query", "@all") for _ in range(3)]
    peers = sim.nodes()
    for job in jobs:
        assert job["returncode"] == 0, job
        assert sorted(job["by_node"]) == sorted(names)
        for name in names:
            assert job["by_node"][name]["state_after"] == peers[name]["power"], name
        # One broker message per rack chunk, whatever the number of nodes.
        chunk_size = 200
        assert job["job"]["chunks"] == math.ceil(N / chunk_size), job["job"]
    for name in names:
        counts = peers[name]["counts"]
        # Three jobs, one login: the worker kept its session across jobs ...
        assert counts["sessions"] == 1, (name, counts)
        # ... and each read was one Get Chassis Status (no Get Device ID, no re-login).
        assert counts["query"] == 3, (name, counts)
        assert counts["open_sessions"] == 1, (name, counts)
    # The store knows every node's state and its age.
    status = fullpath.pq_json("status", "@all")
    assert {n["node"]: n["state"] for n in status["nodes"]} == {n: peers[n]["power"] for n in names}
    assert status["state_age"]["never_read"] == 0
    assert status["state_age"]["percentiles"]["max"] < 120


def test_actions_go_over_the_kept_sessions(
    fullpath: FullPath, fleet: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]
) -> None:
    sim, nodes = fleet
    names = [n.name for n in nodes[:10]]
    for name in names:
        sim.set_state(name, "on")
    fullpath.load(n.inventory_entry() for n in nodes)
    fullpath.run("query", "@all")  # sessions open
    sim.reset()
    job = fullpath.run("cycle", ",".join(names))
    assert job["returncode"] == 0, job
    peers = sim.nodes()
    for name in names:
        counts = peers[name]["counts"]
        assert (counts["off"], counts["on"]) == (1, 1), (name, counts)
        assert counts["sessions"] == 0, (name, counts)  # no new login for the actions
        assert peers[name]["power"] == "on"
