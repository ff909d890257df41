"""The redfish power type through the full path, with the shared checks of tests/fullpath.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fullpath import FullPath, check_enlist, error_code, exercise
from tests.peers import redfish_sim

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bmcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redfish_sim.RedfishFleet]:
    nodes = redfish_sim.make_nodes(3, "fp", first_address="127.22.0.1")
    with redfish_sim.start_fleet(nodes, Path(tmp_path_factory.mktemp("fp-redfish"))) as fleet:
        yield fleet


@pytest.mark.capability("redfish", "power_query", "pxe_next_boot")
def test_redfish_on_off_cycle_query_boot(fullpath: FullPath, bmcs: redfish_sim.RedfishFleet) -> None:
    fullpath.load(n.inventory_entry() for n in bmcs.sim_nodes)
    exercise(fullpath, bmcs.nodes, bmcs.set_state, bmcs.reset, [n.name for n in bmcs.sim_nodes], boot=True)


@pytest.mark.capability("redfish", "detailed_errors")
def test_redfish_error_codes(fullpath: FullPath, bmcs: redfish_sim.RedfishFleet) -> None:
    good = bmcs.sim_nodes[0].inventory_entry()
    other = bmcs.sim_nodes[1].inventory_entry()  # another BMC, reached with a wrong password
    wrong = {**other, "name": "wrongpw",
             "power_parameters": {**other["power_parameters"], "power_pass": "not-the-password"}}
    dead = {**good, "name": "dead",
            "power_parameters": {**good["power_parameters"], "power_address": "127.22.9.9:8000"}}
    fullpath.load([good, wrong, dead])
    assert error_code(fullpath, "wrongpw") == "auth_failed"
    assert error_code(fullpath, "dead") == "unreachable"
    bmcs.fault(good["name"], "busy")
    try:
        assert error_code(fullpath, good["name"]) == "busy"
    finally:
        bmcs.fault(good["name"], "none")


@pytest.mark.capability("redfish", "bmc_enlistment")
def test_redfish_enlist(fullpath: FullPath, bmcs: redfish_sim.RedfishFleet) -> None:
    nodes = bmcs.sim_nodes[1:]
    check_enlist(fullpath, bmcs.nodes, [n.inventory_entry() for n in nodes],
                 nodes[0].power_parameters["power_pass"])
