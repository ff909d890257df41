"""The ``virsh`` driver against a real libvirtd serving libvirt's test driver.

One fleet (one libvirtd) per module; every test sets the state it needs behind the
driver's back (not counted), zeroes the counts, acts, then checks state and counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers import registry
from drivers.base import BootDevice, PowerState
from drivers.errors import (
    AuthError,
    CallTimeoutError,
    DeviceError,
    NotFoundError,
    SettingsError,
    ToolMissingError,
    UnreachableError,
    UnsupportedError,
)
from drivers.virsh import VirshDriver, VirshSettings, boot_order, with_boot_order
from tests.peers.common import PeerControl
from tests.peers.libvirt_sim import URI_PLACEHOLDER, LibvirtFleet, make_nodes, start_fleet

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.skipif(
    not Path("/usr/sbin/libvirtd").exists(), reason="Debian's libvirt-daemon is not installed"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cr3t-Virsh-pw"
VM = "vm-r1-001"
OTHER = "vm-r1-002"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtFleet]:
    nodes = make_nodes(3, "r1")
    with start_fleet(nodes, tmp_path_factory.mktemp("libvirt")) as running:
        yield running


@pytest.fixture
def make_driver(fleet: LibvirtFleet) -> Iterator[Callable[..., VirshDriver]]:
    made: list[VirshDriver] = []

    def make(**params: Any) -> VirshDriver:
        values = {"power_address": fleet.uri, "power_id": VM, **params}
        driver = VirshDriver(VirshDriver.validate(values))
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()


def given(fleet: LibvirtFleet, power: str, name: str = VM) -> None:
    """Put ``name`` in ``power`` state and zero every count."""
    fleet.set_state(name, power)
    fleet.reset()


def counts(fleet: LibvirtFleet, name: str = VM) -> dict[str, int]:
    return fleet.node(name)["counts"]


def sent(fleet: LibvirtFleet, name: str = VM) -> dict[str, int]:
    """Counts of actions other than queries."""
    return {k: v for k, v in counts(fleet, name).items() if v and k != "query"}


# -- the fleet itself --------------------------------------------------------------------------


def test_make_nodes_and_fleet_fill_in_the_uri(fleet: LibvirtFleet) -> None:
    fresh = make_nodes(2, "r7", prefix="kvm")
    assert [n.name for n in fresh] == ["kvm-r7-001", "kvm-r7-002"]
    assert fresh[0].power_parameters == {"power_address": URI_PLACEHOLDER, "power_id": "kvm-r7-001"}
    assert fleet.uri.startswith("test+unix:///default?socket=/")
    for entry in fleet.inventory():
        assert entry["power_type"] == "virsh"
        assert entry["power_parameters"]["power_address"] == fleet.uri
        VirshDriver.validate(entry["power_parameters"])
    assert set(fleet.nodes()) == {"vm-r1-001", "vm-r1-002", "vm-r1-003"}


def test_control_api_refuses_faults_it_cannot_inject(fleet: LibvirtFleet) -> None:
    control = PeerControl(fleet.control_url)
    control.fault(VM, "none")
    for fault in ("no_answer", "slow", "busy"):
        with pytest.raises(urllib.error.HTTPError) as info:
            control.fault(VM, fault, 1.0)
        assert info.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as info:
        control.set_state(VM, "sideways")
    assert info.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as info:
        control.set_state("no-such-vm", "on")
    assert info.value.code == 404


def test_set_state_is_not_counted(fleet: LibvirtFleet) -> None:
    given(fleet, "off")
    fleet.set_state(VM, "on")
    assert fleet.node(VM)["power"] == "on"
    assert sent(fleet) == {}


# -- power -----------------------------------------------------------------------------------------


def test_power_on_starts_a_domain_that_is_off(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    given(fleet, "off")
    make_driver().power_on()
    assert fleet.node(VM)["power"] == "on"
    assert sent(fleet) == {"on": 1}


def test_power_on_a_running_domain_sends_nothing(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    given(fleet, "on")
    make_driver().power_on()
    assert fleet.node(VM)["power"] == "on"
    assert sent(fleet) == {}
    assert counts(fleet)["query"] == 1


def test_power_off_hard_destroys(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    given(fleet, "on")
    make_driver().power_off()
    assert fleet.node(VM)["power"] == "off"
    assert sent(fleet) == {"off": 1}


def test_power_off_soft_shuts_down(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    given(fleet, "on")
    make_driver().power_off(soft=True)
    assert fleet.node(VM)["power"] == "off"
    assert sent(fleet) == {"soft_off": 1}


def test_power_off_a_domain_that_is_off_sends_nothing(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    given(fleet, "off")
    driver = make_driver()
    driver.power_off()
    driver.power_off(soft=True)
    assert sent(fleet) == {}


def test_cycle_resets_a_running_domain(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    given(fleet, "on")
    make_driver().power_cycle()
    assert fleet.node(VM)["power"] == "on"
    assert sent(fleet) == {"reset": 1}


def test_cycle_starts_a_domain_that_is_off(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    given(fleet, "off")
    make_driver().power_cycle()
    assert fleet.node(VM)["power"] == "on"
    assert sent(fleet) == {"on": 1}


def test_cycle_after_a_boot_change_restarts_cold(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    """A reset keeps the live definition; a new boot order needs a destroy and a start."""
    given(fleet, "on")
    driver = make_driver()
    driver.set_boot_device(BootDevice.DISK)
    fleet.reset()
    driver.set_boot_device(BootDevice.PXE)
    driver.power_cycle()
    assert fleet.node(VM)["power"] == "on"
    assert sent(fleet) == {"boot": 1, "off": 1, "on": 1}
    live = driver._connection().lookupByName(VM).XMLDesc(0)
    assert boot_order(live)[0] == "network"
    fleet.reset()
    driver.power_cycle()  # nothing pending any more: a plain reset
    assert sent(fleet) == {"reset": 1}


def test_query_reads_the_state(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    driver = make_driver()
    given(fleet, "on")
    assert driver.query() is PowerState.ON
    given(fleet, "off")
    assert driver.query() is PowerState.OFF
    assert sent(fleet) == {}
    assert counts(fleet)["query"] == 1


def test_query_paused_domain_is_on_and_power_on_resumes(
    fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]
) -> None:
    given(fleet, "on")
    driver = make_driver()
    driver._connection().lookupByName(VM).suspend()
    assert driver.query() is PowerState.ON
    fleet.reset()
    driver.power_on()
    assert driver._connection().lookupByName(VM).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert sent(fleet) == {"on": 1}  # virDomainResume, not a reset


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("VIR_DOMAIN_RUNNING", PowerState.ON),
        ("VIR_DOMAIN_BLOCKED", PowerState.ON),
        ("VIR_DOMAIN_PAUSED", PowerState.ON),
        ("VIR_DOMAIN_SHUTDOWN", PowerState.ON),
        ("VIR_DOMAIN_PMSUSPENDED", PowerState.ON),
        ("VIR_DOMAIN_SHUTOFF", PowerState.OFF),
        ("VIR_DOMAIN_CRASHED", PowerState.OFF),
        ("VIR_DOMAIN_NOSTATE", PowerState.UNKNOWN),
    ],
)
def test_domstate_mapping(state: str, expected: PowerState) -> None:
    driver = VirshDriver(VirshDriver.validate({"power_address": "test:///default", "power_id": "x"}))
    assert driver._map_state(getattr(libvirt, state)) is expected


# -- boot device -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "boot", "first"),
    [(BootDevice.PXE, "pxe", "network"), (BootDevice.DISK, "disk", "hd"), (BootDevice.CDROM, "cdrom", "cdrom")],
)
def test_set_boot_device_rewrites_the_boot_order(
    fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver], device: BootDevice, boot: str, first: str
) -> None:
    given(fleet, "off")
    driver = make_driver()
    driver.set_boot_device(BootDevice.DISK if device is BootDevice.CDROM else BootDevice.CDROM)
    fleet.reset()
    driver.set_boot_device(device, persistent=False)
    node = fleet.node(VM)
    assert node["boot"] == boot
    assert sent(fleet) == {"boot": 1}
    xml = driver._connection().lookupByName(VM).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert boot_order(xml)[0] == first
    fleet.reset()
    driver.set_boot_device(device)  # already first: nothing to define
    assert sent(fleet) == {}


def test_set_boot_device_bios_is_unsupported(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    given(fleet, "off")
    with pytest.raises(UnsupportedError):
        make_driver().set_boot_device(BootDevice.BIOS)
    assert sent(fleet) == {}


def test_with_boot_order_drops_per_device_boot_and_keeps_the_rest() -> None:
    xml = (
        "<domain type='kvm'><name>a</name><os><type>hvm</type><loader>/x</loader>"
        "<boot dev='cdrom'/><boot dev='hd'/></os><devices><disk type='file' device='disk'>"
        "<boot order='1'/></disk></devices></domain>"
    )
    out = with_boot_order(xml, ("network", "hd"))
    assert boot_order(out) == ["network", "hd", "cdrom"]
    assert "order=" not in out
    assert "<loader>/x</loader>" in out


# -- probe -----------------------------------------------------------------------------------------


def test_probe_lists_the_domains(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    given(fleet, "on")
    fleet.set_state(OTHER, "off")
    driver = make_driver()
    params = {"power_address": driver.settings.power_address}  # no power_id: chassis only
    found = VirshDriver.probe_chassis(params)
    assert [d.power_parameters["power_id"] for d in found] == ["vm-r1-001", "vm-r1-002", "vm-r1-003"]
    assert [d.name for d in found] == ["vm-r1-001", "vm-r1-002", "vm-r1-003"]
    states = {d.name: d.power for d in found}
    assert states[VM] == "on"
    assert states[OTHER] == "off"


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_domain_is_not_found(make_driver: Callable[..., VirshDriver]) -> None:
    driver = make_driver(power_id="no-such-vm", power_pass=PASSWORD)
    with pytest.raises(NotFoundError) as info:
        driver.query()
    assert "no-such-vm" in info.value.message
    assert PASSWORD not in info.value.message
    assert PASSWORD not in repr(info.value.to_dict())


def test_unreachable_socket(tmp_path: Path) -> None:
    uri = f"test+unix:///default?socket={tmp_path}/nothing/libvirt-sock"
    with VirshDriver(VirshDriver.validate({"power_address": uri, "power_id": VM, "power_pass": PASSWORD})) as driver:
        with pytest.raises(UnreachableError) as info:
            driver.power_on()
        assert PASSWORD not in str(info.value)
        assert info.value.retryable


def test_password_is_passed_and_never_shown(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> None:
    driver = make_driver(power_pass=PASSWORD)
    given(fleet, "off")
    assert driver.query() is PowerState.OFF  # openAuth path works where no auth is asked
    assert PASSWORD not in repr(driver.settings)
    assert PASSWORD not in str(driver.settings)
    assert driver.settings.public_dict()["power_pass"] == "***"
    assert VirshSettings.secret_fields() == {"power_pass"}
    assert VirshSettings.node_fields() == {"power_id"}


# -- passwords: libvirtd's TCP listener with SASL (DIGEST-MD5) authentication ----------------


@pytest.fixture
def tcp(fleet: LibvirtFleet, make_driver: Callable[..., VirshDriver]) -> Callable[..., VirshDriver]:
    """Drivers for :data:`VM` through the fleet's SASL-protected TCP listener;
    ``password`` defaults to the right one."""
    if fleet.tcp_uri is None:
        pytest.fail("the fleet has no TCP listener: saslpasswd2 (sasl2-bin) is missing; "
                    "make test installs it")

    def make(password: str | None = None, name: str = VM) -> VirshDriver:
        return make_driver(**fleet.tcp_entry(name, password)["power_parameters"])

    return make


def test_right_password_over_sasl_reaches_the_same_hypervisor(
    fleet: LibvirtFleet, tcp: Callable[..., VirshDriver]
) -> None:
    assert fleet.tcp_uri is not None and fleet.tcp_uri.startswith("test+tcp://powerq@127.0.0.1:")
    given(fleet, "off")
    driver = tcp()
    assert driver.query() is PowerState.OFF
    driver.power_on()
    assert fleet.node(VM)["power"] == "on"
    assert sent(fleet) == {"on": 1}


def test_wrong_password_is_auth_failed(fleet: LibvirtFleet, tcp: Callable[..., VirshDriver]) -> None:
    given(fleet, "off")
    wrong = "not-the-Virsh-pw-9"
    with pytest.raises(AuthError) as info:
        tcp(wrong).power_on()
    assert info.value.code == "auth_failed"
    assert not info.value.retryable
    assert info.value.details["libvirt_code"] == "VIR_ERR_AUTH_FAILED"
    assert wrong not in info.value.message and wrong not in repr(info.value.to_dict())
    assert fleet.node(VM)["power"] == "off"
    assert sent(fleet) == {}


def test_no_password_where_sasl_asks_for_one_is_auth_failed(
    fleet: LibvirtFleet, tcp: Callable[..., VirshDriver]
) -> None:
    assert fleet.tcp_uri is not None
    with VirshDriver(VirshDriver.validate({"power_address": fleet.tcp_uri, "power_id": VM})) as driver:
        with pytest.raises(AuthError) as info:
            driver.query()
    assert info.value.details["libvirt_code"] == "VIR_ERR_AUTH_FAILED"


def test_auth_fault_refuses_the_right_password_until_cleared(
    fleet: LibvirtFleet, tcp: Callable[..., VirshDriver]
) -> None:
    given(fleet, "on")
    fleet.fault(VM, "auth")
    try:
        assert fleet.node(VM)["fault"] == "auth"
        with pytest.raises(AuthError):
            tcp().query()
        with pytest.raises(AuthError):  # libvirt authenticates the hypervisor, not the domain
            tcp(name=OTHER).query()
        assert fleet.node(OTHER)["fault"] == "none"
    finally:
        fleet.fault(VM, "none")
    assert fleet.node(VM)["fault"] == "none"
    assert tcp().query() is PowerState.ON


def _libvirt_error(code: str, domain: str = "VIR_FROM_TEST", message: str = "boom") -> Exception:
    exc = libvirt.libvirtError("x")
    exc.err = (getattr(libvirt, code), getattr(libvirt, domain), message, 2, None, None, None, 0, 0)
    return exc


@pytest.mark.parametrize(
    ("code", "domain", "expected"),
    [
        ("VIR_ERR_AUTH_FAILED", "VIR_FROM_TEST", AuthError),
        ("VIR_ERR_NO_DOMAIN", "VIR_FROM_TEST", NotFoundError),
        ("VIR_ERR_NO_CONNECT", "VIR_FROM_TEST", UnreachableError),
        ("VIR_ERR_SYSTEM_ERROR", "VIR_FROM_RPC", UnreachableError),
        ("VIR_ERR_RPC", "VIR_FROM_RPC", UnreachableError),
        ("VIR_ERR_INTERNAL_ERROR", "VIR_FROM_RPC", UnreachableError),
        ("VIR_ERR_INTERNAL_ERROR", "VIR_FROM_TEST", DeviceError),
        ("VIR_ERR_OPERATION_TIMEOUT", "VIR_FROM_TEST", CallTimeoutError),
        ("VIR_ERR_OPERATION_INVALID", "VIR_FROM_TEST", DeviceError),
        ("VIR_ERR_NO_SUPPORT", "VIR_FROM_TEST", UnsupportedError),
        ("VIR_ERR_XML_DETAIL", "VIR_FROM_TEST", DeviceError),
    ],
)
def test_error_table(code: str, domain: str, expected: type[Exception]) -> None:
    settings = VirshDriver.validate({"power_address": "qemu+ssh://admin@host/system", "power_id": "x", "power_pass": PASSWORD})
    driver = VirshDriver(settings)
    with pytest.raises(expected) as info:
        driver._translate(_libvirt_error(code, domain, f"failed with password {PASSWORD}"), "start")
    assert type(info.value) is expected
    assert info.value.details["libvirt_code"] == code
    assert PASSWORD not in info.value.message
    assert "qemu+ssh://admin@host/system" in info.value.message


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"power_id": VM},
        {"power_address": "qemu:///system"},
        {"power_address": "", "power_id": VM},
        {"power_address": "not a uri", "power_id": VM},
        {"power_address": "host.example.com", "power_id": VM},
        {"power_address": "qemu+carrier-pigeon://h/system", "power_id": VM},
        {"power_address": "qemu:", "power_id": VM},
        {"power_address": "qemu:///system", "power_id": ""},
        {"power_address": "qemu:///system", "power_id": "a/b"},
        {"power_address": "qemu:///system", "power_id": VM, "power_user": "x"},
    ],
)
def test_invalid_settings(params: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        VirshDriver.validate(params)


def test_uri_with_password_is_refused_without_echoing_it() -> None:
    with pytest.raises(SettingsError) as info:
        VirshDriver.validate({"power_address": f"qemu+ssh://root:{PASSWORD}@h/system", "power_id": VM})
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value.to_dict())


@pytest.mark.parametrize(
    "uri",
    ["qemu+ssh://maas@10.0.0.5/system", "qemu:///system", "test:///default",
     "test+unix:///default?socket=/run/x/libvirt-sock", "qemu+tls://host:16514/system", "esx://vc/?no_verify=1"],
)
def test_valid_uris(uri: str) -> None:
    settings = VirshDriver.validate({"power_address": uri, "power_id": VM})
    driver = VirshDriver(settings)
    assert driver.bmc_key() == f"virsh:{uri}"


def test_registered_with_honest_capabilities() -> None:
    # The registry itself, not registry.get(): that imports every built-in driver module.
    cls = registry._DRIVERS["virsh"]
    assert cls is VirshDriver
    assert cls.description == "Virsh (virtual systems)"
    caps = cls.capabilities
    assert caps.pxe_next_boot and caps.power_query and caps.chassis_probe and caps.detailed_errors
    assert not caps.bmc_enlistment


def test_close_never_raises(make_driver: Callable[..., VirshDriver]) -> None:
    driver = make_driver()
    driver.close()  # never connected
    driver.query()
    driver.close()
    driver.close()
    assert driver.query() in (PowerState.ON, PowerState.OFF)  # reconnects


def test_one_connection_per_driver(make_driver: Callable[..., VirshDriver]) -> None:
    driver = make_driver()
    driver.query()
    conn = driver._connection()
    driver.query()
    driver.list_domains()
    assert driver._connection() is conn


def test_without_libvirt_import_works_and_calls_say_tool_missing() -> None:
    code = (
        "import sys; sys.modules['libvirt'] = None\n"
        "import drivers.virsh as v\n"
        "from drivers.errors import ToolMissingError\n"
        "d = v.VirshDriver(v.VirshDriver.validate({'power_address': 'test:///default', 'power_id': 'x'}))\n"
        "try:\n    d.query()\nexcept ToolMissingError:\n    print('tool_missing')\n"
        "d.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "tool_missing", out.stderr


def test_tool_missing_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = VirshDriver(VirshDriver.validate({"power_address": "test:///default", "power_id": "x"}))
    monkeypatch.setitem(sys.modules, "libvirt", None)
    with pytest.raises(ToolMissingError):
        driver.power_on()


# -- isolation and clean-up -----------------------------------------------------------------------


def test_two_fleets_do_not_collide(fleet: LibvirtFleet, tmp_path: Path) -> None:
    given(fleet, "off")
    with start_fleet(make_nodes(1, "r1"), tmp_path) as other:
        assert other.uri != fleet.uri
        other.set_state(VM, "on")
        assert other.node(VM)["power"] == "on"
        assert fleet.node(VM)["power"] == "off"
    assert other.proc.poll() is not None


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_holder_and_libvirtd_die_with_their_parent(tmp_path: Path) -> None:
    code = (
        "import json, os, pathlib, sys\n"
        "from tests.peers.libvirt_sim import make_nodes, start_fleet\n"
        f"f = start_fleet(make_nodes(1, 'r9'), pathlib.Path({str(tmp_path)!r}))\n"
        "print(json.dumps([f.proc.pid, f.daemon_pid]), flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    holder, daemon = json.loads(out.stdout)
    rundir = Path((tmp_path / "libvirt-rundir").read_text().strip())
    deadline = time.monotonic() + 15
    while not (_gone(holder) and _gone(daemon) and not rundir.exists()):
        assert time.monotonic() < deadline, "holder, libvirtd or the runtime dir outlived the parent"
        time.sleep(0.1)


def test_fleet_stop_leaves_nothing(tmp_path: Path) -> None:
    fleet = start_fleet(make_nodes(1, "r8"), tmp_path)
    rundir = Path((tmp_path / "libvirt-rundir").read_text().strip())
    daemon = fleet.daemon_pid
    assert daemon is not None and not _gone(daemon)
    fleet.stop()
    fleet.stop()
    assert fleet.proc.returncode is not None
    assert _gone(daemon)
    assert not rundir.exists()
    assert os.path.exists(tmp_path / "fleet.xml")
