"""moonshot, sm15k (ipmi / restapi / restapi2), amt and nova through the full path
(CLI -> Redis -> rack worker -> driver -> peer), with the shared checks of tests/fullpath.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fullpath import FullPath, check_probe, error_code, exercise
from tests.peers.common import SimNode, free_port
from tests.peers.http_soap import SeaMicroPeer
from tests.peers.ipmi_variants import ChassisPeer, moonshot_nodes, sm15k_nodes

pytestmark = pytest.mark.integration

BLOCK = f"127.34.{os.getpid() % 250}"
NOBODY = f"{BLOCK}.250"


@pytest.fixture(scope="module")
def moonshot() -> Iterator[ChassisPeer]:
    nodes = moonshot_nodes("fp", f"{BLOCK}.1") + moonshot_nodes("fp1", f"{BLOCK}.1", cartridges=1,
                                                               double=False)
    with ChassisPeer(nodes) as peer:
        yield peer


@pytest.fixture(scope="module")
def seamicro() -> Iterator[tuple[ChassisPeer, SeaMicroPeer]]:
    address = f"{BLOCK}.2"
    port = free_port(address)
    nodes = sm15k_nodes("fp", address, servers=3, rest_port=port)
    with ChassisPeer(nodes) as chassis:
        rest = SeaMicroPeer(nodes, "admin", "seamicro-Pass1", host=address, port=port,
                            states=chassis.shard.targets, lock=chassis.lock, control=False)
        yield chassis, rest
        rest.stop()


def _entries(nodes: list[SimNode], **override: Any) -> list[dict[str, Any]]:
    out = []
    for node in nodes:
        entry = {**node.inventory_entry(), "rack": "fp"}  # the session's worker serves rack fp
        entry["power_parameters"].update(override)
        out.append(entry)
    return out


def _errors(fp: FullPath, good: dict[str, Any], fault: Any, other: dict[str, Any]) -> None:
    """``other``: parameters that address another machine of the same device (the
    inventory refuses two nodes with the same parameters but the password)."""
    params = good["power_parameters"]
    wrong = {**good, "name": f"{good['name']}-wrongpw",
             "power_parameters": {**params, **other, "power_pass": "not-the-password"}}
    dead = {**good, "name": f"{good['name']}-dead",
            "power_parameters": {**params, "power_address": NOBODY}}
    fp.load([good, wrong, dead])
    assert error_code(fp, wrong["name"]) == "auth_failed"
    assert error_code(fp, dead["name"]) in ("unreachable", "timeout")
    fault(good["name"], "busy")
    try:
        assert error_code(fp, good["name"]) == "busy"
    finally:
        fault(good["name"], "none")


@pytest.mark.capability("moonshot", "power_query", "pxe_next_boot")
def test_moonshot_full_path(fullpath: FullPath, moonshot: ChassisPeer) -> None:
    fullpath.load(_entries(moonshot.sim_nodes))
    exercise(fullpath, moonshot.nodes, moonshot.set_state, moonshot.reset,
             [n.name for n in moonshot.sim_nodes], boot=True)


@pytest.mark.capability("moonshot", "detailed_errors")
def test_moonshot_error_codes(fullpath: FullPath, moonshot: ChassisPeer) -> None:
    good = _entries(moonshot.sim_nodes[:1])[0]
    _errors(fullpath, good, moonshot.fault,
            {"power_hwaddress": moonshot.sim_nodes[1].power_parameters["power_hwaddress"]})
    absent = {**good, "name": "ms-absent", "power_parameters": {
        **good["power_parameters"], "power_hwaddress": "-B 0 -T 0x90 -b 7 -t 0x72"}}
    fullpath.load([absent])
    assert error_code(fullpath, "ms-absent") == "not_found"


@pytest.mark.capability("sm15k", "power_query")
@pytest.mark.parametrize("mode", ["ipmi", "restapi", "restapi2"])
def test_sm15k_full_path(fullpath: FullPath, seamicro: tuple[ChassisPeer, SeaMicroPeer],
                         mode: str) -> None:
    chassis, rest = seamicro
    fullpath.load(_entries(chassis.sim_nodes, power_control=mode))
    exercise(fullpath, chassis.nodes, chassis.set_state, chassis.reset,
             [n.name for n in chassis.sim_nodes])
    assert rest.sessions_open == 0  # every call logged out: the chassis' one login is free


@pytest.mark.capability("sm15k", "detailed_errors")
@pytest.mark.parametrize("mode", ["ipmi", "restapi", "restapi2"])
def test_sm15k_error_codes(fullpath: FullPath, seamicro: tuple[ChassisPeer, SeaMicroPeer],
                           mode: str) -> None:
    chassis, _ = seamicro
    good = _entries(chassis.sim_nodes[:1], power_control=mode)[0]
    _errors(fullpath, good, chassis.fault, {"system_id": "1"})


@pytest.mark.capability("sm15k", "chassis_probe")
def test_sm15k_probe_through_the_cli(fullpath: FullPath, seamicro: tuple[ChassisPeer, SeaMicroPeer],
                                     tmp_path: Path) -> None:
    chassis, _ = seamicro
    check_probe(fullpath, tmp_path, _entries(chassis.sim_nodes, power_control="restapi2"))
