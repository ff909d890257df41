"""The ipmi power type through the full path, with the shared checks of tests/fullpath.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fullpath import FullPath, check_enlist, error_code, exercise
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ipmi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ipmi_bmc.IpmiFleet, list[SimNode]]]:
    nodes = ipmi_bmc.make_nodes(3, "fp", first_address="127.21.0.1", prefix="fpipmi")
    fleet = ipmi_bmc.start_fleet(nodes, Path(tmp_path_factory.mktemp("fp-ipmi")))
    yield fleet, nodes
    fleet.stop()


@pytest.mark.capability("ipmi", "power_query", "pxe_next_boot")
def test_ipmi_on_off_cycle_query_boot(fullpath: FullPath, ipmi: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]) -> None:
    fleet, nodes = ipmi
    fullpath.load(n.inventory_entry() for n in nodes)
    exercise(fullpath, fleet.nodes, fleet.set_state, fleet.reset, [n.name for n in nodes], boot=True)


@pytest.mark.capability("ipmi", "detailed_errors")
def test_ipmi_error_codes(fullpath: FullPath, ipmi: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]) -> None:
    fleet, nodes = ipmi
    good = nodes[0].inventory_entry()
    wrong = {**good, "name": "wrongpw",
             "power_parameters": {**good["power_parameters"], "power_pass": "not-the-password",
                                  "mac_address": "52:54:00:aa:00:01"}}
    dead = {**good, "name": "dead",
            "power_parameters": {**good["power_parameters"], "power_address": "127.21.9.9",
                                 "mac_address": "52:54:00:aa:00:02"}}
    fullpath.load([good, wrong, dead])
    assert error_code(fullpath, "wrongpw") == "auth_failed"
    assert error_code(fullpath, "dead") in ("unreachable", "timeout")
    fleet.fault(nodes[0].name, "busy")
    try:
        assert error_code(fullpath, nodes[0].name) == "busy"
    finally:
        fleet.fault(nodes[0].name, "none")


@pytest.mark.capability("ipmi", "bmc_enlistment")
def test_ipmi_enlist(fullpath: FullPath, ipmi: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]) -> None:
    fleet, nodes = ipmi
    check_enlist(fullpath, fleet.nodes, [n.inventory_entry() for n in nodes[1:]],
                 nodes[1].power_parameters["power_pass"])
