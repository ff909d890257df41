"""The HTTP power types (webhook, dli, openbmc, rsd, msftocs, ucsm) and their shared
transport, against the simulated devices of tests/peers/http_devices.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from drivers import registry
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
from drivers.httpclient import HttpAuth, HttpClient, base_url, error_for_status, parse_xml
from tests.peers import http_devices as hd
from tests.peers.common import free_port

PW = hd.PASSWORD
TIMEOUT = 1.0


def driver(power_type: str, params: dict[str, Any], timeout: float = TIMEOUT) -> PowerDriver:
    cls = registry.get(power_type)
    return cls(cls.validate(params), timeout=timeout)


def dead_address() -> str:
    """A loopback port with nothing listening."""
    return f"127.0.0.1:{free_port()}"


def check_error(fn: Any, cls: type[PowerError], *secrets: str) -> PowerError:
    with pytest.raises(cls) as err:
        fn()
    for secret in secrets:
        assert secret not in err.value.message
        assert secret not in repr(err.value.to_dict())
    return err.value


@pytest.fixture()
def fleet() -> Iterator[hd.HttpFleet]:
    with hd.HttpFleet() as f:
        yield f


# -- transport -------------------------------------------------------------------------


def test_base_url_and_identity() -> None:
    assert base_url("10.0.0.1") == ("https://10.0.0.1", "https://10.0.0.1:443")
    assert base_url("10.0.0.1", default_scheme="http", default_port=8000) == (
        "http://10.0.0.1:8000", "http://10.0.0.1:8000")
    assert base_url("http://[fe80::1]:81/") == ("http://[fe80::1]:81", "http://[fe80::1]:81")
    assert base_url("https://ucs/x/", allow_path=True)[0] == "https://ucs/x"
    for bad in ("", "ftp://x", "http://u:p@x", "http://x/?a=1", "http://x:99999", "http://x/p"):
        with pytest.raises(ValueError):
            base_url(bad)


@pytest.mark.parametrize(("status", "code"), [
    (401, "auth_failed"), (403, "auth_failed"), (404, "not_found"), (409, "busy"), (423, "busy"),
    (429, "busy"), (503, "busy"), (504, "timeout"), (400, "device_error"), (500, "device_error"),
])
def test_status_taxonomy(status: int, code: str) -> None:
    assert error_for_status(status, "dev", "act").code == code


def test_transport_errors_and_scrubbing(fleet: hd.HttpFleet) -> None:
    dli = fleet.add(hd.DliDevice([hd.Node("o1", "1")]))
    client = HttpClient(dli.url, where="test", timeout=0.5, auth=HttpAuth("admin", "wrong-Pw-77"),
                        secrets=["tok-123"])
    err = check_error(lambda: client.get("/index.htm", action="query"), AuthError, "wrong-Pw-77")
    assert err.details["status"] == 401
    assert client.scrub("x tok-123 wrong-Pw-77") == "x *** ***"
    client.close()
    dead = HttpClient(f"http://{dead_address()}", where="dead", timeout=0.5)
    check_error(lambda: dead.get("/", action="query"), UnreachableError)
    fleet.set_fault("o1", "no_answer")
    slow = HttpClient(dli.url, where="held", timeout=0.3, auth=HttpAuth("admin", PW))
    start = time.monotonic()
    check_error(lambda: slow.get("/index.htm", action="query"), CallTimeoutError)
    assert time.monotonic() - start < 2
    fleet.set_fault("o1", "none")
    with pytest.raises(DeviceError):
        parse_xml(b"<a><b></a>", "dev")
    with pytest.raises(DeviceError):  # defusedxml refuses entity expansion
        parse_xml(b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>', "dev")


def test_https_with_verification_off_and_on(fleet: hd.HttpFleet) -> None:
    # Nothing speaks TLS there: verification on or off, a TLS failure is a device error.
    dli = fleet.add(hd.DliDevice([hd.Node("o1", "1")]))
    client = HttpClient(f"https://127.0.0.1:{dli.port}", where="tls", timeout=0.5, verify_ssl=False)
    err = check_error(lambda: client.get("/", action="query"), PowerError)
    assert err.code in ("device_error", "unreachable")


# -- webhook ---------------------------------------------------------------------------


def webhook_params(device: hd.WebhookDevice, key: str, **extra: Any) -> dict[str, Any]:
    return {**device.uris(device.nodes[key]), "power_user": "admin", "power_pass": PW, **extra}


def test_webhook_power_and_query(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.WebhookDevice([hd.Node("w1", "m1"), hd.Node("w2", "m2")]))
    with driver("webhook", webhook_params(dev, "m1", system_id="abc123")) as d:
        assert d.capabilities.power_query and not d.capabilities.pxe_next_boot
        assert d.query() is PowerState.OFF
        d.power_on()
        assert d.query() is PowerState.ON
        d.power_off(soft=True)
        assert fleet.node("w1")["power"] == "off"
        d.power_cycle()
        counts = fleet.node("w1")["counts"]
        assert (counts["on"], counts["off"]) == (2, 2)
        assert fleet.node("w1")["system_id"] == "abc123"
        fleet.set_fault("w1", "powering")
        assert d.query() is PowerState.UNKNOWN
        fleet.set_fault("w1", "none")
        with pytest.raises(UnsupportedError):
            d.set_boot_device(BootDevice.PXE)
    assert fleet.node("w2")["counts"]["on"] == 0
    assert driver("webhook", webhook_params(dev, "m1")).bmc_key() != driver(
        "webhook", webhook_params(dev, "m2")).bmc_key()


def test_webhook_token_slash_and_errors(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.WebhookDevice([hd.Node("w1", "m1")], token="tok-Secret-5", trailing_slash=True))
    params = {k: v.rstrip("/") for k, v in dev.uris(dev.nodes["m1"]).items()}
    with driver("webhook", {**params, "power_token": "tok-Secret-5", "power_verify_ssl": "n"}) as d:
        d.power_on()  # 404 without the slash, then tried with one, as MAAS does
        assert d.query() is PowerState.ON
    bad = driver("webhook", {**params, "power_token": "wrong-Token-1"})
    check_error(bad.query, AuthError, "wrong-Token-1")
    fleet.set_fault("w1", "busy")
    check_error(driver("webhook", {**params, "power_token": "tok-Secret-5"}).power_on, BusyError)
    fleet.set_fault("w1", "none")
    missing = {**params, "power_query_uri": f"{dev.url}/machines/nope/status"}
    check_error(driver("webhook", {**missing, "power_token": "tok-Secret-5"}).query, NotFoundError)
    dead = f"http://{dead_address()}/x"
    check_error(driver("webhook", {"power_on_uri": dead, "power_off_uri": dead,
                                   "power_query_uri": dead}).query, UnreachableError)


def test_webhook_settings() -> None:
    cls = registry.get("webhook")
    ok = {"power_on_uri": "http://h/on", "power_off_uri": "http://h/off", "power_query_uri": "http://h/q"}
    settings: Any = cls.validate({**ok, "power_verify_ssl": "y", "power_token": "t0k-Secret"})
    assert settings.power_verify_ssl is True and "t0k-Secret" not in repr(settings)
    assert settings.power_on_regex == r"status.*\:.*running"
    for bad in ({**ok, "power_on_uri": "ftp://h"}, {**ok, "power_on_regex": "("},
                {k: v for k, v in ok.items() if k != "power_query_uri"}):
        with pytest.raises(SettingsError):
            cls.validate(bad)


# -- dli -------------------------------------------------------------------------------


def test_dli_outlets(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.DliDevice([hd.Node("d1", "1"), hd.Node("d3", "3")]))
    d1 = driver("dli", {"power_address": dev.url, "power_user": "admin", "power_pass": PW, "outlet_id": 1})
    d3 = driver("dli", {"power_address": f"127.0.0.1:{dev.port}", "power_user": "admin",
                        "power_pass": PW, "outlet_id": "3"})
    assert d1.bmc_key() == d3.bmc_key()
    fleet.set_state("d3", "on")
    assert (d1.query(), d3.query()) == (PowerState.OFF, PowerState.ON)
    d1.power_on()
    d3.power_off()
    assert (fleet.node("d1")["power"], fleet.node("d3")["power"]) == ("on", "off")
    d3.power_cycle()
    assert fleet.node("d3")["counts"]["cycle"] == 1 and d3.query() is PowerState.ON
    with pytest.raises(UnsupportedError):
        d1.set_boot_device(BootDevice.PXE)
    nine = driver("dli", {"power_address": dev.url, "power_user": "admin", "power_pass": PW, "outlet_id": 9})
    check_error(nine.query, NotFoundError)
    check_error(nine.power_on, NotFoundError)
    wrong = driver("dli", {"power_address": dev.url, "power_user": "admin", "power_pass": "nope-Pw-3", "outlet_id": 1})
    check_error(wrong.query, AuthError, "nope-Pw-3")
    fleet.set_fault("d1", "busy")
    check_error(d1.power_on, BusyError)
    fleet.set_fault("d1", "garbage")
    check_error(d1.query, DeviceError)
    fleet.set_fault("d1", "none")
    for closing in (d1, d3, nine, wrong):
        closing.close()
    check_error(driver("dli", {"power_address": dead_address(), "outlet_id": 1}).query, UnreachableError)


def test_dli_digest(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.DliDevice([hd.Node("d1", "1")], digest=True))
    d = driver("dli", {"power_address": dev.url, "power_user": "admin", "power_pass": PW, "outlet_id": 1})
    d.power_on()
    assert d.query() is PowerState.ON
    wrong = driver("dli", {"power_address": dev.url, "power_user": "admin", "power_pass": "bad-Pw", "outlet_id": 1})
    check_error(wrong.query, AuthError, "bad-Pw")


# -- openbmc ---------------------------------------------------------------------------


def obmc_params(dev: hd.Device, password: str = PW) -> dict[str, Any]:
    return {"power_address": dev.url, "power_user": "admin", "power_pass": password}


def test_openbmc_power_boot_and_session(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.OpenBmcDevice([hd.Node("b1", "host0")]))
    with driver("openbmc", obmc_params(dev)) as d:
        assert d.query() is PowerState.OFF
        d.power_on()
        assert d.query() is PowerState.ON
        d.power_on()  # a running host is not rebooted
        assert fleet.node("b1")["counts"]["cycle"] == 0
        d.power_off()
        assert fleet.node("b1")["counts"]["off"] == 1 and d.query() is PowerState.OFF
        fleet.set_state("b1", "on")
        d.power_off(soft=True)
        assert fleet.node("b1")["counts"]["soft_off"] == 1
        fleet.set_state("b1", "on")
        d.power_cycle()
        assert fleet.node("b1")["counts"]["cycle"] == 1
        d.set_boot_device(BootDevice.PXE, efi=True)
        node = fleet.node("b1")
        assert (node["boot"], node["boot_once"], node["boot_type"]) == ("pxe", True, "EFI")
        with pytest.raises(UnsupportedError):
            d.set_boot_device(BootDevice.BIOS)
        fleet.set_fault("b1", "powering")
        assert d.query() is PowerState.UNKNOWN
        fleet.set_fault("b1", "none")
        assert fleet.node("b1")["counts"]["sessions"] == 1
        # The BMC forgets the session: the driver logs in once more.
        dev.sessions.clear()  # type: ignore[attr-defined]
        assert d.query() is PowerState.ON
        assert fleet.node("b1")["counts"]["sessions"] == 2
    assert fleet.node("b1")["counts"]["open_sessions"] == 0


def test_openbmc_errors(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.OpenBmcDevice([hd.Node("b1", "host0")], max_sessions=1))
    check_error(driver("openbmc", obmc_params(dev, "wrong-Pw-1")).query, AuthError, "wrong-Pw-1")
    holder = driver("openbmc", obmc_params(dev))
    holder.query()
    check_error(driver("openbmc", obmc_params(dev)).query, BusyError)  # no free session
    holder.close()
    fleet.set_fault("b1", "busy")
    check_error(driver("openbmc", obmc_params(dev)).query, BusyError)
    fleet.set_fault("b1", "garbage")
    check_error(driver("openbmc", obmc_params(dev)).query, DeviceError)
    fleet.set_fault("b1", "none")
    check_error(driver("openbmc", {**obmc_params(dev), "power_address": f"http://{dead_address()}"}).query,
                UnreachableError)


def test_unreachable_port_is_really_closed() -> None:
    host, port = dead_address().split(":")
    with socket.socket() as s:
        assert s.connect_ex((host, int(port))) != 0


# -- msftocs ---------------------------------------------------------------------------


def ocs_params(dev: hd.Device, blade: int, password: str = PW) -> dict[str, Any]:
    return {"power_address": "127.0.0.1", "power_port": dev.port, "power_user": "admin",
            "power_pass": password, "blade_id": blade}


def test_msftocs_blades_boot_and_probe(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.MsftOcsDevice([hd.Node("ocs1", "1"), hd.Node("ocs2", "2")], blades=4))
    with driver("msftocs", ocs_params(dev, 1)) as d:
        assert d.query() is PowerState.OFF
        d.power_on()
        assert d.query() is PowerState.ON and fleet.node("ocs1")["counts"]["on"] == 1
        d.power_cycle()
        assert fleet.node("ocs1")["counts"]["cycle"] == 1
        d.power_off(soft=True)
        assert fleet.node("ocs1")["power"] == "off"
        d.set_boot_device(BootDevice.PXE)
        node = fleet.node("ocs1")
        assert (node["boot"], node["boot_persistent"], node["boot_uefi"]) == ("pxe", "false", "false")
        with pytest.raises(UnsupportedError):
            d.set_boot_device(BootDevice.CDROM)
    fleet.set_state("ocs2", "on")
    machines = registry.get("msftocs").probe_chassis(
        {k: v for k, v in ocs_params(dev, 1).items() if k != "blade_id"}, timeout=TIMEOUT)
    assert [(m.name, m.power_parameters, m.power) for m in machines] == [
        ("blade01", {"blade_id": 1}, PowerState.OFF), ("blade02", {"blade_id": 2}, PowerState.ON)]
    assert machines[0].mac_addresses == ("00:15:5d:00:01:01",)


def test_msftocs_errors(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.MsftOcsDevice([hd.Node("ocs1", "1")], blades=4))
    check_error(driver("msftocs", ocs_params(dev, 1, "wrong-Pw-2")).query, AuthError, "wrong-Pw-2")
    check_error(driver("msftocs", ocs_params(dev, 3)).query, NotFoundError)  # empty slot
    check_error(driver("msftocs", ocs_params(dev, 9)).power_on, NotFoundError)  # out of range
    fleet.set_fault("ocs1", "busy")  # SerialSessionActive
    check_error(driver("msftocs", ocs_params(dev, 1)).power_on, BusyError)
    fleet.set_fault("ocs1", "garbage")
    check_error(driver("msftocs", ocs_params(dev, 1)).query, DeviceError)
    fleet.set_fault("ocs1", "none")
    dead = {**ocs_params(dev, 1), "power_port": free_port()}
    check_error(driver("msftocs", dead).query, UnreachableError)
    no_port = {k: v for k, v in ocs_params(dev, 1).items() if k != "power_port"}
    assert registry.get("msftocs").validate(no_port).power_port == 8000  # type: ignore[attr-defined]


# -- rsd -------------------------------------------------------------------------------


def rsd_params(dev: hd.Device, node_id: str, password: str = PW) -> dict[str, Any]:
    return {"power_address": dev.url, "power_user": "admin", "power_pass": password, "node_id": node_id}


def test_rsd_nodes_assembly_boot_and_probe(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.RsdDevice([hd.Node("rsd1", "1"),
                                  hd.Node("rsd2", "2", extra={"composed": "Allocated"})]))
    with driver("rsd", rsd_params(dev, "1")) as d:
        assert d.query() is PowerState.OFF
        d.power_on()
        assert d.query() is PowerState.ON
        d.power_cycle()
        assert fleet.node("rsd1")["counts"]["cycle"] == 1
        d.power_off()
        d.set_boot_device(BootDevice.PXE, efi=True)
        node = fleet.node("rsd1")
        assert (node["power"], node["boot"], node["boot_enabled"], node["boot_mode"]) == (
            "off", "pxe", "Once", "UEFI")
        with pytest.raises(UnsupportedError):
            d.set_boot_device(BootDevice.CDROM)
    with driver("rsd", rsd_params(dev, "2")) as d2:
        d2.power_on()  # assembled first
        node = fleet.node("rsd2")
        assert (node["assemble"], node["composed"], node["power"]) == (1, "Assembled", "on")
    machines = registry.get("rsd").probe_chassis(
        {k: v for k, v in rsd_params(dev, "1").items() if k != "node_id"}, timeout=TIMEOUT)
    assert [(m.name, m.power_parameters, m.power) for m in machines] == [
        ("node-1", {"node_id": "1"}, PowerState.OFF), ("node-2", {"node_id": "2"}, PowerState.ON)]


def test_rsd_errors(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.RsdDevice([hd.Node("rsd1", "1"), hd.Node("rsd3", "3", extra={"composed": "Failed"})]))
    check_error(driver("rsd", rsd_params(dev, "1", "wrong-Pw-4")).query, AuthError, "wrong-Pw-4")
    check_error(driver("rsd", rsd_params(dev, "7")).query, NotFoundError)
    check_error(driver("rsd", rsd_params(dev, "3")).power_on, DeviceError)
    fleet.set_fault("rsd1", "busy")
    check_error(driver("rsd", rsd_params(dev, "1")).query, BusyError)
    fleet.set_fault("rsd1", "powering")
    assert driver("rsd", rsd_params(dev, "1")).query() is PowerState.UNKNOWN
    fleet.set_fault("rsd1", "none")
    check_error(driver("rsd", {**rsd_params(dev, "1"), "power_address": f"http://{dead_address()}"}).query,
                UnreachableError)
    with pytest.raises(SettingsError):
        registry.get("rsd").validate(rsd_params(dev, "../x"))


# -- ucsm ------------------------------------------------------------------------------

UUIDS = ["1b4e28ba-2fa1-11d2-883f-0016d3cca427", "1b4e28ba-2fa1-11d2-883f-0016d3cca428",
         "1b4e28ba-2fa1-11d2-883f-0016d3cca429"]


def ucs_params(dev: hd.Device, uuid: str, password: str = PW) -> dict[str, Any]:
    return {"power_address": dev.url + "/", "power_user": "admin", "power_pass": password, "uuid": uuid}


def test_ucsm_power_and_probe(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.UcsmDevice([hd.Node("ucs1", UUIDS[0]), hd.Node("ucs2", UUIDS[1], extra={"rack": True})]))
    with driver("ucsm", ucs_params(dev, UUIDS[0].upper())) as d:
        assert not d.capabilities.pxe_next_boot
        assert d.query() is PowerState.OFF
        d.power_on()
        assert d.query() is PowerState.ON
        d.power_on()  # already on: admin-up again, never a cycle
        d.power_cycle()
        d.power_off(soft=True)
        d.power_off()
        counts = fleet.node("ucs1")["counts"]
        assert (counts["on"], counts["cycle"], counts["soft_off"], counts["off"]) == (2, 1, 1, 1)
        with pytest.raises(UnsupportedError):
            d.set_boot_device(BootDevice.PXE)
    assert dev.cookies == set()  # type: ignore[attr-defined]  # every login logged out
    assert fleet.node("ucs1")["counts"]["sessions"] == 7
    machines = registry.get("ucsm").probe_chassis(
        {k: v for k, v in ucs_params(dev, UUIDS[0]).items() if k != "uuid"}, timeout=TIMEOUT)
    assert [(m.name, m.power_parameters["uuid"], m.mac_addresses) for m in machines] == [
        ("chassis-1-blade-1", UUIDS[0], ("00:25:b5:00:00:01",)),
        ("rack-unit-2", UUIDS[1], ("00:25:b5:00:00:02",))]
    assert dev.cookies == set()  # type: ignore[attr-defined]


def test_ucsm_errors(fleet: hd.HttpFleet) -> None:
    dev = fleet.add(hd.UcsmDevice([hd.Node("ucs1", UUIDS[0]), hd.Node("ucs3", UUIDS[2], extra={"profile": ""})],
                                  max_sessions=1))
    check_error(driver("ucsm", ucs_params(dev, UUIDS[0], "wrong-Pw-5")).query, AuthError, "wrong-Pw-5")
    check_error(driver("ucsm", ucs_params(dev, UUIDS[1])).query, NotFoundError)
    check_error(driver("ucsm", ucs_params(dev, UUIDS[2])).power_on, DeviceError)  # no service profile
    assert dev.cookies == set()  # type: ignore[attr-defined]  # logged out after errors too
    dev.cookies.add("someone-else")  # type: ignore[attr-defined]  # the only cookie is taken
    check_error(driver("ucsm", ucs_params(dev, UUIDS[0])).query, BusyError)
    dev.cookies.clear()  # type: ignore[attr-defined]
    fleet.set_fault("ucs1", "busy")
    err = check_error(driver("ucsm", ucs_params(dev, UUIDS[0])).query, BusyError)
    assert err.details["ucs_error"] == "572"
    fleet.set_fault("ucs1", "garbage")
    check_error(driver("ucsm", ucs_params(dev, UUIDS[0])).query, DeviceError)
    fleet.set_fault("ucs1", "no_answer")
    check_error(driver("ucsm", ucs_params(dev, UUIDS[0]), timeout=0.3).query, CallTimeoutError)
    fleet.set_fault("ucs1", "none")
    check_error(driver("ucsm", {**ucs_params(dev, UUIDS[0]), "power_address": f"http://{dead_address()}"}).query,
                UnreachableError)
