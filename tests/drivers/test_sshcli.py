"""wedge, mscm, hmc and fence_cdu drivers (and drivers/sshcli.py) against the SSH / telnet
CLI peer of tests/peers/ssh_cli.py: every capability, every error code, host-key policies,
the telnet option refusal, and secrets kept out of messages."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers import registry
from drivers.base import BootDevice, PowerDriver, PowerState
from drivers.errors import PowerError, SettingsError
from drivers.sshcli import BUSY_TEXT, SshSession, Target, TelnetChannel
from tests.peers import snmp_pdu, ssh_cli
from tests.peers.common import SimNode, free_port

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ssh_cli.CliPeer]:
    p = ssh_cli.start_peer(Path(tmp_path_factory.mktemp("ssh-cli")))
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def clean(peer: ssh_cli.CliPeer) -> Iterator[None]:
    for name in peer.nodes():
        peer.set_fault(name, "none")
        peer.set_state(name, "off")
    peer.reset_counts()
    yield
    for name in peer.nodes():
        peer.set_fault(name, "none")


def logged_out(peer: ssh_cli.CliPeer, name: str) -> bool:
    """The device of ``name`` has no open login (the peer hears a close a moment later)."""
    deadline = time.monotonic() + 3
    while peer.nodes()[name]["counts"]["open_sessions"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return peer.nodes()[name]["counts"]["open_sessions"] == 0


def nodes(peer: ssh_cli.CliPeer, kind: str, protocol: str = "ssh") -> list[SimNode]:
    return ssh_cli.sim_nodes(peer, protocol=protocol)[kind]


def driver(node: SimNode, timeout: float = TIMEOUT, **override: Any) -> PowerDriver:
    cls = registry.get(node.power_type)
    return cls(cls.validate({**node.power_parameters, **override}), timeout=timeout)


def error(node: SimNode, action: str = "query", timeout: float = TIMEOUT, **override: Any) -> PowerError:
    drv = driver(node, timeout=timeout, **override)
    try:
        with pytest.raises(PowerError) as err:
            getattr(drv, action)()
    finally:
        drv.close()
    assert ssh_cli.PASSWORD not in err.value.message
    assert "not-the-password" not in err.value.message
    return err.value


# (power type, protocol) for every CLI flavour
FLAVOURS = [("wedge", "ssh"), ("mscm", "ssh"), ("hmc", "ssh"), ("fence_cdu", "ssh"), ("fence_cdu", "telnet")]


@pytest.mark.parametrize(("kind", "protocol"), FLAVOURS)
def test_on_query_off_cycle(peer: ssh_cli.CliPeer, kind: str, protocol: str) -> None:
    node = nodes(peer, kind, protocol)[0]
    drv = driver(node)
    try:
        assert drv.query() is PowerState.OFF
        drv.power_on()
        assert peer.nodes()[node.name]["power"] == "on"
        assert drv.query() is PowerState.ON
        drv.power_off()
        assert peer.nodes()[node.name]["power"] == "off"
        assert drv.query() is PowerState.OFF
        peer.set_state(node.name, "on")
        drv.power_cycle()
        assert drv.query() is PowerState.ON
        counts = peer.nodes()[node.name]["counts"]
        assert counts["sessions"] == 1, counts  # one login reused for every call
        assert counts["open_sessions"] == 1
        assert counts["query"] == 4
        if kind == "fence_cdu":
            assert (counts["on"], counts["off"], counts["cycle"]) == (1, 1, 1), counts
        else:
            assert (counts["on"], counts["off"], counts["cycle"]) == (2, 2, 0), counts
    finally:
        drv.close()
    assert logged_out(peer, node.name)  # close() logged out


@pytest.mark.parametrize(("kind", "protocol"), FLAVOURS)
def test_power_on_leaves_a_running_node_alone(peer: ssh_cli.CliPeer, kind: str, protocol: str) -> None:
    node = nodes(peer, kind, protocol)[0]
    peer.set_state(node.name, "on")
    with driver(node) as drv:
        if kind != "hmc":  # the HMC refuses to activate a running LPAR: the policy queries first
            drv.power_on()
        assert drv.query() is PowerState.ON
    counts = peer.nodes()[node.name]["counts"]
    assert counts["off"] == counts["cycle"] == counts["reset"] == 0


def test_soft_off(peer: ssh_cli.CliPeer) -> None:
    for kind in ("mscm", "hmc"):
        node = nodes(peer, kind)[0]
        peer.set_state(node.name, "on")
        with driver(node) as drv:
            drv.power_off(soft=True)
        assert peer.nodes()[node.name]["power"] == "off"
        assert peer.nodes()[node.name]["counts"]["soft_off"] == 1
    for kind in ("wedge", "fence_cdu"):
        node = nodes(peer, kind)[0]
        drv = driver(node)
        with pytest.raises(PowerError) as err:
            drv.power_off(soft=True)
        drv.close()
        assert err.value.code == "unsupported"


def test_mscm_bootonce_pxe(peer: ssh_cli.CliPeer) -> None:
    node = nodes(peer, "mscm")[1]
    with driver(node) as drv:
        drv.set_boot_device(BootDevice.PXE)
        with pytest.raises(PowerError) as err:
            drv.set_boot_device(BootDevice.DISK)
    assert err.value.code == "unsupported"
    assert peer.nodes()[node.name]["boot"] == "pxe"
    assert peer.nodes()[node.name]["counts"]["boot"] == 1


def test_hmc_power_on_boots_from_the_network(peer: ssh_cli.CliPeer) -> None:
    node = nodes(peer, "hmc")[1]
    with driver(node) as drv:
        drv.set_boot_device(BootDevice.PXE)  # checks the LPAR exists
        assert peer.nodes()[node.name]["counts"]["query"] == 1
        drv.power_on()
    assert peer.nodes()[node.name]["boot"] == "network-all"


def test_mscm_probe(peer: ssh_cli.CliPeer) -> None:
    node = nodes(peer, "mscm")[0]
    peer.set_state(nodes(peer, "mscm")[2].name, "on")
    chassis = {k: v for k, v in node.power_parameters.items() if k != "node_id"}
    machines = registry.get("mscm").probe_chassis(chassis, timeout=TIMEOUT)
    assert [m.power_parameters for m in machines] == [{"node_id": "c1n1"}, {"node_id": "c2n1"},
                                                     {"node_id": "c3n1"}]
    assert [m.power for m in machines] == [PowerState.OFF, PowerState.OFF, PowerState.ON]
    assert machines[0].mac_addresses == ("a0:1d:48:00:00:01", "a0:1d:48:00:00:02")
    assert logged_out(peer, node.name)


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "protocol"), FLAVOURS)
def test_wrong_password_is_auth_failed(peer: ssh_cli.CliPeer, kind: str, protocol: str) -> None:
    node = nodes(peer, kind, protocol)[0]
    err = error(node, power_pass="not-the-password")
    assert err.code == "auth_failed"
    peer.set_fault(node.name, "auth")
    assert error(node).code == "auth_failed"


@pytest.mark.parametrize(("kind", "protocol"), FLAVOURS)
def test_nothing_listening_is_unreachable(peer: ssh_cli.CliPeer, kind: str, protocol: str) -> None:
    node = nodes(peer, kind, protocol)[0]
    assert error(node, power_port=free_port()).code == "unreachable"
    assert error(node, power_address="no-such-host.invalid").code == "unreachable"


@pytest.mark.parametrize(("kind", "protocol"), FLAVOURS)
def test_busy_device_is_busy(peer: ssh_cli.CliPeer, kind: str, protocol: str) -> None:
    node = nodes(peer, kind, protocol)[0]
    peer.set_fault(node.name, "busy")
    assert error(node).code == "busy"


@pytest.mark.parametrize(("kind", "protocol"), [("mscm", "ssh"), ("fence_cdu", "telnet")])
def test_session_limit_is_busy(peer: ssh_cli.CliPeer, kind: str, protocol: str) -> None:
    node = nodes(peer, kind, protocol)[0]
    limit = peer.device_of(node.name).max_sessions
    held = [driver(node) for _ in range(limit)]
    try:
        for drv in held:
            drv.query()
        assert error(node).code == "busy"
    finally:
        for drv in held:
            drv.close()
    assert logged_out(peer, node.name)
    with driver(node) as drv:
        drv.query()


@pytest.mark.parametrize(("kind", "protocol"), FLAVOURS)
def test_no_answer_is_timeout(peer: ssh_cli.CliPeer, kind: str, protocol: str) -> None:
    node = nodes(peer, kind, protocol)[0]
    peer.set_fault(node.name, "no_answer")
    assert error(node, timeout=0.5).code == "timeout"


@pytest.mark.parametrize(("kind", "protocol"), FLAVOURS)
def test_garbage_is_device_error(peer: ssh_cli.CliPeer, kind: str, protocol: str) -> None:
    node = nodes(peer, kind, protocol)[0]
    peer.set_fault(node.name, "garbage")
    assert error(node).code == "device_error"


def test_slow_device_within_the_timeout_answers(peer: ssh_cli.CliPeer) -> None:
    node = nodes(peer, "hmc")[0]
    peer.set_fault(node.name, "slow", latency=0.3)
    with driver(node) as drv:
        assert drv.query() is PowerState.OFF


@pytest.mark.parametrize(("kind", "override"), [
    ("mscm", {"node_id": "c9n1"}),
    ("hmc", {"lpar": "nosuch"}),
    ("hmc", {"server_name": "nosuch"}),
    ("fence_cdu", {"power_id": ".B9"}),
])
def test_unknown_node_is_not_found(peer: ssh_cli.CliPeer, kind: str, override: dict[str, str]) -> None:
    node = nodes(peer, kind)[0]
    assert error(node, **override).code == "not_found"
    if kind == "hmc":
        assert error(node, "power_on", **override).code == "not_found"


@pytest.mark.parametrize(("kind", "params"), [
    ("mscm", {"node_id": "node1"}),
    ("hmc", {"lpar": "x'; reboot"}),
    ("fence_cdu", {"power_id": "A-12"}),
    ("fence_cdu", {"power_protocol": "rsh"}),
    ("wedge", {"host_key_policy": "trust-me"}),
    ("wedge", {"power_port": 70000}),
])
def test_bad_settings(peer: ssh_cli.CliPeer, kind: str, params: dict[str, Any]) -> None:
    node = nodes(peer, kind)[0]
    with pytest.raises(SettingsError):
        registry.get(kind).validate({**node.power_parameters, **params})


# -- host keys ------------------------------------------------------------------------------


def test_host_key_policies(peer: ssh_cli.CliPeer, tmp_path: Path) -> None:
    node = nodes(peer, "wedge")[0]
    fresh = tmp_path / "ssh" / "known_hosts"
    err = error(node, host_key_policy="reject", known_hosts=str(fresh))
    assert err.code == "auth_failed" and err.details.get("host_key") == "unknown"

    with driver(node, host_key_policy="accept-new", known_hosts=str(fresh)) as drv:
        assert drv.query() is PowerState.OFF  # recorded on first contact
    assert f"[127.0.0.1]:{node.power_parameters['power_port']} ssh-ed25519 " in fresh.read_text()
    with driver(node, host_key_policy="reject", known_hosts=str(fresh)) as drv:
        assert drv.query() is PowerState.OFF  # and trusted afterwards

    # Another device's key recorded for this address: a changed key is refused.
    other = nodes(peer, "mscm")[0].power_parameters["power_port"]
    line = next(x for x in peer.known_hosts.read_text().splitlines()
                if x.startswith(f"[127.0.0.1]:{other} "))
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(line.replace(f"]:{other} ", f"]:{node.power_parameters['power_port']} ") + "\n")
    for policy in ("accept-new", "reject"):
        err = error(node, host_key_policy=policy, known_hosts=str(wrong))
        assert err.code == "auth_failed" and err.details.get("host_key") == "changed", err

    with driver(node, host_key_policy="ignore", known_hosts=str(wrong)) as drv:
        assert drv.query() is PowerState.OFF


# -- the transport itself -------------------------------------------------------------------


def test_telnet_refuses_every_option(peer: ssh_cli.CliPeer) -> None:
    node = nodes(peer, "fence_cdu", "telnet")[0]
    dev = peer.device_of(node.name)
    dev.telnet_replies.clear()
    with driver(node) as drv:
        drv.query()
    assert sorted(dev.telnet_replies) == sorted([
        bytes((255, 254, 1)), bytes((255, 254, 3)), bytes((255, 252, 31))])


def test_telnet_filter_handles_subnegotiation_and_doubled_iac() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    chan = TelnetChannel(Target("127.0.0.1", port, "u", "p", 1.0))
    conn, _ = server.accept()
    try:
        conn.sendall(bytes((255, 250, 24, 1, 255, 240)) + b"a" + bytes((255, 255)) + b"b"
                     + bytes((255, 253, 24)) + b"c")
        text = ""
        while len(text) < 4:
            text += chan.read(1.0)
        assert text.encode("utf-8", "surrogateescape") == "a\ufffdbc".encode("utf-8", "surrogateescape")
        assert conn.recv(10) == bytes((255, 252, 24))
    finally:
        chan.close()
        conn.close()
        server.close()


@pytest.mark.parametrize("text", [
    "Too many sessions", "Maximum number of sessions reached", "maximum connections exceeded",
    "No free sessions", "All sessions are in use. Try again later.",
])
def test_busy_text(text: str) -> None:
    assert BUSY_TEXT.search(text)


def test_secrets_stay_out_of_repr(peer: ssh_cli.CliPeer) -> None:
    node = nodes(peer, "fence_cdu")[0]
    drv = driver(node)
    target = drv.target  # type: ignore[attr-defined]
    for text in (repr(drv.settings), str(drv.settings.public_dict()), repr(target),
                 repr(SshSession(target))):
        assert ssh_cli.PASSWORD not in text


def test_bmc_key_groups_nodes_behind_one_device(peer: ssh_cli.CliPeer) -> None:
    keys = {driver(n).bmc_key() for n in nodes(peer, "mscm")}
    assert len(keys) == 1
    assert driver(nodes(peer, "hmc")[0]).bmc_key() not in keys


# -- fence_cdu's SNMP mode (Sentry3 MIB), against tests/peers/snmp_pdu.py -------------------

SNMP_V3 = snmp_pdu.V3User("cdu", "sha", "cdu-auth-key-1", "aes", "cdu-priv-key-1")


@pytest.fixture(scope="module")
def sentry() -> Iterator[tuple[snmp_pdu.PduFleet, list[SimNode]]]:
    fleet = snmp_pdu.PduFleet()
    agent, _ = snmp_pdu.start_pdu(fleet, "sentry3", "127.0.0.1", 3, "t", "t-cdu-snmp",
                                  community="cdu-community", v3_user=SNMP_V3)
    v2 = {"power_address": f"127.0.0.1:{agent.port}", "power_protocol": "snmp",
          "community": "cdu-community"}
    v3 = {"power_address": "127.0.0.1", "power_port": agent.port, "power_protocol": "snmp",
          "snmp_version": "3", "snmp_user": SNMP_V3.name, "snmp_auth_protocol": "sha",
          "snmp_auth_key": SNMP_V3.auth_key, "snmp_priv_protocol": "aes",
          "snmp_priv_key": SNMP_V3.priv_key}
    nodes = [SimNode(f"t-cdu-snmp-{n}", "t", "fence_cdu", {**(v3 if n == 3 else v2), "power_id": f".A{n}"})
             for n in (1, 2, 3)]
    yield fleet, nodes
    fleet.stop()


@pytest.fixture
def snmp_fresh(sentry: tuple[snmp_pdu.PduFleet, list[SimNode]]) -> Iterator[tuple[snmp_pdu.PduFleet, list[SimNode]]]:
    fleet, nodes = sentry
    for n in nodes:
        fleet.set_fault(n.name, "none")
        fleet.set_state(n.name, "off")
    fleet.reset_counts()
    yield sentry
    for n in nodes:
        fleet.set_fault(n.name, "none")


@pytest.mark.parametrize("which", [0, 2])  # v2c, v3
def test_snmp_on_query_off_cycle(snmp_fresh: tuple[snmp_pdu.PduFleet, list[SimNode]], which: int) -> None:
    fleet, nodes = snmp_fresh
    node = nodes[which]
    with driver(node) as drv:
        assert drv.bmc_key().startswith("snmp:127.0.0.1:")
        assert drv.query() is PowerState.OFF
        drv.power_on()
        assert fleet.nodes()[node.name]["power"] == "on"
        assert drv.query() is PowerState.ON
        drv.power_off()
        assert drv.query() is PowerState.OFF
        fleet.set_state(node.name, "on")
        drv.power_cycle()
        assert drv.query() is PowerState.ON
        with pytest.raises(PowerError) as err:
            drv.power_off(soft=True)
        assert err.value.code == "unsupported"
    counts = fleet.nodes()[node.name]["counts"]
    assert (counts.get("on"), counts.get("off"), counts.get("cycle")) == (1, 1, 1), counts


def test_snmp_errors(snmp_fresh: tuple[snmp_pdu.PduFleet, list[SimNode]]) -> None:
    fleet, nodes = snmp_fresh
    assert error(nodes[0], power_id=".A9").code == "not_found"
    err = error(nodes[2], snmp_auth_key="not-the-password")
    assert err.code == "auth_failed" and "not-the-password" not in str(err.to_dict())
    fleet.set_fault(nodes[0].name, "busy")
    assert error(nodes[0], "power_on").code == "busy"
    fleet.set_fault(nodes[0].name, "no_answer")
    assert error(nodes[0], timeout=0.5).code == "timeout"


def test_snmp_settings() -> None:
    cls = registry.get("fence_cdu")
    with pytest.raises(SettingsError):  # no community
        cls.validate({"power_address": "10.0.0.1", "power_id": ".A1", "power_protocol": "snmp"})
    with pytest.raises(SettingsError):  # CLI modes need a login
        cls.validate({"power_address": "10.0.0.1", "power_id": ".A1", "power_protocol": "ssh"})
    settings = cls.validate({"power_address": "10.0.0.1", "power_id": ".ab12",
                             "power_protocol": "snmp", "community": "c0mmunity-Secret"})
    assert settings.power_id == ".AB12"  # type: ignore[attr-defined]
    drv = cls(settings)
    assert drv._snmp.state_oid() == "1.3.6.1.4.1.1718.3.2.3.1.5.1.2.12"  # type: ignore[attr-defined]
    assert "c0mmunity-Secret" not in repr(settings)
