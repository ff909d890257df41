"""The amt and nova power types through the full path (CLI -> Redis -> rack worker ->
driver -> WS-Management / Keystone + Nova peers), with the shared checks of tests/fullpath.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fullpath import FullPath, error_code, exercise
from tests.peers.common import free_port
from tests.peers.http_soap import NovaPeer, PeerGroup, amt_fleet, nova_cloud

pytestmark = pytest.mark.integration

AMT_PW = "Fp-Amt-Pw-1!"
NOVA_PW = "Fp-Nova-Pw-1"


@pytest.fixture(scope="module")
def amts() -> Iterator[PeerGroup]:
    with amt_fleet(3, "fp", AMT_PW, prefix="fpamt") as group:
        yield group


@pytest.fixture(scope="module")
def cloud() -> Iterator[NovaPeer]:
    with nova_cloud(3, "fp", NOVA_PW, prefix="fpnova") as peer:
        yield peer  # type: ignore[misc]


def variant(entry: dict[str, Any], name: str, **params: Any) -> dict[str, Any]:
    return {**entry, "name": name, "power_parameters": {**entry["power_parameters"], **params}}


@pytest.mark.capability("amt", "power_query", "pxe_next_boot")
def test_amt_on_off_cycle_query_boot(fullpath: FullPath, amts: PeerGroup) -> None:
    fullpath.load(n.inventory_entry() for n in amts.sim_nodes)
    exercise(fullpath, amts.nodes, amts.set_state, amts.reset, [n.name for n in amts.sim_nodes], boot=True)


@pytest.mark.capability("amt", "detailed_errors")
def test_amt_error_codes(fullpath: FullPath, amts: PeerGroup) -> None:
    good = amts.sim_nodes[0].inventory_entry()
    wrong = variant(amts.sim_nodes[1].inventory_entry(), "amt-wrongpw", power_pass="not-the-password")
    dead = variant(good, "amt-dead", power_address=f"127.0.0.1:{free_port()}")
    fullpath.load([good, wrong, dead])
    assert error_code(fullpath, "amt-wrongpw") == "auth_failed"
    assert error_code(fullpath, "amt-dead") == "unreachable"
    amts.fault(good["name"], "busy")
    try:
        assert error_code(fullpath, good["name"]) == "busy"
    finally:
        amts.fault(good["name"], "none")


@pytest.mark.capability("nova", "power_query")
def test_nova_on_off_cycle_query(fullpath: FullPath, cloud: NovaPeer) -> None:
    fullpath.load(n.inventory_entry() for n in cloud.sim_nodes)
    exercise(fullpath, cloud.nodes, cloud.set_state, cloud.reset, [n.name for n in cloud.sim_nodes])


@pytest.mark.capability("nova", "detailed_errors")
def test_nova_error_codes(fullpath: FullPath, cloud: NovaPeer) -> None:
    good = cloud.sim_nodes[0].inventory_entry()
    wrong = variant(cloud.sim_nodes[1].inventory_entry(), "nova-wrongpw", os_password="not-the-password")
    dead = variant(good, "nova-dead", os_authurl=f"http://127.0.0.1:{free_port()}/identity/v3")
    fullpath.load([good, wrong, dead])
    assert error_code(fullpath, "nova-wrongpw") == "auth_failed"
    assert error_code(fullpath, "nova-dead") == "unreachable"
    cloud.fault(good["name"], "busy")
    try:
        assert error_code(fullpath, good["name"]) == "busy"
    finally:
        cloud.fault(good["name"], "none")
