"""The SNMP PDU drivers (apc, eaton, raritan) and drivers/snmp.py against the pysnmp
command-responder peer (tests/peers/snmp_pdu.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from drivers import registry
from drivers.apc import ApcDriver
from drivers.base import PowerDriver, PowerState
from drivers.eaton import EatonDriver
from drivers.errors import (
    AuthError,
    BusyError,
    CallTimeoutError,
    DeviceError,
    NotFoundError,
    PowerError,
    SettingsError,
    UnreachableError,
    UnsupportedError,
)
from drivers.raritan import RaritanDriver
from drivers.snmp import SnmpClient, SnmpTarget, parse_address
from tests.conftest import ROOT
from tests.peers import snmp_pdu
from tests.peers.common import PeerControl, SimNode
from tests.peers.snmp_pdu import PduFleet, V3User, start_pdu

COMMUNITY = "pdu-Write-c0mmunity"
AUTH_KEY = "auth-Key-s3cret"
PRIV_KEY = "priv-Key-s3cret"
V3 = V3User("powerq", "sha256", AUTH_KEY, "aes", PRIV_KEY)
FAST = 0.5  # seconds: the driver timeout for tests that expect no answer

DRIVER_CLASSES: dict[str, type[PowerDriver]] = {
    "apc": ApcDriver, "eaton": EatonDriver, "raritan": RaritanDriver,
}


@dataclass
class Peer:
    fleet: PduFleet
    control: PeerControl
    nodes: dict[str, list[SimNode]]  # kind -> its outlets' nodes
    sentry: snmp_pdu.PduAgent


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    fleet = PduFleet()
    control = PeerControl(fleet.serve())
    nodes = {
        "apc_rpdu": start_pdu(fleet, "apc_rpdu", "127.31.0.1", 3, "t", "t-rpdu", community=COMMUNITY)[1],
        "apc_masterswitch": start_pdu(fleet, "apc_masterswitch", "127.31.0.2", 2, "t", "t-ms",
                                      community=COMMUNITY)[1],
        "eaton": start_pdu(fleet, "eaton", "127.31.0.3", 3, "t", "t-eaton", community=COMMUNITY)[1],
        "eaton_chain": start_pdu(fleet, "eaton", "127.31.0.4", 2, "t", "t-eaton-u1",
                                 community=COMMUNITY, unit=1)[1],
        "raritan": start_pdu(fleet, "raritan", "127.31.0.5", 3, "t", "t-raritan", v3_user=V3)[1],
        "apc_v3": start_pdu(fleet, "apc_rpdu", "127.31.0.6", 2, "t", "t-apc3",
                            v3_user=V3User("apcuser", "sha", AUTH_KEY, "des", PRIV_KEY))[1],
    }
    sentry, _ = start_pdu(fleet, "sentry3", "127.31.0.7", 4, "t", "t-sentry", community=COMMUNITY)
    yield Peer(fleet, control, nodes, sentry)
    fleet.stop()


def _driver(node: SimNode, timeout: float = 3.0, **changes: Any) -> PowerDriver:
    cls = DRIVER_CLASSES[node.power_type]
    params = {k: v for k, v in {**node.power_parameters, **changes}.items() if v is not None}
    return cls(cls.validate(params), timeout=timeout)


@pytest.fixture
def fresh(peer: Peer) -> Iterator[Peer]:
    """Every outlet off, no fault, counts zeroed; faults cleared afterwards too."""
    for nodes in peer.nodes.values():
        for n in nodes:
            peer.fleet.set_fault(n.name, "none")
            peer.fleet.set_state(n.name, "off")
    peer.fleet.reset_counts()
    yield peer
    for nodes in peer.nodes.values():
        for n in nodes:
            peer.fleet.set_fault(n.name, "none")


KINDS = ["apc_rpdu", "apc_masterswitch", "eaton", "eaton_chain", "raritan", "apc_v3"]


@pytest.mark.parametrize("kind", KINDS)
def test_on_query_off_cycle(fresh: Peer, kind: str) -> None:
    node = fresh.nodes[kind][1]
    other = fresh.nodes[kind][0]
    with _driver(node) as driver:
        assert driver.query() is PowerState.OFF
        driver.power_on()
        assert fresh.fleet.nodes()[node.name]["power"] == "on"
        assert driver.query() is PowerState.ON
        driver.power_off()
        assert driver.query() is PowerState.OFF
        fresh.fleet.set_state(node.name, "on")
        driver.power_cycle()
        assert driver.query() is PowerState.ON
    peers = fresh.fleet.nodes()
    counts = peers[node.name]["counts"]
    if node.power_type == "apc":  # off, power_on_delay, on
        assert counts == {"query": 4, "on": 2, "off": 2}, counts
    else:
        assert counts == {"query": 4, "on": 1, "off": 1, "cycle": 1}, counts
    assert peers[other.name]["counts"] == {} and peers[other.name]["power"] == "off"


@pytest.mark.parametrize("kind", ["apc_rpdu", "eaton", "raritan"])
def test_power_on_of_an_outlet_that_is_on_sends_on_only(fresh: Peer, kind: str) -> None:
    node = fresh.nodes[kind][0]
    fresh.fleet.set_state(node.name, "on")
    with _driver(node) as driver:
        driver.power_on()
    counts = fresh.fleet.nodes()[node.name]["counts"]
    assert counts == {"on": 1}, counts  # never a reboot or an off first
    assert fresh.fleet.nodes()[node.name]["power"] == "on"


def test_apc_cycle_waits_power_on_delay(fresh: Peer) -> None:
    node = fresh.nodes["apc_rpdu"][0]
    fresh.fleet.set_state(node.name, "on")
    waits: list[float] = []
    settings = ApcDriver.validate({**node.power_parameters, "power_on_delay": 7})
    driver = ApcDriver(settings, timeout=3.0, sleep=waits.append)

    def record(seconds: float) -> None:
        waits.append(seconds)
        assert fresh.fleet.nodes()[node.name]["power"] == "off"  # off while waiting

    driver._sleep = record
    driver.power_cycle()
    driver.close()
    assert waits == [7.0]
    assert fresh.fleet.nodes()[node.name]["counts"] == {"off": 1, "on": 1}
    assert fresh.fleet.nodes()[node.name]["power"] == "on"


def test_soft_off_is_unsupported(fresh: Peer) -> None:
    with _driver(fresh.nodes["eaton"][0]) as driver, pytest.raises(UnsupportedError):
        driver.power_off(soft=True)
    assert fresh.fleet.nodes()[fresh.nodes["eaton"][0].name]["counts"] == {}


@pytest.mark.parametrize("kind", ["apc_rpdu", "eaton", "raritan", "apc_masterswitch"])
def test_unknown_outlet_is_not_found(fresh: Peer, kind: str) -> None:
    with _driver(fresh.nodes[kind][0], node_outlet=42) as driver:
        with pytest.raises(NotFoundError):
            driver.query()
        with pytest.raises(NotFoundError):
            driver.power_on()


def test_wrong_v3_credentials_are_auth_failed(fresh: Peer) -> None:
    node = fresh.nodes["raritan"][0]
    cases = {"wrong auth key": {"snmp_auth_key": "not-the-auth-key"},
             "wrong priv key": {"snmp_priv_key": "not-the-priv-key"},
             "unknown user": {"snmp_user": "intruder"}}
    for what, change in cases.items():
        with _driver(node, **change) as driver, pytest.raises(AuthError) as err:
            driver.query()
        assert err.value.code == "auth_failed", what
        for secret in (*change.values(), AUTH_KEY, PRIV_KEY):
            assert secret not in str(err.value.to_dict()), what


def test_auth_fault_v3_refuses_the_user(fresh: Peer) -> None:
    node = fresh.nodes["raritan"][0]
    fresh.fleet.set_fault(node.name, "auth")
    with _driver(node) as driver:
        with pytest.raises(AuthError):
            driver.power_on()
        with pytest.raises(AuthError):
            driver.query()
    assert fresh.fleet.nodes()[node.name]["power"] == "off"


def test_wrong_community_looks_like_a_timeout(fresh: Peer) -> None:
    """v1/v2c agents drop an unknown community silently (documented in drivers/snmp.py)."""
    node = fresh.nodes["eaton"][0]
    with _driver(node, timeout=FAST, community="wrong-community") as driver:
        with pytest.raises(CallTimeoutError) as err:
            driver.query()
    assert "community" in err.value.message and "wrong-community" not in err.value.message
    fresh.fleet.set_fault(node.name, "auth")  # the peer's v2c "auth" fault drops too
    with _driver(node, timeout=FAST) as driver, pytest.raises(CallTimeoutError):
        driver.query()


@pytest.mark.parametrize("kind", ["apc_rpdu", "eaton", "raritan"])
def test_busy_agent_answers_generr(fresh: Peer, kind: str) -> None:
    node = fresh.nodes[kind][0]
    fresh.fleet.set_fault(node.name, "busy")
    with _driver(node) as driver:
        with pytest.raises(BusyError) as err:
            driver.power_on()
        assert err.value.retryable
        assert driver.query() is PowerState.OFF  # reads still answered
    assert fresh.fleet.nodes()[node.name]["power"] == "off"


def test_no_answer_is_a_timeout_within_the_driver_timeout(fresh: Peer) -> None:
    import time

    node = fresh.nodes["apc_rpdu"][0]
    fresh.fleet.set_fault(node.name, "no_answer")
    started = time.monotonic()
    with _driver(node, timeout=FAST) as driver, pytest.raises(CallTimeoutError):
        driver.power_on()
    assert time.monotonic() - started < FAST + 1.0  # retries=0: one wait only
    assert fresh.fleet.nodes()[node.name]["counts"] == {}


def test_slow_agent(fresh: Peer) -> None:
    node = fresh.nodes["raritan"][0]
    fresh.fleet.set_fault(node.name, "slow", latency=0.2)
    with _driver(node, timeout=2.0) as driver:
        assert driver.query() is PowerState.OFF
    fresh.fleet.set_fault(node.name, "slow", latency=1.5)
    with _driver(node, timeout=FAST) as driver, pytest.raises(CallTimeoutError):
        driver.query()


def test_garbage_state_is_a_device_error(fresh: Peer) -> None:
    node = fresh.nodes["eaton"][0]
    fresh.fleet.set_fault(node.name, "garbage")
    with _driver(node) as driver, pytest.raises(DeviceError):
        driver.query()


def test_powering_outlet_keeps_its_state(fresh: Peer) -> None:
    node = fresh.nodes["raritan"][0]
    fresh.fleet.set_fault(node.name, "powering")
    with _driver(node) as driver:
        driver.power_on()
        assert driver.query() is PowerState.OFF  # the policy's confirm loop sees this
    assert fresh.fleet.nodes()[node.name]["counts"] == {"on": 1, "query": 1}


def test_unreachable_and_silent_addresses() -> None:
    dead = {"power_address": "no-such-pdu.invalid", "snmp_version": "2c", "community": COMMUNITY,
            "node_outlet": 1}
    with EatonDriver(EatonDriver.validate(dead), timeout=FAST) as driver:
        with pytest.raises(UnreachableError) as err:
            driver.query()
    assert err.value.code == "unreachable" and COMMUNITY not in err.value.message
    silent = {**dead, "power_address": "127.31.9.9"}  # nothing listens: UDP gives no answer
    with EatonDriver(EatonDriver.validate(silent), timeout=FAST) as driver:
        with pytest.raises(CallTimeoutError):
            driver.query()


def test_driver_calls_from_several_threads_in_turn(fresh: Peer) -> None:
    """The worker calls one driver from a new thread each time (its watchdog)."""
    node = fresh.nodes["raritan"][2]
    driver = _driver(node)
    seen: list[Any] = []

    def call(fn: Any) -> None:
        try:
            seen.append(fn())
        except PowerError as exc:  # pragma: no cover - reported below
            seen.append(exc)

    for fn in (driver.query, driver.power_on, driver.query):
        t = threading.Thread(target=call, args=(fn,))
        t.start()
        t.join(10)
    driver.close()
    driver.close()  # twice: never raises
    assert seen == [PowerState.OFF, None, PowerState.ON]


def test_outlets_of_one_pdu_share_a_bmc_key(peer: Peer) -> None:
    a, b = peer.nodes["raritan"][:2]
    other = peer.nodes["eaton"][0]
    assert _driver(a).bmc_key() == _driver(b).bmc_key()
    assert _driver(a).bmc_key() != _driver(other).bmc_key()


def test_capabilities() -> None:
    for name in ("apc", "eaton", "raritan"):
        caps = registry.get(name).capabilities
        assert caps.power_query and caps.detailed_errors
        assert not caps.pxe_next_boot and not caps.chassis_probe and not caps.bmc_enlistment


# -- the peer's other MIBs, through drivers/snmp.py directly ---------------------------------


def test_sentry3_outlet_control_and_status(peer: Peer) -> None:
    agent = peer.sentry
    target = SnmpTarget(agent.host, agent.port, "2c", community=COMMUNITY)
    client = SnmpClient(target, timeout=3.0)
    try:
        ctl, status = snmp_pdu.SENTRY3_CTL + ".1.1.3", snmp_pdu.SENTRY3_STATUS + ".1.1.3"
        assert client.get_int(status) == 0
        assert client.set_int(ctl, 1) == 1
        assert client.get_int(status) == 1
        client.set_int(ctl, 3)  # reboot
        client.set_int(ctl, 2)
        assert client.get_int(status) == 0
        assert client.get_int(ctl) == 0  # outletControlAction reads none(0)
        with pytest.raises(DeviceError):
            client.set_int(ctl, 9)  # wrongValue
        with pytest.raises(NotFoundError):
            client.get_int(snmp_pdu.SENTRY3_STATUS + ".1.1.77")
    finally:
        client.close()
    counts = peer.fleet.nodes()["t-sentry-3"]["counts"]
    assert counts == {"query": 3, "on": 1, "cycle": 1, "off": 1}, counts


def test_raritan_onoff_sensor_mirrors_the_outlet(fresh: Peer) -> None:
    node = fresh.nodes["raritan"][0]
    host, port = parse_address(node.power_parameters["power_address"])
    target = SnmpTarget(host, port, "3", user=V3.name, auth_protocol="sha256", auth_key=AUTH_KEY,
                        priv_protocol="aes", priv_key=PRIV_KEY)
    client = SnmpClient(target, timeout=3.0)
    try:
        sensor = f"{snmp_pdu.RARITAN_SENSOR}.1.1.14"
        assert client.get_int(sensor) == 8
        fresh.fleet.set_state(node.name, "on")
        assert client.get_int(sensor) == 7
    finally:
        client.close()
    assert COMMUNITY not in repr(target) and AUTH_KEY not in repr(target) and PRIV_KEY not in repr(client)


# -- settings --------------------------------------------------------------------------------

BASE = {"power_address": "10.0.0.9", "node_outlet": 3}


@pytest.mark.parametrize("params, problem", [
    ({**BASE, "snmp_version": "2c"}, "community is required"),
    ({**BASE, "snmp_version": "3"}, "snmp_user is required"),
    ({**BASE, "snmp_version": "2c", "community": COMMUNITY, "snmp_user": "u"}, "only for snmp_version 3"),
    ({**BASE, "snmp_version": "3", "community": COMMUNITY, "snmp_user": "u"}, "community is only"),
    ({**BASE, "snmp_version": "3", "snmp_user": "u", "snmp_auth_protocol": "sha",
      "snmp_auth_key": "short"}, "at least 8"),
    ({**BASE, "snmp_version": "3", "snmp_user": "u", "snmp_priv_protocol": "aes",
      "snmp_priv_key": PRIV_KEY}, "needs authentication"),
    ({**BASE, "snmp_version": "3", "snmp_user": "u", "snmp_auth_key": AUTH_KEY}, "is none"),
    ({**BASE, "snmp_version": "3", "snmp_user": "u", "snmp_auth_protocol": "sha1024",
      "snmp_auth_key": AUTH_KEY}, "snmp_auth_protocol"),
    ({**BASE, "snmp_version": "4", "community": COMMUNITY}, "snmp_version"),
    ({**BASE, "community": COMMUNITY, "node_outlet": 0}, "node_outlet"),
    ({"power_address": "10.0.0.9", "community": COMMUNITY}, "node_outlet"),
    ({**BASE, "community": COMMUNITY, "power_address": "10.0.0.9:99999"}, "port"),
    ({**BASE, "community": COMMUNITY, "power_address": "snmp://10.0.0.9"}, "power_address"),
])
@pytest.mark.parametrize("name", ["apc", "eaton", "raritan"])
def test_bad_settings(name: str, params: dict[str, Any], problem: str) -> None:
    with pytest.raises(SettingsError) as err:
        registry.get(name).validate(params)
    assert err.value.code == "bad_settings"
    assert problem in err.value.message, err.value.message
    for secret in (COMMUNITY, AUTH_KEY, PRIV_KEY):
        assert secret not in err.value.message


def test_settings_parse_and_hide_secrets() -> None:
    apc = ApcDriver.validate({"power_address": "[fd00::5]:1161", "node_outlet": "7",
                              "community": COMMUNITY, "pdu_type": "masterswitch"})
    assert apc.snmp_version == "1" and apc.pdu_type == "MASTERSWITCH"  # type: ignore[attr-defined]
    assert apc.power_on_delay == 5.0  # type: ignore[attr-defined]
    target = apc.snmp_target()  # type: ignore[attr-defined]
    assert (target.host, target.port, target.where) == ("fd00::5", 1161, "[fd00::5]:1161")
    v3 = RaritanDriver.validate({"power_address": "pdu7", "node_outlet": 2, "snmp_version": "v3",
                                 "snmp_user": "ops", "snmp_auth_protocol": "SHA-256",
                                 "snmp_auth_key": AUTH_KEY, "snmp_priv_protocol": "AES256",
                                 "snmp_priv_key": PRIV_KEY})
    assert v3.snmp_auth_protocol == "sha256" and v3.snmp_priv_protocol == "aes256"  # type: ignore[attr-defined]
    assert v3.pdu_unit == 1 and EatonDriver.validate({**BASE, "community": "c"}).pdu_unit == 0  # type: ignore[attr-defined]
    for settings in (apc, v3):
        text = repr(settings) + str(settings.public_dict()) + repr(settings.snmp_target())  # type: ignore[attr-defined]
        for secret in (COMMUNITY, AUTH_KEY, PRIV_KEY):
            assert secret not in text
    assert {"node_outlet"} <= ApcDriver.settings_model.node_fields()
    assert {"community", "snmp_auth_key", "snmp_priv_key"} == RaritanDriver.settings_model.secret_fields()
    assert parse_address("pdu.example") == ("pdu.example", 161)
    assert parse_address("fd00::1") == ("fd00::1", 161)


def test_missing_pysnmp_is_tool_missing() -> None:
    code = """
import sys
sys.modules["pysnmp"] = None
from drivers import registry
from drivers.errors import ToolMissingError
for name in ("apc", "eaton", "raritan"):
    cls = registry.get(name)
    driver = cls(cls.validate({"power_address": "127.0.0.1", "node_outlet": 1, "community": "c"}), timeout=0.5)
    try:
        driver.query()
    except ToolMissingError:
        pass
    else:
        raise SystemExit(name + " did not report the missing pysnmp")
    driver.close()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_control_api_counts_and_faults(peer: Peer) -> None:
    node = peer.nodes["apc_masterswitch"][0]
    peer.control.set_state(node.name, "on")
    peer.control.fault(node.name, "slow", 0.1)
    seen = peer.control.node(node.name)
    assert seen["power"] == "on" and seen["fault"] == "slow" and seen["latency"] == 0.1
    peer.control.fault(node.name, "none")
    peer.control.reset()
    assert all(not n["counts"] for n in peer.control.nodes().values())
