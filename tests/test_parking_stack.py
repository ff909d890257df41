"""Parking through the full path: CLI -> Redis -> a real rack worker -> the ipmi driver ->
IPMI peers on 127.42.0.N, with one dead BMC (nothing listening).

The stack is this module's own (tests/fullpath.FullPath with parking settings of its own):
the session's shared ``fullpath`` worker runs with the defaults (5 failures, 3 s calls,
2 attempts), where parking a dead IPMI BMC takes about a minute; and a BMC parked there
would stay parked for the next test modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fullpath import FullPath
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode

pytestmark = pytest.mark.integration

CALL_TIMEOUT = 1.0
DEAD_BMC = "ipmi:127.42.0.200:623"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FullPath, list[SimNode]]]:
    nodes = ipmi_bmc.make_nodes(2, "pk", first_address="127.42.0.1", prefix="park")
    fleet = ipmi_bmc.start_fleet(nodes, Path(tmp_path_factory.mktemp("park-ipmi")))
    fp = FullPath(tmp_path_factory.mktemp("park-stack"), racks=("pk",),
                  POWERQ_CALL_TIMEOUT=str(CALL_TIMEOUT), POWERQ_MAX_ATTEMPTS="1",
                  POWERQ_BMC_PARK_AFTER="2", POWERQ_BMC_PARK_SECONDS="600")
    try:
        fp.start()
        good = [n.inventory_entry() for n in nodes]
        dead = {**good[0], "name": "park-dead",
                "power_parameters": {**good[0]["power_parameters"], "power_address": "127.42.0.200"}}
        fp.load([*good, dead])
        yield fp, nodes
    finally:
        fp.stop()
        fleet.stop()


def query(fp: FullPath, nodeset: str) -> dict[str, Any]:
    job = fp.run("query", nodeset)
    return dict(job["by_node"])


def fail_until_parked(fp: FullPath) -> None:
    for _ in range(2):
        result = query(fp, "park-dead")["park-dead"]
        assert result["error"]["code"] in ("unreachable", "timeout"), result
        assert not result["error"].get("details", {}).get("parked"), result


def assert_parked_at_once(fp: FullPath) -> None:
    result = query(fp, "park-dead")["park-dead"]
    error = result["error"]
    assert error["code"] in ("unreachable", "timeout") and error["details"]["parked"] is True
    assert re.search(r"parked until \d\d:\d\d:\d\d after 2 failures \(last: (unreachable|timeout)\)",
                     error["message"]), error
    took = result["finished"] - result["started"]
    assert took < CALL_TIMEOUT / 4, took  # a failing call takes 3 s (the watchdog) or more


def test_dead_bmc_is_parked_shown_and_unparked(stack: tuple[FullPath, list[SimNode]]) -> None:
    fp, nodes = stack
    good = [n.name for n in nodes]
    fail_until_parked(fp)

    status = fp.pq_json("status")
    assert [p["bmc"] for p in status["parked"]] == [DEAD_BMC]
    assert status["parked"][0]["nodes"] == ["park-dead"] and status["parked"][0]["failures"] == 2
    by_node = {n["node"]: n for n in status["nodes"]}
    assert by_node["park-dead"]["parked"]["bmc"] == DEAD_BMC
    assert all(by_node[name]["parked"] is None for name in good)
    text = fp.pq("status").stdout
    assert "1 BMC(s) parked, 1 of these nodes behind them" in text
    assert re.search(r"park-dead .* parked +" + re.escape(DEAD_BMC) + " parked until", text), text

    assert_parked_at_once(fp)
    results = query(fp, ",".join([*good, "park-dead"]))  # healthy BMCs are unaffected
    assert all(results[name]["outcome"] == "ok" for name in good), results
    assert results["park-dead"]["error"]["details"]["parked"] is True

    out = fp.pq("unpark", DEAD_BMC)  # by BMC key
    assert out.returncode == 0 and f"released 1 BMC(s): {DEAD_BMC}" in out.stdout, out.stdout + out.stderr
    assert "parked" not in fp.pq_json("status")
    fail_until_parked(fp)  # its count was forgotten: two more failures park it again
    assert_parked_at_once(fp)

    out = fp.pq("unpark", "park-dead", "--json")  # by node set
    assert fp.pq_json("unpark", "park-dead") == {"released": [], "checked": [DEAD_BMC]}
    assert out.returncode == 0 and '"released": [\n    "' + DEAD_BMC in out.stdout, out.stdout
    result = query(fp, "park-dead")["park-dead"]  # the device is tried again
    assert not result["error"].get("details", {}).get("parked"), result
    assert result["finished"] - result["started"] >= CALL_TIMEOUT
    assert fp.pq("unpark", "@all").returncode == 0
