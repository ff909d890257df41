"""The ipmi driver against real IPMI 2.0 peers: pyghmi's BMC server (tests/peers/ipmi_bmc.py),
cross-checked with ipmitool and FreeIPMI's ipmipower as clients."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.base import BootDevice, PowerState
from drivers.errors import (
    AuthError,
    BusyError,
    CallTimeoutError,
    DeviceError,
    SettingsError,
    UnreachableError,
    UnsupportedError,
)
from drivers.ipmi import (
    COMPLETION_CODE_ERRORS,
    PYGHMI_TEXT_ERRORS,
    IPMIDriver,
    IPMISettings,
    classify_pyghmi_error,
    retry_ceiling,
)
from tests.peers.common import SimNode
from tests.peers.ipmi_bmc import IpmiFleet, make_nodes, start_fleet

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Ipmi-T3st-Secret"
# A loopback block of this run's own, so that two test runs at once do not meet.
BLOCK = f"127.31.{os.getpid() % 250}"
NOBODY = f"{BLOCK}.250"  # a loopback address with nothing listening

pytest.importorskip("pyghmi")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IpmiFleet]:
    nodes = make_nodes(8, "rt", first_address=f"{BLOCK}.1", password=PASSWORD, prefix="ipmitest")
    with start_fleet(nodes, tmp_path_factory.mktemp("ipmi-fleet"), shard_size=4) as running:
        yield running


@pytest.fixture
def nodes(fleet: IpmiFleet) -> list[SimNode]:
    """The fleet's nodes, each powered off, without a fault, counts zeroed."""
    for node in fleet.sim_nodes:
        fleet.fault(node.name, "none")
        fleet.set_state(node.name, "off")
    fleet.reset()
    return fleet.sim_nodes


def params(node: SimNode, **override: Any) -> dict[str, Any]:
    return {**node.power_parameters, **override}


def driver(node: SimNode, timeout: float = 10.0, **override: Any) -> IPMIDriver:
    return IPMIDriver(IPMIDriver.validate(params(node, **override)), timeout=timeout)


def counts(fleet: IpmiFleet, node: SimNode) -> dict[str, int]:
    return fleet.node(node.name)["counts"]


def open_sessions_after_close(fleet: IpmiFleet, node: SimNode) -> int:
    """The peer's open sessions once a close (sent without waiting for the reply) landed."""
    deadline = time.monotonic() + 2.0
    while True:
        n = counts(fleet, node)["open_sessions"]
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.02)


ACTIONS = ("on", "off", "soft_off", "cycle", "reset")


def actions(fleet: IpmiFleet, node: SimNode) -> dict[str, int]:
    c = counts(fleet, node)
    return {k: c[k] for k in ACTIONS if c[k]}


# -- power ------------------------------------------------------------------------------


def test_power_on_from_off(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[0]
    with driver(node) as drv:
        drv.power_on()
    state = fleet.node(node.name)
    assert state["power"] == "on"
    assert actions(fleet, node) == {"on": 1}
    assert open_sessions_after_close(fleet, node) == 0  # close() logged out


def test_power_on_of_a_node_already_on_sends_no_power_command(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[0]
    fleet.set_state(node.name, "on")
    with driver(node) as drv:
        drv.power_on()
    assert actions(fleet, node) == {}
    assert counts(fleet, node)["query"] >= 1
    assert fleet.node(node.name)["power"] == "on"


def test_hard_power_off(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[1]
    fleet.set_state(node.name, "on")
    with driver(node) as drv:
        drv.power_off()
        assert drv.query() is PowerState.OFF
    assert actions(fleet, node) == {"off": 1}


def test_soft_power_off(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[1]
    fleet.set_state(node.name, "on")
    with driver(node) as drv:
        drv.power_off(soft=True)
        drv.power_off(soft=True)  # already off: nothing sent
    assert fleet.node(node.name)["power"] == "off"
    assert actions(fleet, node) == {"soft_off": 1}


def test_power_off_mode_setting_does_not_override_the_soft_argument(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[1]
    fleet.set_state(node.name, "on")
    with driver(node, power_off_mode="soft") as drv:
        drv.power_off()
    assert actions(fleet, node) == {"off": 1}


def test_power_cycle_when_on_is_a_chassis_power_cycle(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[2]
    fleet.set_state(node.name, "on")
    with driver(node) as drv:
        drv.power_cycle()
    assert actions(fleet, node) == {"cycle": 1}
    assert fleet.node(node.name)["power"] == "on"


def test_power_cycle_when_off_powers_on(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[2]
    with driver(node) as drv:
        drv.power_cycle()
    assert actions(fleet, node) == {"on": 1}
    assert fleet.node(node.name)["power"] == "on"


def test_query_and_one_session_reused(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[3]
    with driver(node) as drv:
        assert drv.query() is PowerState.OFF
        fleet.set_state(node.name, "on")
        assert drv.query() is PowerState.ON
        drv.power_off()
        assert drv.query() is PowerState.OFF
        assert counts(fleet, node)["open_sessions"] == 1
    c = counts(fleet, node)
    assert c["sessions"] == 1
    assert c["query"] >= 3
    assert open_sessions_after_close(fleet, node) == 0


@pytest.mark.parametrize(
    ("device", "efi", "boot_type", "want_boot", "want_efi"),
    [
        (BootDevice.PXE, False, "auto", "pxe", False),
        (BootDevice.DISK, False, "legacy", "disk", False),
        (BootDevice.PXE, True, "auto", "pxe", True),
        (BootDevice.PXE, False, "efi", "pxe", True),
        (BootDevice.DISK, False, "efi", "disk", True),
        (BootDevice.CDROM, False, "auto", "cdrom", False),
        (BootDevice.BIOS, False, "auto", "bios", False),
    ],
)
def test_set_boot_device(fleet: IpmiFleet, nodes: list[SimNode], device: BootDevice, efi: bool,
                         boot_type: str, want_boot: str, want_efi: bool) -> None:
    node = nodes[4]
    with driver(node, power_boot_type=boot_type) as drv:
        drv.set_boot_device(device, efi=efi)
    state = fleet.node(node.name)
    assert (state["boot"], state["boot_efi"], state["boot_persistent"]) == (want_boot, want_efi, False)
    assert state["counts"]["boot"] == 1
    assert actions(fleet, node) == {}


def test_next_boot_pxe_is_used_once_by_a_power_cycle(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[4]
    fleet.set_state(node.name, "on")
    with driver(node) as drv:
        drv.set_boot_device(BootDevice.PXE)
        drv.power_cycle()
    state = fleet.node(node.name)
    assert state["booted_from"] == "pxe"
    assert state["boot"] is None


# -- failures ----------------------------------------------------------------------------


def test_wrong_password_is_an_auth_error_after_one_login_attempt(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[5]
    wrong = "Wrong-Pass-4567"
    with driver(node, power_pass=wrong) as drv, pytest.raises(AuthError) as err:
        drv.query()
    assert wrong not in str(err.value.to_dict())
    assert PASSWORD not in str(err.value.to_dict())
    assert node.power_parameters["power_address"] in err.value.message
    c = counts(fleet, node)
    assert (c["sessions"], c["established"], c["query"]) == (1, 0, 0)


def test_login_refused_is_an_auth_error(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[5]
    fleet.fault(node.name, "auth")
    with driver(node) as drv, pytest.raises(AuthError):
        drv.power_on()
    assert counts(fleet, node)["sessions"] == 1
    assert actions(fleet, node) == {}


def test_user_privilege_cannot_control_the_chassis(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[5]
    with driver(node, privilege_level="USER") as drv:
        assert drv.query() is PowerState.OFF
        with pytest.raises(AuthError) as err:
            drv.power_cycle()  # off: a chassis "on"
    assert err.value.details == {"ipmi_code": 0xD4}
    assert fleet.node(node.name)["power"] == "off"


def test_cipher_suite_17_refused_by_the_bmc_is_unsupported(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[5]
    with driver(node, cipher_suite_id="17") as drv, pytest.raises(UnsupportedError):
        drv.query()
    assert open_sessions_after_close(fleet, node) == 0


def test_busy_bmc_refusing_sessions_is_busy(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[6]
    fleet.fault(node.name, "busy")
    with driver(node) as drv, pytest.raises(BusyError) as err:
        drv.power_on()
    assert err.value.retryable
    assert err.value.details == {"rmcp_status": 0x01}
    assert actions(fleet, node) == {}


def test_busy_bmc_in_an_open_session_is_busy(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[6]
    with driver(node) as drv:
        assert drv.query() is PowerState.OFF
        fleet.fault(node.name, "busy")
        with pytest.raises(BusyError) as err:
            drv.power_on()
        assert err.value.details == {"ipmi_code": 0xC0}
        fleet.fault(node.name, "none")
        drv.power_on()  # the same session works again
    assert actions(fleet, node) == {"on": 1}
    assert counts(fleet, node)["sessions"] == 1


def test_slow_bmc_still_answers(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[6]
    fleet.fault(node.name, "slow", latency=0.2)
    start = time.monotonic()
    with driver(node) as drv:
        assert drv.query() is PowerState.OFF
    assert time.monotonic() - start >= 0.2


def test_nothing_listening_is_unreachable_within_the_timeout(nodes: list[SimNode]) -> None:
    node = SimNode("ghost", "rt", "ipmi", params(nodes[0], power_address=NOBODY))
    start = time.monotonic()
    with driver(node, timeout=10.0) as drv, pytest.raises((UnreachableError, CallTimeoutError)) as err:
        drv.query()
    assert time.monotonic() - start < 10.0
    assert err.value.retryable
    assert NOBODY in err.value.message


def test_bmc_that_stops_answering_is_transient(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[7]
    fleet.fault(node.name, "no_answer")
    start = time.monotonic()
    with driver(node) as drv, pytest.raises((UnreachableError, CallTimeoutError)):
        drv.power_on()
    assert time.monotonic() - start < 10.0
    assert actions(fleet, node) == {}


def test_bmc_that_stops_answering_in_an_open_session_times_out_then_recovers(
        fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    node = nodes[7]
    with driver(node, timeout=10.0) as drv:
        assert drv.query() is PowerState.OFF
        fleet.fault(node.name, "no_answer")
        start = time.monotonic()
        with pytest.raises(CallTimeoutError):
            drv.power_on()
        assert time.monotonic() - start < 10.0
        fleet.fault(node.name, "none")
        assert drv.query() is PowerState.OFF  # a fresh login, same driver
    assert actions(fleet, node) == {}


def test_an_idle_session_is_replaced_by_a_fresh_login(
        fleet: IpmiFleet, nodes: list[SimNode], monkeypatch: pytest.MonkeyPatch) -> None:
    import drivers.ipmi

    node = nodes[3]
    with driver(node) as drv:
        drv.query()
        monkeypatch.setattr(drivers.ipmi, "IDLE_RELOGIN", 0.0)
        drv.query()
    assert counts(fleet, node)["sessions"] == 2
    assert open_sessions_after_close(fleet, node) == 0


@pytest.mark.parametrize(("timeout", "ceiling"), [(0.5, 1), (4.0, 2), (10.0, 3), (60.0, 4)])
def test_retry_ceiling_keeps_retries_within_the_timeout(timeout: float, ceiling: int) -> None:
    assert retry_ceiling(timeout) == ceiling


def test_concurrent_clients_on_several_bmcs(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    errors: list[BaseException] = []

    def work(node: SimNode) -> None:
        try:
            with driver(node) as drv:
                for _ in range(10):
                    assert drv.query() is PowerState.OFF
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in nodes[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for node in nodes[:4]:
        assert counts(fleet, node)["query"] == 10


# -- the peer's handshake, on the wire -------------------------------------------------


def open_session_request(tag: int, console_sid: int, auth: int, integrity: int, conf: int) -> bytes:
    payload = bytes([tag, 0, 0, 0]) + struct.pack("<I", console_sid) + bytes([
        0, 0, 0, 8, auth, 0, 0, 0,
        1, 0, 0, 8, integrity, 0, 0, 0,
        2, 0, 0, 8, conf, 0, 0, 0,
    ])
    header = b"\x06\x00\xff\x07" + bytes([6, 0x10]) + bytes(8) + struct.pack("<H", len(payload))
    return header + payload


def exchange(address: str, packet: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect((address, 623))
        sock.send(packet)
        return sock.recv(1024)


def test_peer_answers_a_retransmitted_open_session_with_the_same_reply(nodes: list[SimNode]) -> None:
    address = nodes[3].power_parameters["power_address"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect((address, 623))
        packet = open_session_request(7, 0x1234, 1, 1, 1)
        sock.send(packet)
        first = sock.recv(1024)
        sock.send(packet)
        second = sock.recv(1024)
    assert first == second
    assert first[16 + 1] == 0  # status: success
    assert first[16 + 8:16 + 12] != b"\x00" * 4  # a managed session id


def test_peer_refuses_cipher_suite_17_with_status_0x11(nodes: list[SimNode]) -> None:
    address = nodes[3].power_parameters["power_address"]
    reply = exchange(address, open_session_request(9, 0x99, 3, 4, 1))
    assert reply[16] == 9 and reply[16 + 1] == 0x11


# -- other clients against the same peer ---------------------------------------------------


def need(tool: str) -> str:
    path = shutil.which(tool)
    # `make test` installs ipmitool and freeipmi-tools (deploy/bootstrap.sh): a missing
    # client is a broken install step, so it fails rather than skips.
    assert path is not None, f"{tool} is not installed: run `make test`, which installs it"
    return path


def test_ipmitool_agrees_with_the_peer(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    ipmitool = need("ipmitool")
    node = nodes[2]
    address = node.power_parameters["power_address"]
    base = [ipmitool, "-I", "lanplus", "-C", "3", "-H", address, "-U", "admin", "-P", PASSWORD]
    for power in ("on", "off"):
        fleet.set_state(node.name, power)
        out = subprocess.run([*base, "chassis", "power", "status"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"Chassis Power is {power}"
    out = subprocess.run([*base, "chassis", "power", "on"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    with driver(node) as drv:
        assert drv.query() is PowerState.ON
    assert open_sessions_after_close(fleet, node) == 0  # logout reaches the peer asynchronously
    c = counts(fleet, node)
    assert (c["on"], c["sessions"]) == (1, 4)


def test_freeipmi_ipmipower_agrees_with_the_peer(fleet: IpmiFleet, nodes: list[SimNode]) -> None:
    ipmipower = need("ipmipower")
    fleet.set_state(nodes[1].name, "on")
    addresses = [n.power_parameters["power_address"] for n in nodes[:4]]
    out = subprocess.run(
        [ipmipower, "-D", "LAN_2_0", "-I", "3", "-u", "admin", "-p", PASSWORD,
         "-h", ",".join(addresses), "--stat"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    seen = dict(line.split(": ", 1) for line in out.stdout.strip().splitlines())
    assert seen == {a: ("on" if i == 1 else "off") for i, a in enumerate(addresses)}


# -- settings and translation, offline -------------------------------------------------------


def test_settings_defaults_and_secret_hiding() -> None:
    s = IPMIDriver.validate({"power_address": "10.1.2.3", "power_user": "u", "power_pass": PASSWORD,
                             "k_g": "Kg-Secret-Value"})
    assert isinstance(s, IPMISettings)
    assert (s.power_port, s.cipher_suite_id, s.privilege_level, s.power_boot_type, s.power_off_mode) == (
        623, "3", "OPERATOR", "auto", "hard")
    for text in (repr(s), str(s), str(s.public_dict())):
        assert PASSWORD not in text and "Kg-Secret-Value" not in text
    assert IPMISettings.secret_fields() == {"power_pass", "k_g"}
    assert IPMISettings.node_fields() == {"mac_address"}
    assert IPMIDriver(s).bmc_key() == "ipmi:10.1.2.3:623"
    assert IPMIDriver.capabilities.pxe_next_boot and IPMIDriver.capabilities.power_query
    assert IPMIDriver.capabilities.bmc_enlistment


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"power_address": None}, "power_address"),
        ({"power_address": ""}, "power_address"),
        ({"power_address": "http://x y"}, "power_address"),
        ({"cipher_suite_id": "8"}, "cipher_suite_id"),
        ({"privilege_level": "ROOT"}, "privilege_level"),
        ({"power_boot_type": "uefi"}, "power_boot_type"),
        ({"power_off_mode": "gentle"}, "power_off_mode"),
        ({"power_port": 70000}, "power_port"),
        ({"mac_address": "not-a-mac"}, "mac_address"),
        ({"power_pass": "x" * 21}, "power_pass"),
        ({"unknown_param": PASSWORD}, "unknown_param"),
    ],
)
def test_bad_settings_are_refused_without_echoing_secrets(override: dict[str, Any], field: str) -> None:
    base = {"power_address": "10.1.2.3", "power_user": "admin", "power_pass": PASSWORD}
    if override.get("power_address", "") is None:
        base.pop("power_address")
        override = {}
    with pytest.raises(SettingsError) as err:
        IPMIDriver.validate({**base, **override})
    assert field in err.value.message
    assert PASSWORD not in str(err.value.to_dict())
    assert "x" * 21 not in err.value.message


def test_maas_style_values_are_accepted() -> None:
    s = IPMIDriver.validate({"power_address": "bmc-1.example.net", "cipher_suite_id": 17,
                             "privilege_level": "admin", "power_boot_type": "", "k_g": "",
                             "mac_address": "52:54:00:AB:CD:EF"})
    assert (s.cipher_suite_id, s.privilege_level, s.power_boot_type, s.k_g, s.mac_address) == (
        "17", "ADMIN", "auto", None, "52:54:00:ab:cd:ef")


def test_import_needs_no_pyghmi_and_a_call_reports_it_missing() -> None:
    code = """
import sys
sys.modules["pyghmi"] = None
import drivers.ipmi as ipmi
from drivers.errors import ToolMissingError
drv = ipmi.IPMIDriver(ipmi.IPMIDriver.validate({"power_address": "127.0.0.1"}))
try:
    drv.query()
except ToolMissingError as exc:
    print(exc.code)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "tool_missing", out.stderr


def _pyghmi_exc(text: str | None, code: int = 0) -> Exception:
    from pyghmi.exceptions import IpmiException

    return IpmiException(text, code)


@pytest.mark.parametrize(("prefix", "cls", "_meaning"), PYGHMI_TEXT_ERRORS)
def test_every_pyghmi_text_in_the_table_is_translated(prefix: str, cls: type | None, _meaning: str) -> None:
    err = classify_pyghmi_error(_pyghmi_exc(prefix + " and more"), address="a", action="x", logged_in=True)
    assert isinstance(err, cls or CallTimeoutError)
    login = classify_pyghmi_error(_pyghmi_exc(prefix), address="a", action="x", logged_in=False)
    assert isinstance(login, cls or UnreachableError)


@pytest.mark.parametrize(
    ("text", "code", "cls"),
    [
        ("Node Busy", 0, BusyError),
        ("Insufficient privilege level or firmware firewall", 0, AuthError),
        ("Command not supported in present state", 0, DeviceError),
        ("whatever", 0xC0, BusyError),
        ("whatever", 0xD5, DeviceError),
        (None, 0, CallTimeoutError),
        ("Unauthorized name in RAKP2", 0, AuthError),
        ("Insufficient resources to create new session (wait for existing sessions to timeout)", 0, BusyError),
        ("No Cipher suite match with proposed security algorithms", 0, UnsupportedError),
        ("Invalid integrity check value reported in RAKP4", 0, AuthError),
        ("something pyghmi never said " + PASSWORD, 0, DeviceError),
    ],
)
def test_pyghmi_errors_and_codes_are_translated(text: str | None, code: int, cls: type) -> None:
    err = classify_pyghmi_error(_pyghmi_exc(text, code), address="10.9.9.9:623", action="power on",
                                logged_in=True)
    assert type(err) is cls
    assert "10.9.9.9:623" in err.message and PASSWORD not in err.message


def test_completion_code_table_is_complete_for_transient_codes() -> None:
    assert COMPLETION_CODE_ERRORS[0xC0] is BusyError
    assert COMPLETION_CODE_ERRORS[0xC3] is CallTimeoutError
    assert classify_pyghmi_error(struct.error("x"), address="a", action="x", logged_in=True).code == "device_error"
    assert classify_pyghmi_error(OSError("x"), address="a", action="x", logged_in=True).code == "unreachable"
