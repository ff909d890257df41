"""The vmware power type through the full path (CLI -> Redis -> rack worker -> pyvmomi ->
govmomi's vCenter simulator), with the shared checks of tests/fullpath.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fullpath import FullPath, check_probe, error_code, exercise
from tests.peers import vcsim
from tests.peers.common import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vcsim.VcsimPeer]:
    # Nodes alternate between power_uuid and power_vm_name; https with an unverified
    # certificate, as most vCenters are run.
    peer = vcsim.start(3, tmp_path_factory.mktemp("fp-vcsim"), rack="fp", prefix="fpvmw",
                       tls=True, by="mixed")
    yield peer
    peer.stop()


@pytest.mark.capability("vmware", "power_query", "pxe_next_boot")
def test_vmware_on_off_cycle_query_boot(fullpath: FullPath, vc: vcsim.VcsimPeer) -> None:
    fullpath.load(n.inventory_entry() for n in vc.nodes_list)
    exercise(fullpath, vc.nodes, vc.set_state, vc.reset_counts, [n.name for n in vc.nodes_list],
             boot=True)


@pytest.mark.capability("vmware", "detailed_errors")
def test_vmware_error_codes(fullpath: FullPath, vc: vcsim.VcsimPeer) -> None:
    good = vc.nodes_list[0].inventory_entry()
    other = vc.nodes_list[1].inventory_entry()  # the inventory refuses two nodes for one VM
    wrong = {**other, "name": "fpvmw-wrongpw",
             "power_parameters": {**other["power_parameters"], "power_pass": "not-the-password"}}
    dead = {**good, "name": "fpvmw-dead",
            "power_parameters": {**good["power_parameters"], "power_port": free_port()}}
    fullpath.load([good, wrong, dead])
    assert error_code(fullpath, "fpvmw-wrongpw") == "auth_failed"
    assert error_code(fullpath, "fpvmw-dead") in ("unreachable", "timeout")
    name = good["name"]
    vc.set_state(name, "off")
    vc.set_fault(name, "busy")
    try:
        assert error_code(fullpath, name, "on") == "busy"
    finally:
        vc.set_fault(name, "none")
    assert vc.nodes()[name]["power"] == "off"


@pytest.mark.capability("vmware", "chassis_probe")
def test_vmware_probe_through_the_cli(fullpath: FullPath, vc: vcsim.VcsimPeer, tmp_path: Path) -> None:
    check_probe(fullpath, tmp_path, [n.inventory_entry() for n in vc.nodes_list])
