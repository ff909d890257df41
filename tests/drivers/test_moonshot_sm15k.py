"""moonshot (bridged IPMI) and sm15k (IPMI OEM raw, REST v0.9 / v2.0) against their peers:
tests/peers/ipmi_variants.py (pyghmi's BMC server with bridging and the SeaMicro OEM
command) and tests/peers/http_soap.py (the SeaMicro REST API, one login at a time)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from drivers.base import BootDevice, PowerState
from drivers.errors import (
    AuthError,
    BusyError,
    NotFoundError,
    PowerError,
    SettingsError,
    UnreachableError,
    UnsupportedError,
)
from drivers.moonshot import MoonshotDriver, double_bridge_payload, parse_hwaddress
from drivers.sm15k import SM15KDriver
from tests.peers.common import SimNode, free_port
from tests.peers.http_soap import SeaMicroPeer
from tests.peers.ipmi_variants import ChassisPeer, moonshot_nodes, sm15k_nodes

BLOCK = f"127.33.{os.getpid() % 250}"
MS_ADDRESS, SM_ADDRESS, NOBODY = f"{BLOCK}.1", f"{BLOCK}.2", f"{BLOCK}.250"
MS_PASS, SM_PASS = "Moon-T3st-Secret", "Sea-T3st-Secret"


@pytest.fixture(scope="module")
def moonshot() -> Iterator[ChassisPeer]:
    nodes = moonshot_nodes("rt", MS_ADDRESS, password=MS_PASS)
    single = moonshot_nodes("rs", MS_ADDRESS, cartridges=1, password=MS_PASS, double=False)
    with ChassisPeer(nodes + single) as peer:
        yield peer


@pytest.fixture(scope="module")
def seamicro() -> Iterator[tuple[ChassisPeer, SeaMicroPeer]]:
    port = free_port(SM_ADDRESS)
    nodes = sm15k_nodes("rt", SM_ADDRESS, password=SM_PASS, rest_port=port)
    with ChassisPeer(nodes) as chassis:
        rest = SeaMicroPeer(nodes, "admin", SM_PASS, host=SM_ADDRESS, port=port,
                            states=chassis.shard.targets, lock=chassis.lock, control=False)
        yield chassis, rest
        rest.stop()


def _clean(peer: ChassisPeer) -> list[SimNode]:
    for node in peer.sim_nodes:
        peer.fault(node.name, "none")
        peer.set_state(node.name, "off")
    peer.reset()
    return peer.sim_nodes


def ms(node: SimNode, timeout: float = 3.0, **override: Any) -> MoonshotDriver:
    return MoonshotDriver(MoonshotDriver.validate({**node.power_parameters, **override}), timeout=timeout)


def sm(node: SimNode, mode: str, timeout: float = 3.0, **override: Any) -> SM15KDriver:
    params = {**node.power_parameters, "power_control": mode, **override}
    return SM15KDriver(SM15KDriver.validate(params), timeout=timeout)


# -- moonshot ---------------------------------------------------------------------------


def test_hwaddress_forms() -> None:
    assert parse_hwaddress("-B 0 -T 0x82 -b 7 -t 0x72") == ((0, 0x82), (7, 0x72))
    assert parse_hwaddress("-b 7 -t 0x72") == ((7, 0x72),)
    assert parse_hwaddress("-t 114") == ((0, 0x72),)
    for bad in ("", "-b 7", "-x 1 -t 0x72", "-t 0x73", "-b 16 -t 0x72", "-B 0 -b 7 -t 0x72", "-t"):
        with pytest.raises(ValueError):
            parse_hwaddress(bad)


def test_double_bridge_payload_checksums() -> None:
    # pyghmi's single-bridged Get Chassis Status, seq 1: outer Send Message to 0x72 on 7
    single = bytearray([0x20, 0x18, 0xC8, 0x81, 0x04, 0x34, 0x47,
                        0x72, 0x00, 0x8E, 0x20, 0x04, 0x01, 0xDB])
    single.append((0x100 - sum(single[3:])) & 0xFF)
    payload = double_bridge_payload(single, (0, 0x82), (7, 0x72))
    assert payload[6] == 0x40  # outer: channel 0
    assert payload[7] == 0x82 and payload[13] == 0x47  # middle: to 0x82, Send Message on 7
    assert sum(payload[3:]) % 256 == 0  # outer checksum
    inner = payload[14:-2]
    assert inner[0] == 0x72 and inner[3] == 0x82  # requester: the transit controller
    assert sum(inner[:3]) % 256 == 0 and sum(inner[3:]) % 256 == 0


@pytest.mark.parametrize("which", [0, 3, 4], ids=["double-c1n1", "double-c2n2", "single"])
def test_moonshot_power_cycle_query_boot(moonshot: ChassisPeer, which: int) -> None:
    node = _clean(moonshot)[which]
    with ms(node) as driver:
        assert driver.query() is PowerState.OFF
        driver.set_boot_device(BootDevice.PXE)
        driver.power_on()
        assert driver.query() is PowerState.ON
        driver.power_on()  # already on: nothing sent
        state = moonshot.node(node.name)
        assert state["power"] == "on" and state["booted_from"] == "pxe"
        assert state["counts"]["on"] == 1 and state["counts"]["boot"] == 1
        driver.power_cycle()
        driver.power_off(soft=True)
        assert driver.query() is PowerState.OFF
        driver.power_off()
    counts = moonshot.node(node.name)["counts"]
    assert (counts["on"], counts["cycle"], counts["soft_off"], counts["off"]) == (1, 1, 1, 1)
    others = [n for n in moonshot.sim_nodes if n.name != node.name]
    assert all(moonshot.node(n.name)["counts"]["on"] == 0 for n in others)


def _open_sessions(peer: ChassisPeer) -> int:
    return int(peer.node(peer.sim_nodes[0].name)["counts"]["open_sessions"])


def test_moonshot_nodes_of_one_chassis_share_a_session(moonshot: ChassisPeer) -> None:
    """pyghmi gives every driver of one Chassis Manager the same session: one node's
    driver closing must not log out the session another node's driver is using (the CI
    failure 'get chassis status: session lost'); the last one to close logs it out."""
    import time

    first, second, third = _clean(moonshot)[:3]
    a, b, c = ms(first), ms(second), ms(third)
    a.power_on()
    assert b.query() is PowerState.OFF
    assert a._command.ipmi_session is b._command.ipmi_session  # shared by pyghmi
    a.close()
    assert b._command.ipmi_session.logged, "closing one node's driver logged the chassis out"
    assert _open_sessions(moonshot) == 1
    b.power_on()  # on the session it already had
    c.power_cycle()  # a third driver joins the same session
    assert moonshot.node(second.name)["counts"]["on"] == 1
    assert moonshot.node(third.name)["counts"]["on"] == 1
    b.close()
    assert _open_sessions(moonshot) == 1
    c.close()
    deadline = time.monotonic() + 5
    while _open_sessions(moonshot) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_sessions(moonshot) == 0


def test_moonshot_unknown_cartridge_is_not_found(moonshot: ChassisPeer) -> None:
    node = _clean(moonshot)[0]
    for hw in ("-B 0 -T 0x90 -b 7 -t 0x72", "-b 7 -t 0x7e"):
        with ms(node, power_hwaddress=hw) as driver, pytest.raises(NotFoundError):
            driver.query()


def test_moonshot_errors(moonshot: ChassisPeer) -> None:
    node = _clean(moonshot)[0]
    with ms(node, power_pass="wrong-password") as driver, pytest.raises(AuthError) as err:
        driver.query()
    assert "wrong-password" not in str(err.value.to_dict())
    with ms(node, power_address=NOBODY) as driver, pytest.raises(UnreachableError):
        driver.query()
    moonshot.fault(node.name, "busy")
    try:
        with ms(node) as driver, pytest.raises(BusyError):
            driver.query()
    finally:
        moonshot.fault(node.name, "none")
    with pytest.raises(SettingsError):
        MoonshotDriver.validate({**node.power_parameters, "power_hwaddress": "-t 0x73"})
    with pytest.raises(SettingsError):
        MoonshotDriver.validate({k: v for k, v in node.power_parameters.items() if k != "power_hwaddress"})
    driver = ms(node)
    assert MS_PASS not in repr(driver.settings)
    assert driver.bmc_key() == ms(moonshot.sim_nodes[1]).bmc_key()  # one Chassis Manager


# -- sm15k ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ipmi", "restapi", "restapi2"])
def test_sm15k_power_cycle_query(seamicro: tuple[ChassisPeer, SeaMicroPeer], mode: str) -> None:
    chassis, rest = seamicro
    node = _clean(chassis)[1]
    with sm(node, mode) as driver:
        assert driver.query() is PowerState.OFF
        driver.power_on()
        assert driver.query() is PowerState.ON
        driver.power_cycle()
        assert driver.query() is PowerState.ON
        driver.power_off()
        assert driver.query() is PowerState.OFF
    counts = chassis.node(node.name)["counts"]
    assert counts["on"] == (2 if mode == "ipmi" else 1)
    assert counts["off"] == (2 if mode == "ipmi" else 1)
    assert counts["reset"] == (0 if mode == "ipmi" else 1)
    assert chassis.node(chassis.sim_nodes[0].name)["counts"]["on"] == 0
    assert rest.sessions_open == 0  # logged out
    if mode != "ipmi":
        assert chassis.node(node.name)["boot"] == "pxe"  # REST power on asks for PXE


def test_sm15k_soft_off(seamicro: tuple[ChassisPeer, SeaMicroPeer]) -> None:
    chassis, _ = seamicro
    node = _clean(chassis)[0]
    chassis.set_state(node.name, "on")
    with sm(node, "restapi2") as driver:
        driver.power_off(soft=True)
    assert chassis.node(node.name)["counts"]["soft_off"] == 1
    with sm(node, "ipmi") as driver, pytest.raises(UnsupportedError):
        driver.power_off(soft=True)


@pytest.mark.parametrize("mode", ["ipmi", "restapi", "restapi2"])
def test_sm15k_probe(seamicro: tuple[ChassisPeer, SeaMicroPeer], mode: str) -> None:
    chassis, rest = seamicro
    nodes = _clean(chassis)
    chassis.set_state(nodes[2].name, "on")
    params = {k: v for k, v in nodes[0].power_parameters.items() if k != "system_id"}
    machines = SM15KDriver.probe_chassis({**params, "power_control": mode}, timeout=3)
    assert [m.power_parameters for m in machines] == [{"system_id": "0"}, {"system_id": "1"},
                                                      {"system_id": "2"}]
    assert [m.power for m in machines] == [PowerState.OFF, PowerState.OFF, PowerState.ON]
    assert machines[1].mac_addresses[0] == "00:22:99:01:00:00"
    assert len({m.name for m in machines}) == 3
    assert rest.sessions_open == 0


@pytest.mark.parametrize("mode", ["ipmi", "restapi", "restapi2"])
def test_sm15k_errors(seamicro: tuple[ChassisPeer, SeaMicroPeer], mode: str) -> None:
    chassis, _ = seamicro
    node = _clean(chassis)[0]
    with sm(node, mode, power_pass="wrong-password") as driver, pytest.raises(AuthError) as err:
        driver.power_on()
    assert "wrong-password" not in str(err.value.to_dict())
    with sm(node, mode, power_address=NOBODY) as driver, pytest.raises(UnreachableError):
        driver.power_on()
    with sm(node, mode, system_id="9") as driver, pytest.raises(NotFoundError):
        driver.power_on()
    chassis.fault(node.name, "busy")
    try:
        with sm(node, mode) as driver, pytest.raises(BusyError):
            driver.power_on()
    finally:
        chassis.fault(node.name, "none")


@pytest.mark.parametrize("mode", ["restapi", "restapi2"])
def test_sm15k_one_login_at_a_time(seamicro: tuple[ChassisPeer, SeaMicroPeer], mode: str) -> None:
    """Someone else holds the chassis' one login: busy until they log out; the driver
    itself never keeps the login beyond one call."""
    chassis, rest = seamicro
    nodes = _clean(chassis)
    base = f"http://{SM_ADDRESS}:{rest.port}"
    if mode == "restapi2":
        token = requests.post(f"{base}/v2.0/login", json={"username": "admin", "password": SM_PASS},
                              timeout=5).json()
    else:
        token = requests.get(f"{base}/v0.9/login?admin&{SM_PASS}", timeout=5).json()["result"]
    assert rest.sessions_open == 1
    with sm(nodes[0], mode) as driver:
        with pytest.raises(BusyError) as err:
            driver.query()
        assert token not in err.value.message
        if mode == "restapi2":
            requests.get(f"{base}/v2.0/logout", params={"authtoken": token}, timeout=5)
        else:
            requests.get(f"{base}/v0.9/logout?{token}", timeout=5)
        assert driver.query() is PowerState.OFF
        assert rest.sessions_open == 0  # logged out after the call, before close()
        driver.power_on()
        assert rest.sessions_open == 0
    assert sm(nodes[0], mode).bmc_key() == sm(nodes[1], "ipmi").bmc_key()  # one chassis


def test_sm15k_settings() -> None:
    base = {"power_address": "10.1.1.1", "power_user": "admin", "power_pass": "x" * 24, "system_id": "5/0"}
    with pytest.raises(SettingsError) as err:
        SM15KDriver.validate(base)  # too long for IPMI
    assert "x" * 24 not in err.value.message
    settings = SM15KDriver.validate({**base, "power_control": "restapi2"})
    assert settings.system_id == "5"  # type: ignore[attr-defined]
    for bad in ({"system_id": "a"}, {"power_control": "snmp"}, {"rest_port": 0}):
        with pytest.raises(SettingsError):
            SM15KDriver.validate({**base, "power_control": "restapi", **bad})
    assert isinstance(SettingsError("x"), PowerError)
