"""The ``amt`` (WS-Management) and ``nova`` (Keystone v3 + compute API) drivers against
the peers of tests/peers/http_soap.py: every capability and every error code."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from drivers import registry
from drivers.amt import AmtDriver
from drivers.base import BootDevice, PowerDriver, PowerState
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
from tests.peers.common import free_port
from tests.peers.http_soap import AmtPeer, NovaPeer, PeerGroup, amt_fleet, nova_cloud

AMT_PW = "Amt-S3cret-Pw!"
NOVA_PW = "N0va-S3cret-Pw"
TIMEOUT = 1.0


def driver(power_type: str, params: dict[str, Any], timeout: float = TIMEOUT) -> PowerDriver:
    cls = registry.get(power_type)
    return cls(cls.validate(params), timeout=timeout)


def check_error(fn: Any, cls: type[PowerError], *secrets: str) -> PowerError:
    with pytest.raises(cls) as err:
        fn()
    for secret in secrets:
        assert secret not in err.value.message
        assert secret not in repr(err.value.to_dict())
    return err.value


# -- amt ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def amt_group() -> Iterator[PeerGroup]:
    with amt_fleet(2, "t", AMT_PW) as group:
        yield group


@pytest.fixture()
def amt(amt_group: PeerGroup) -> PeerGroup:
    """The module's AMT machines, off, without faults, boot or counts."""
    for peer in amt_group.peers:
        assert isinstance(peer, AmtPeer)
        peer.states[peer.name].boot = None
        peer.boot_data["UseIDER"] = "false"
    for node in amt_group.sim_nodes:
        amt_group.fault(node.name, "none")
        amt_group.set_state(node.name, "off")
    amt_group.reset_counts()
    return amt_group


def amt_driver(group: PeerGroup, index: int = 0, **over: Any) -> PowerDriver:
    return driver("amt", {**group.sim_nodes[index].power_parameters, **over})


@pytest.mark.capability("amt", "power_query")
def test_amt_power_on_off_cycle_query(amt: PeerGroup) -> None:
    name = amt.sim_nodes[0].name
    with amt_driver(amt) as d:
        assert d.query() is PowerState.OFF
        d.power_on()
        assert d.query() is PowerState.ON and amt.node(name)["power"] == "on"
        d.power_cycle()  # master bus reset: stays on
        d.power_off()
        assert d.query() is PowerState.OFF
        d.power_on()
        d.power_off(soft=True)
        assert amt.node(name)["power"] == "off"
    counts = amt.node(name)["counts"]
    assert (counts["on"], counts["reset"], counts["off"], counts["soft_off"]) == (2, 1, 1, 1)
    assert counts["sessions"] == 1  # one digest challenge: the nonce is reused
    assert amt.node(amt.sim_nodes[1].name)["counts"]["query"] == 0  # other machine untouched


def test_amt_on_when_on_and_cycle_when_off(amt: PeerGroup) -> None:
    name = amt.sim_nodes[0].name
    amt.set_state(name, "on")
    with amt_driver(amt) as d:
        d.power_on()  # AMT refuses (ReturnValue 2): fine, it is on; never a reset
        assert amt.node(name)["counts"]["reset"] == 0
        amt.set_state(name, "off")
        d.power_off()  # already off: fine
        d.power_cycle()  # off: the reset is refused, the machine is powered on
        assert amt.node(name)["power"] == "on"


@pytest.mark.capability("amt", "pxe_next_boot")
@pytest.mark.parametrize(("device", "want"), [(BootDevice.PXE, "pxe"), (BootDevice.DISK, "disk"),
                                              (BootDevice.CDROM, "cdrom")])
def test_amt_next_boot(amt: PeerGroup, device: BootDevice, want: str) -> None:
    peer = amt.peers[0]
    assert isinstance(peer, AmtPeer)
    peer.boot_data["UseIDER"] = "true"  # a leftover redirection would divert the boot
    with amt_driver(amt) as d:
        d.set_boot_device(device)
    node = amt.node(peer.name)
    assert node["boot"] == want and node["counts"]["boot"] == 1
    assert peer.last_put["UseIDER"] == "false"


def test_amt_boot_refusals(amt: PeerGroup) -> None:
    with amt_driver(amt) as d:
        check_error(lambda: d.set_boot_device(BootDevice.PXE, persistent=True), UnsupportedError)
        check_error(lambda: d.set_boot_device(BootDevice.BIOS), UnsupportedError)
    assert amt.node(amt.sim_nodes[0].name)["counts"]["boot"] == 0


def test_amt_return_values_are_translated(amt: PeerGroup) -> None:
    d = amt_driver(amt)
    assert isinstance(d, AmtDriver)
    with d:
        err = check_error(lambda: d._power(5, "power cycle soft"), UnsupportedError)  # ReturnValue 1
        assert err.details["return_value"] == 1


@pytest.mark.capability("amt", "detailed_errors")
def test_amt_errors(amt: PeerGroup) -> None:
    name = amt.sim_nodes[0].name
    check_error(amt_driver(amt, power_pass="wrong-password").query, AuthError, "wrong-password", AMT_PW)
    amt.fault(name, "auth")
    check_error(amt_driver(amt).query, AuthError, AMT_PW)
    amt.fault(name, "busy")
    err = check_error(amt_driver(amt).power_on, BusyError, AMT_PW)
    assert "EndpointUnavailable" in err.message
    amt.fault(name, "garbage")
    check_error(amt_driver(amt).query, DeviceError, AMT_PW)
    amt.fault(name, "no_answer")
    try:
        check_error(amt_driver(amt).query, CallTimeoutError, AMT_PW)
    finally:
        amt.fault(name, "none")
    dead = f"127.0.0.1:{free_port()}"
    check_error(amt_driver(amt, power_address=dead).query, UnreachableError, AMT_PW)
    assert amt_driver(amt).query() is PowerState.OFF


def test_amt_settings() -> None:
    cls = registry.get("amt")
    s = cls.validate({"power_address": "10.1.2.3", "power_pass": AMT_PW})
    assert s.power_user == "admin"  # type: ignore[attr-defined]
    assert AMT_PW not in repr(s)
    assert cls(s).bmc_key() == "amt:http://10.1.2.3:16992"
    tls = cls.validate({"power_address": "10.1.2.3", "power_pass": AMT_PW, "power_protocol": "https"})
    assert cls(tls).bmc_key() == "amt:https://10.1.2.3:16993"
    for bad in ({"power_address": "10.1.2.3"}, {"power_address": "10.1.2.3", "power_pass": AMT_PW,
                                                 "power_protocol": "ftp"},
                {"power_address": "http://u:p@10.1.2.3", "power_pass": AMT_PW}):
        check_error(lambda b=bad: cls.validate(b), SettingsError, AMT_PW)


# -- nova --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nova_peer() -> Iterator[NovaPeer]:
    with nova_cloud(2, "t", NOVA_PW) as peer:
        yield peer  # type: ignore[misc]


@pytest.fixture()
def nova(nova_peer: NovaPeer) -> NovaPeer:
    """The module's cloud, its instances stopped, without faults, tokens or counts."""
    nova_peer.tokens.clear()
    for node in nova_peer.sim_nodes:
        nova_peer.fault(node.name, "none")
        nova_peer.set_state(node.name, "off")
    nova_peer.reset_counts()
    return nova_peer


def nova_driver(peer: NovaPeer, index: int = 0, **over: Any) -> PowerDriver:
    return driver("nova", {**peer.sim_nodes[index].power_parameters, **over})


@pytest.mark.capability("nova", "power_query")
def test_nova_power_on_off_cycle_query(nova: NovaPeer) -> None:
    name = nova.sim_nodes[0].name
    with nova_driver(nova) as d:
        assert d.query() is PowerState.OFF
        d.power_on()
        assert d.query() is PowerState.ON and nova.node(name)["power"] == "on"
        d.power_on()  # 409 "in vm_state active": already on, success
        d.power_off()
        assert d.query() is PowerState.OFF
        d.power_off()  # 409 "in vm_state stopped": already off
        d.power_cycle()  # hard reboot starts a stopped instance
        assert d.query() is PowerState.ON
    counts = nova.node(name)["counts"]
    assert (counts["on"], counts["off"], counts["cycle"]) == (2, 2, 1)
    assert counts["sessions"] == 1  # one token for the driver's life


def test_nova_token_renewed_once_when_refused(nova: NovaPeer) -> None:
    with nova_driver(nova) as d:
        assert d.query() is PowerState.OFF
        nova.tokens.clear()  # revoked / expired
        assert d.query() is PowerState.OFF
    assert nova.node(nova.sim_nodes[0].name)["counts"]["sessions"] == 2


def test_nova_auth_url_with_or_without_v3(nova: NovaPeer) -> None:
    url = nova.auth_url
    assert url.endswith("/v3")
    assert nova_driver(nova, os_authurl=url.removesuffix("/v3")).query() is PowerState.OFF


@pytest.mark.capability("nova", "detailed_errors")
def test_nova_errors(nova: NovaPeer) -> None:
    name = nova.sim_nodes[0].name
    check_error(nova_driver(nova, os_password="wrong-password").query, AuthError, "wrong-password", NOVA_PW)
    check_error(nova_driver(nova, os_tenantname="other").query, AuthError, NOVA_PW)
    check_error(nova_driver(nova, os_user_domain="Other").query, AuthError, NOVA_PW)
    check_error(nova_driver(nova, nova_id="00000000-0000-4000-8000-000000000000").query, NotFoundError)
    check_error(nova_driver(nova, nova_id="00000000-0000-4000-8000-000000000000").power_on, NotFoundError)
    nova.fault(name, "busy")
    check_error(nova_driver(nova).query, BusyError, NOVA_PW)
    nova.fault(name, "none")
    nova.set_task(name, "powering-on")
    err = check_error(nova_driver(nova).power_on, BusyError, NOVA_PW)
    assert "powering-on" in err.message
    nova.set_task(name, None)
    nova.set_vm_state(name, "suspended")
    check_error(nova_driver(nova).power_on, DeviceError, NOVA_PW)
    nova.set_vm_state(name, None)
    nova.fault(name, "garbage")
    check_error(nova_driver(nova).query, DeviceError, NOVA_PW)
    nova.fault(name, "no_answer")
    try:
        check_error(nova_driver(nova).query, CallTimeoutError, NOVA_PW)
    finally:
        nova.fault(name, "none")
    nova.fault(name, "auth")
    check_error(nova_driver(nova).query, AuthError, NOVA_PW)
    nova.fault(name, "none")
    dead = f"http://127.0.0.1:{free_port()}/identity/v3"
    check_error(nova_driver(nova, os_authurl=dead).query, UnreachableError, NOVA_PW)
    assert nova_driver(nova).query() is PowerState.OFF


def test_nova_token_never_in_messages(nova: NovaPeer) -> None:
    name = nova.sim_nodes[0].name
    d = nova_driver(nova)
    d.query()
    (token,) = nova.tokens
    nova.set_task(name, "rebooting")
    err = check_error(d.power_off, BusyError, NOVA_PW, token)
    assert token not in repr(d.settings) and NOVA_PW not in repr(d.settings)
    assert err.details["task_state"] == "rebooting"
    d.close()


def test_nova_settings() -> None:
    cls = registry.get("nova")
    base = {"os_authurl": "https://keystone.example:5000/v3", "os_tenantname": "p", "os_username": "u",
            "os_password": NOVA_PW, "nova_id": "abc"}
    s = cls.validate(base)
    assert (s.os_user_domain, s.os_project_domain) == ("Default", "Default")  # type: ignore[attr-defined]
    assert cls(s).bmc_key() == "nova:https://keystone.example:5000:p"
    assert s.node_fields() == {"nova_id"}
    for bad in ({**base, "os_authurl": "ftp://x"}, {**base, "nova_id": ""},
                {k: v for k, v in base.items() if k != "os_password"}):
        check_error(lambda b=bad: cls.validate(b), SettingsError, NOVA_PW)
