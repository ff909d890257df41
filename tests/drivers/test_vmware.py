"""The ``vmware`` driver against govmomi's vCenter simulator (tests/peers/vcsim.py).

One simulator per module (https with a self-signed certificate, reached through the
peer's proxy); every test sets the state it needs behind the driver's back (not counted),
zeroes the counts, acts, then checks the simulator's state and counts.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers import registry
from drivers.base import BootDevice, PowerState
from drivers.errors import (
    AuthError,
    BusyError,
    CallTimeoutError,
    DeviceError,
    NotFoundError,
    SettingsError,
    ToolMissingError,
    UnreachableError,
    UnsupportedError,
)
from drivers.vmware import FAULTS, VmwareDriver, VmwareSettings, host_name
from tests.peers import vcsim
from tests.peers.common import PeerControl, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
VM, OTHER = "vmw-001", "vmw-002"


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vcsim.VcsimPeer]:
    running = vcsim.start(3, tmp_path_factory.mktemp("vcsim"), tls=True, by="uuid")
    yield running
    running.stop()


@pytest.fixture
def make_driver(peer: vcsim.VcsimPeer) -> Iterator[Callable[..., VmwareDriver]]:
    made: list[VmwareDriver] = []

    def make(timeout: float = 5.0, **params: Any) -> VmwareDriver:
        values = peer.params(power_uuid=peer.vms[VM]["instance_uuid"])
        values.update(params)
        values = {k: v for k, v in values.items() if v is not None}
        driver = VmwareDriver(VmwareDriver.validate(values), timeout=timeout)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()
    for name in peer.vms:  # a failed test must not leave a fault behind
        peer.set_fault(name, "none")


def given(peer: vcsim.VcsimPeer, power: str, name: str = VM) -> None:
    """Put ``name`` in ``power`` state and zero every count."""
    peer.set_state(name, power)
    peer.reset_counts()


def counts(peer: vcsim.VcsimPeer, name: str = VM) -> dict[str, int]:
    return peer.nodes()[name]["counts"]


ACTIONS = ("on", "off", "soft_off", "cycle", "reset", "boot")


def sent(peer: vcsim.VcsimPeer, name: str = VM) -> dict[str, int]:
    return {k: v for k, v in counts(peer, name).items() if k in ACTIONS and v}


# -- the peer ---------------------------------------------------------------------------


def test_peer_nodes_and_parameters(peer: vcsim.VcsimPeer) -> None:
    names = [n.name for n in peer.nodes_list]
    assert names == ["vmw-001", "vmw-002", "vmw-003"]
    node = peer.nodes_list[0]
    assert node.power_type == "vmware"
    assert node.power_parameters["power_uuid"] == peer.vms[VM]["instance_uuid"]
    assert node.power_parameters["power_port"] == peer.proxy.port
    macs = [peer.vms[n]["macs"][0] for n in names]
    assert len(set(macs)) == 3, macs


def test_set_state_is_not_counted_and_the_control_api_works(peer: vcsim.VcsimPeer) -> None:
    control = PeerControl(f"http://127.0.0.1:{peer.serve_control()}")
    control.set_state(VM, "on")
    control.reset()
    control.set_state(VM, "off")
    node = control.node(VM)
    assert node["power"] == "off"
    assert not any(node["counts"].values()), node["counts"]
    control.fault(VM, "busy")
    assert control.node(VM)["fault"] == "busy"
    control.fault(VM, "none")


def test_peer_refuses_faults_it_cannot_simulate(peer: vcsim.VcsimPeer) -> None:
    with pytest.raises(ValueError):
        peer.set_fault(VM, "garbage")


# -- power ------------------------------------------------------------------------------


def test_power_on(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "off")
    make_driver().power_on()
    node = peer.nodes()[VM]
    assert node["power"] == "on"
    assert sent(peer) == {"on": 1}
    assert node["counts"]["sessions"] == 1


def test_power_on_a_running_vm_sends_nothing(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "on")
    make_driver().power_on()
    assert peer.nodes()[VM]["power"] == "on"
    assert sent(peer) == {}
    assert counts(peer)["query"] == 1


def test_power_off_hard(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "on")
    make_driver().power_off()
    assert peer.nodes()[VM]["power"] == "off"
    assert sent(peer) == {"off": 1}


def test_power_off_soft_shuts_the_guest_down(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "on")
    make_driver().power_off(soft=True)
    assert peer.nodes()[VM]["power"] == "off"
    assert sent(peer) == {"soft_off": 1}


def test_power_off_a_vm_that_is_off_sends_nothing(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "off")
    driver = make_driver()
    driver.power_off()
    driver.power_off(soft=True)
    assert sent(peer) == {}


def test_cycle_resets_a_running_vm(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "on")
    make_driver().power_cycle()
    assert peer.nodes()[VM]["power"] == "on"
    assert sent(peer) == {"reset": 1}


def test_cycle_powers_on_a_vm_that_is_off(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "off")
    make_driver().power_cycle()
    assert peer.nodes()[VM]["power"] == "on"
    assert sent(peer) == {"on": 1}


def test_suspended_reads_on_like_maas_and_off_and_cycle_work(
    peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]
) -> None:
    given(peer, "suspended")
    driver = make_driver()
    assert driver.query() is PowerState.ON
    driver.power_on()  # called directly, power_on resumes a suspended VM
    assert peer.nodes()[VM]["power"] == "on"
    assert sent(peer) == {"on": 1}
    given(peer, "suspended")
    driver.power_cycle()
    assert peer.nodes()[VM]["power"] == "on"
    assert sent(peer) == {"off": 1, "on": 1}
    given(peer, "suspended")
    driver.power_off(soft=True)  # a suspended guest cannot shut down: hard off
    assert peer.nodes()[VM]["power"] == "off"
    assert sent(peer) == {"off": 1}


def test_query(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "off")
    driver = make_driver()
    assert driver.query() is PowerState.OFF
    peer.set_state(VM, "on")
    assert driver.query() is PowerState.ON
    assert counts(peer)["query"] == 2
    assert sent(peer) == {}


def test_find_by_name_and_by_bios_uuid(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "off", OTHER)
    make_driver(power_uuid=None, power_vm_name=OTHER).power_on()
    assert peer.nodes()[OTHER]["power"] == "on"
    assert sent(peer, OTHER) == {"on": 1}
    assert make_driver(power_uuid=peer.vms[OTHER]["uuid"]).query() is PowerState.ON


def test_one_session_per_driver_and_close_logs_out(
    peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]
) -> None:
    given(peer, "off")
    driver = make_driver()
    driver.query()
    driver.power_on()
    driver.query()
    assert counts(peer)["sessions"] == 1
    assert counts(peer)["open_sessions"] == 1
    driver.close()
    driver.close()
    assert counts(peer)["open_sessions"] == 0


# -- next boot ----------------------------------------------------------------------------


def test_set_boot_device_pxe_then_disk(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "on")
    driver = make_driver()
    driver.set_boot_device(BootDevice.PXE)
    assert peer.nodes()[VM]["boot"] == "pxe"
    assert sent(peer) == {"boot": 1}
    driver.set_boot_device(BootDevice.PXE)  # already first: nothing sent
    assert sent(peer) == {"boot": 1}
    driver.set_boot_device(BootDevice.DISK)
    assert peer.nodes()[VM]["boot"] == "disk"
    assert peer.nodes()[VM]["power"] == "on"  # a boot change does not touch power
    driver.set_boot_device(BootDevice.CDROM)
    assert peer.nodes()[VM]["boot"] == "cdrom"
    driver.set_boot_device(BootDevice.PXE)


def test_set_boot_device_bios_is_unsupported(make_driver: Callable[..., VmwareDriver]) -> None:
    with pytest.raises(UnsupportedError):
        make_driver().set_boot_device(BootDevice.BIOS)


# -- probe ----------------------------------------------------------------------------------


def test_probe_lists_every_vm(peer: vcsim.VcsimPeer) -> None:
    peer.set_state(VM, "on")
    peer.set_state(OTHER, "off")
    params = peer.params()
    machines = registry.get("vmware").probe_chassis(params, timeout=5)
    assert [m.name for m in machines] == ["vmw-001", "vmw-002", "vmw-003"]
    first = machines[0]
    assert first.power_parameters == {"power_vm_name": VM, "power_uuid": peer.vms[VM]["instance_uuid"]}
    assert first.power is PowerState.ON and machines[1].power is PowerState.OFF
    assert first.mac_addresses == tuple(peer.vms[VM]["macs"])
    # What the probe wrote addresses the VM.
    entry = {**params, **first.power_parameters}
    with VmwareDriver(VmwareDriver.validate(entry), timeout=5) as driver:
        assert driver.query() is PowerState.ON


def test_host_name() -> None:
    assert host_name("Ubuntu 22.04 (64-bit)") == "ubuntu-22-04-64-bit"
    assert host_name("___") == "vm"


# -- errors -----------------------------------------------------------------------------------


def test_wrong_password_is_auth_failed_and_never_shown(make_driver: Callable[..., VmwareDriver]) -> None:
    secret = "Not-The-Pa55word"
    driver = make_driver(power_pass=secret)
    with pytest.raises(AuthError) as err:
        driver.query()
    assert err.value.code == "auth_failed"
    assert secret not in err.value.message
    assert secret not in repr(driver.settings)
    assert secret not in str(driver.settings.public_dict())


def test_auth_fault_refuses_logins(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    peer.set_fault(VM, "auth")
    with pytest.raises(AuthError):
        make_driver().query()
    peer.set_fault(VM, "none")
    assert make_driver().query() in (PowerState.ON, PowerState.OFF)


def test_busy_vm(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "off")
    peer.set_fault(VM, "busy")
    driver = make_driver()
    with pytest.raises(BusyError) as err:
        driver.power_on()
    assert err.value.code == "busy" and err.value.retryable
    with pytest.raises(BusyError):
        driver.set_boot_device(BootDevice.DISK if peer.nodes()[VM]["boot"] == "pxe" else BootDevice.PXE)
    peer.set_fault(VM, "none")
    assert peer.nodes()[VM]["power"] == "off"
    driver.power_on()
    assert peer.nodes()[VM]["power"] == "on"


def test_unknown_vm_is_not_found(make_driver: Callable[..., VmwareDriver]) -> None:
    with pytest.raises(NotFoundError):
        make_driver(power_uuid="00000000-0000-0000-0000-000000000001").query()
    with pytest.raises(NotFoundError):
        make_driver(power_uuid=None, power_vm_name="no-such-vm").query()


def test_nothing_listening_is_unreachable(make_driver: Callable[..., VmwareDriver]) -> None:
    with pytest.raises(UnreachableError) as err:
        make_driver(power_port=free_port()).query()
    assert err.value.code == "unreachable"


def test_no_answer_is_a_timeout(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    driver = make_driver(timeout=1.0)
    driver.query()  # connected and logged in before the endpoint hangs
    peer.set_fault(VM, "no_answer")
    try:
        started = time.monotonic()
        with pytest.raises(CallTimeoutError):
            driver.power_on()
        with pytest.raises((CallTimeoutError, UnreachableError)):
            make_driver(timeout=1.0).query()  # a new connection: nothing answers
        assert time.monotonic() - started < 5
    finally:
        peer.set_fault(VM, "none")
    assert make_driver().query() in (PowerState.ON, PowerState.OFF)


def test_slow_call_past_the_timeout(peer: vcsim.VcsimPeer, make_driver: Callable[..., VmwareDriver]) -> None:
    given(peer, "off")
    driver = make_driver(timeout=0.5)
    driver.query()
    peer.set_fault(VM, "slow", latency=1.5)
    with pytest.raises(CallTimeoutError):
        driver.power_on()
    peer.set_fault(VM, "none")


def test_tls_is_verified_with_https(make_driver: Callable[..., VmwareDriver]) -> None:
    with pytest.raises(DeviceError) as err:
        make_driver(power_protocol="https").query()
    assert "certificate" in err.value.message


def test_http_to_an_https_endpoint_is_a_device_error(make_driver: Callable[..., VmwareDriver]) -> None:
    with pytest.raises((DeviceError, UnreachableError)):
        make_driver(power_protocol="http").query()


def test_fault_table() -> None:
    from pyVmomi import vim, vmodl

    driver = VmwareDriver(VmwareDriver.validate(
        {"power_address": "vc", "power_user": "u", "power_pass": "p", "power_vm_name": "x"}))
    cases = [
        (vim.fault.InvalidLogin(), AuthError),
        (vim.fault.PasswordExpired(), AuthError),
        (vim.fault.NoPermission(), AuthError),
        (vim.fault.NotAuthenticated(), AuthError),
        (vim.fault.ConcurrentAccess(), BusyError),
        (vim.fault.NotFound(), NotFoundError),
        (vim.fault.TaskInProgress(), BusyError),
        (vmodl.fault.ManagedObjectNotFound(), NotFoundError),
        (vmodl.fault.HostNotConnected(), UnreachableError),
        (vmodl.fault.NotSupported(), UnsupportedError),
        (vim.fault.InvalidPowerState(), DeviceError),
        (vim.fault.ToolsUnavailable(), DeviceError),
        (ConnectionRefusedError(), UnreachableError),
        (TimeoutError(), CallTimeoutError),
    ]
    for exc, expected in cases:
        assert type(driver._error(exc, "test")) is expected, exc
    assert set(FAULTS.values()) <= {AuthError, BusyError, NotFoundError, UnreachableError,
                                    UnsupportedError, DeviceError}


# -- settings ----------------------------------------------------------------------------------

BASE = {"power_address": "vc.example.com", "power_user": "administrator@vsphere.local",
        "power_pass": "pw", "power_vm_name": "vm1"}


@pytest.mark.parametrize("params", [
    {k: v for k, v in BASE.items() if k != "power_vm_name"},  # neither uuid nor name
    {**BASE, "power_address": "https://vc.example.com"},
    {**BASE, "power_protocol": "ftp"},
    {**BASE, "power_port": 70000},
    {**BASE, "power_uuid": "not-a-uuid"},
    {**BASE, "power_pass": None},
])
def test_invalid_settings(params: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        VmwareDriver.validate(params)


def test_maas_defaults_and_normalisation() -> None:
    settings = VmwareDriver.validate({**BASE, "power_protocol": "", "power_port": "",
                                      "power_uuid": "4210A3C7-0000-0000-0000-00000000ABCD"})
    assert isinstance(settings, VmwareSettings)
    assert settings.power_protocol == "https" and settings.port == 443
    assert settings.power_uuid == "4210a3c7-0000-0000-0000-00000000abcd"
    http = VmwareDriver.validate({**BASE, "power_protocol": "http"})
    assert isinstance(http, VmwareSettings) and http.port == 80
    assert VmwareDriver(settings).bmc_key() == "vmware:https://vc.example.com:443"
    assert VmwareSettings.node_fields() == {"power_vm_name", "power_uuid"}
    assert VmwareSettings.secret_fields() == {"power_pass"}
    chassis = VmwareDriver.validate_chassis({k: v for k, v in BASE.items() if k != "power_vm_name"})
    assert chassis.power_address == "vc.example.com"  # type: ignore[attr-defined]


def test_registered_with_honest_capabilities() -> None:
    cls = registry.get("vmware")
    assert cls is VmwareDriver
    caps = cls.capabilities
    assert caps.pxe_next_boot and caps.power_query and caps.chassis_probe and caps.detailed_errors
    assert not caps.bmc_enlistment


def test_close_never_raises(make_driver: Callable[..., VmwareDriver]) -> None:
    make_driver().close()  # never connected
    driver = make_driver(power_port=free_port())
    with pytest.raises(UnreachableError):
        driver.query()
    driver.close()


def test_without_pyvmomi_calls_say_tool_missing() -> None:
    code = """
import sys
sys.modules["pyVmomi"] = None
sys.modules["pyVim"] = None
from drivers import registry
from drivers.errors import ToolMissingError
cls = registry.get("vmware")
s = cls.validate({"power_address": "127.0.0.1", "power_port": 1, "power_user": "u",
                  "power_pass": "p", "power_vm_name": "x"})
try:
    cls(s, timeout=0.5).query()
except ToolMissingError:
    print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_tool_missing_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyVmomi", None)
    monkeypatch.setitem(sys.modules, "pyVim", None)
    driver = VmwareDriver(VmwareDriver.validate(BASE))
    with pytest.raises(ToolMissingError):
        driver.query()


def test_simulator_dies_with_its_parent(tmp_path: Path) -> None:
    code = f"""
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from pathlib import Path
from tests.peers import vcsim
peer = vcsim.start(1, Path({str(tmp_path)!r}))
print(peer.proc.pid, flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the simulator (pid {pid}) outlived its parent")
