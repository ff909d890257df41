"""The redfish driver against sushy-tools' emulator (tests/peers/redfish_sim.py)."""

from __future__ import annotations

import subprocess
import sys
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
    NotFoundError,
    PowerError,
    SettingsError,
    ToolMissingError,
    UnreachableError,
    UnsupportedError,
)
from drivers.redfish import RedfishDriver, RedfishSettings, parse_address
from tests.peers.common import SimNode, free_port
from tests.peers.redfish_sim import MAX_SESSIONS, RedfishFleet, make_nodes, start_fleet

pytest.importorskip("sushy")
pytest.importorskip("sushy_tools")
pytest.importorskip("libvirt")

REPO = Path(__file__).resolve().parents[2]
FIRST_ADDRESS = "127.41.0.1"
PASSWORD = "s3cret-Redfish-pw"


@pytest.fixture(scope="module")
def nodes() -> list[SimNode]:
    return make_nodes(6, "rt", first_address=FIRST_ADDRESS, port=free_port(FIRST_ADDRESS),
                      password=PASSWORD)


@pytest.fixture(scope="module")
def fleet(nodes: list[SimNode], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedfishFleet]:
    fleet = start_fleet(nodes, tmp_path_factory.mktemp("redfish"))
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def node(fleet: RedfishFleet, nodes: list[SimNode]) -> Iterator[SimNode]:
    """A node in a known state: off, no fault, counts zeroed."""
    target = nodes[0]
    fleet.fault(target.name, "none")
    fleet.set_state(target.name, "off")
    fleet.reset()
    yield target
    fleet.fault(target.name, "none")


def driver(node: SimNode, timeout: float = 5.0, **overrides: Any) -> RedfishDriver:
    params = dict(node.power_parameters)
    params.update(overrides)
    for key in [k for k, v in params.items() if v is None]:
        del params[key]
    settings = RedfishDriver.validate(params)
    return RedfishDriver(settings, timeout=timeout)


def counts(fleet: RedfishFleet, node: SimNode) -> dict[str, int]:
    return fleet.node(node.name)["counts"]


def actions(fleet: RedfishFleet, node: SimNode) -> dict[str, int]:
    """The power actions the peer received (everything but queries and sessions)."""
    c = counts(fleet, node)
    return {k: c[k] for k in ("on", "off", "soft_off", "cycle", "reset", "boot") if c[k]}


# -- power ---------------------------------------------------------------------------


def test_power_on(fleet: RedfishFleet, node: SimNode) -> None:
    with driver(node) as d:
        d.power_on()
        assert d.query() is PowerState.ON
    assert fleet.node(node.name)["power"] == "on"
    assert actions(fleet, node) == {"on": 1}


def test_power_on_running_node_sends_nothing(fleet: RedfishFleet, node: SimNode) -> None:
    fleet.set_state(node.name, "on")
    with driver(node) as d:
        d.power_on()
    assert fleet.node(node.name)["power"] == "on"
    assert actions(fleet, node) == {}


@pytest.mark.parametrize(("soft", "key"), [(False, "off"), (True, "soft_off")])
def test_power_off(fleet: RedfishFleet, node: SimNode, soft: bool, key: str) -> None:
    fleet.set_state(node.name, "on")
    with driver(node) as d:
        d.power_off(soft=soft)
        assert d.query() is PowerState.OFF
    assert fleet.node(node.name)["power"] == "off"
    assert actions(fleet, node) == {key: 1}


def test_power_off_when_off_sends_nothing(fleet: RedfishFleet, node: SimNode) -> None:
    with driver(node) as d:
        d.power_off()
    assert actions(fleet, node) == {}


def test_power_cycle_uses_force_restart_when_power_cycle_not_allowed(
    fleet: RedfishFleet, node: SimNode
) -> None:
    # The emulator lists no PowerCycle in ResetType@Redfish.AllowableValues.
    fleet.set_state(node.name, "on")
    with driver(node) as d:
        d.power_cycle()
    assert fleet.node(node.name)["power"] == "on"
    assert actions(fleet, node) == {"reset": 1}


def test_power_cycle_of_an_off_node_powers_it_on(fleet: RedfishFleet, node: SimNode) -> None:
    with driver(node) as d:
        d.power_cycle()
    assert fleet.node(node.name)["power"] == "on"
    assert actions(fleet, node) == {"on": 1}


def test_query(fleet: RedfishFleet, node: SimNode) -> None:
    with driver(node) as d:
        assert d.query() is PowerState.OFF
        fleet.set_state(node.name, "on")
        assert d.query() is PowerState.ON
    assert counts(fleet, node)["query"] == 2
    assert actions(fleet, node) == {}


def test_transient_power_state_is_read_again(fleet: RedfishFleet, node: SimNode) -> None:
    fleet.set_state(node.name, "on")
    fleet.fault(node.name, "powering")  # PowerState reads "PoweringOn"
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 2:
            fleet.fault(node.name, "none")

    d = RedfishDriver(RedfishDriver.validate(node.power_parameters), timeout=5, sleep=sleep)
    with d:
        assert d.query() is PowerState.ON
    assert slept == [d.transient_delay] * 2
    assert counts(fleet, node)["query"] == 3


def test_transient_power_state_that_persists_is_unknown(fleet: RedfishFleet, node: SimNode) -> None:
    fleet.fault(node.name, "powering")
    slept: list[float] = []
    with RedfishDriver(RedfishDriver.validate(node.power_parameters), sleep=slept.append) as d:
        assert d.query() is PowerState.UNKNOWN
    assert len(slept) == d.transient_reads
    assert counts(fleet, node)["query"] == d.transient_reads + 1


# -- next boot -------------------------------------------------------------------------


def test_boot_pxe_once(fleet: RedfishFleet, node: SimNode) -> None:
    with driver(node) as d:
        d.set_boot_device(BootDevice.PXE)
    seen = fleet.node(node.name)
    assert (seen["boot"], seen["boot_enabled"], seen["boot_mode"]) == ("pxe", "Once", None)
    assert actions(fleet, node) == {"boot": 1}


def test_boot_disk_persistent(fleet: RedfishFleet, node: SimNode) -> None:
    with driver(node) as d:
        d.set_boot_device(BootDevice.DISK, persistent=True)
    seen = fleet.node(node.name)
    assert (seen["boot"], seen["boot_enabled"]) == ("disk", "Continuous")


def test_boot_target_not_offered_is_unsupported(fleet: RedfishFleet, node: SimNode) -> None:
    # The emulator offers Pxe, Cd and Hdd only.
    with driver(node) as d, pytest.raises(UnsupportedError):
        d.set_boot_device(BootDevice.BIOS)
    assert actions(fleet, node) == {}


def test_boot_efi_sets_uefi_mode(fleet: RedfishFleet, nodes: list[SimNode]) -> None:
    target = nodes[5]  # the mode sticks in the emulator: keep it off the shared node
    with driver(target) as d:
        d.set_boot_device(BootDevice.PXE, efi=True)
    seen = fleet.node(target.name)
    assert (seen["boot"], seen["boot_mode"]) == ("pxe", "UEFI")


# -- sessions and node ids -----------------------------------------------------------------


def test_one_session_per_driver_deleted_on_close(fleet: RedfishFleet, node: SimNode) -> None:
    d = driver(node)
    d.query()
    d.power_on()
    d.query()
    assert counts(fleet, node)["sessions"] == 1
    assert counts(fleet, node)["open_sessions"] == 1
    d.close()
    d.close()  # idempotent
    assert counts(fleet, node)["open_sessions"] == 0
    assert counts(fleet, node)["auth_failures"] == 0


def test_no_free_session_is_busy(fleet: RedfishFleet, node: SimNode) -> None:
    held = [driver(node) for _ in range(MAX_SESSIONS)]
    try:
        for d in held:
            d.query()
        with driver(node) as extra, pytest.raises(BusyError):
            extra.query()
    finally:
        for d in held:
            d.close()
    assert counts(fleet, node)["open_sessions"] == 0


def test_node_id_omitted_uses_the_only_system(fleet: RedfishFleet, node: SimNode) -> None:
    fleet.set_state(node.name, "on")
    with driver(node, node_id=None) as d:
        assert d.settings.node_id is None
        assert d.query() is PowerState.ON
        d.power_off()
    assert actions(fleet, node) == {"off": 1}


def test_node_id_may_be_the_uuid(fleet: RedfishFleet, node: SimNode) -> None:
    uuid = fleet.node(node.name)["uuid"]
    with driver(node, node_id=uuid) as d:
        assert d.query() is PowerState.OFF


def test_unknown_node_id_is_not_found(fleet: RedfishFleet, node: SimNode) -> None:
    with driver(node, node_id="no-such-system") as d, pytest.raises(NotFoundError):
        d.query()


# -- failures ----------------------------------------------------------------------------


def test_wrong_password_is_auth_error_after_one_attempt(fleet: RedfishFleet, node: SimNode) -> None:
    wrong = "not-the-Password-42"
    with driver(node, power_pass=wrong) as d, pytest.raises(AuthError) as info:
        d.power_on()
    assert counts(fleet, node)["auth_failures"] == 1
    assert counts(fleet, node)["sessions"] == 0
    assert actions(fleet, node) == {}
    assert wrong not in str(info.value) and wrong not in repr(info.value.to_dict())


def test_auth_fault_is_auth_error(fleet: RedfishFleet, node: SimNode) -> None:
    fleet.fault(node.name, "auth")
    with driver(node) as d, pytest.raises(AuthError):
        d.query()


def test_busy_is_busy_error(fleet: RedfishFleet, node: SimNode) -> None:
    fleet.fault(node.name, "busy")
    with driver(node) as d, pytest.raises(BusyError) as info:
        d.power_on()
    assert info.value.retryable


def test_malformed_reply_is_device_error(fleet: RedfishFleet, node: SimNode) -> None:
    fleet.fault(node.name, "garbage")
    with driver(node) as d, pytest.raises(DeviceError):
        d.query()


def test_malformed_reply_after_login_is_device_error(fleet: RedfishFleet, node: SimNode) -> None:
    with driver(node) as d:
        d.query()
        fleet.fault(node.name, "garbage")
        with pytest.raises(DeviceError):
            d.query()
        fleet.fault(node.name, "none")
    assert counts(fleet, node)["open_sessions"] == 0


def test_no_answer_is_timeout(fleet: RedfishFleet, node: SimNode) -> None:
    fleet.fault(node.name, "no_answer")
    with driver(node, timeout=0.5) as d, pytest.raises(CallTimeoutError) as info:
        d.query()
    assert info.value.retryable


def test_slow_bmc_still_answers(fleet: RedfishFleet, node: SimNode) -> None:
    fleet.fault(node.name, "slow", latency=0.05)
    with driver(node) as d:
        assert d.query() is PowerState.OFF


def test_unreachable(nodes: list[SimNode]) -> None:
    params = dict(nodes[0].power_parameters, power_address=f"http://127.41.250.250:{free_port()}")
    with RedfishDriver(RedfishDriver.validate(params), timeout=2) as d:
        with pytest.raises(UnreachableError) as info:
            d.query()
    assert info.value.retryable


def test_transient_error_then_recovery_on_same_driver(fleet: RedfishFleet, node: SimNode) -> None:
    with driver(node) as d:
        fleet.fault(node.name, "busy")
        with pytest.raises(BusyError):
            d.query()
        fleet.fault(node.name, "none")
        assert d.query() is PowerState.OFF
    assert counts(fleet, node)["open_sessions"] == 0


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"power_user": "admin", "power_pass": PASSWORD},
        {"power_address": "ftp://bmc", "power_user": "admin", "power_pass": PASSWORD},
        {"power_address": "bmc:notaport", "power_user": "admin", "power_pass": PASSWORD},
        {"power_address": "http://u:p@bmc", "power_user": "admin", "power_pass": PASSWORD},
        {"power_address": "bmc", "power_user": "", "power_pass": PASSWORD},
        {"power_address": "bmc", "power_user": "admin"},
        {"power_address": "bmc", "power_user": "admin", "power_pass": PASSWORD, "node_id": "a b"},
        {"power_address": "bmc", "power_user": "admin", "power_pass": PASSWORD, "bogus": 1},
    ],
)
def test_invalid_settings(params: dict[str, Any]) -> None:
    with pytest.raises(SettingsError) as info:
        RedfishDriver.validate(params)
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value.to_dict())


def test_secret_never_in_repr() -> None:
    settings = RedfishDriver.validate(
        {"power_address": "bmc", "power_user": "admin", "power_pass": PASSWORD}
    )
    assert isinstance(settings, RedfishSettings)
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)
    assert settings.public_dict()["power_pass"] == "***"
    assert RedfishSettings.secret_fields() == {"power_pass"}
    assert RedfishSettings.node_fields() == {"node_id"}


@pytest.mark.parametrize(
    ("address", "base_url", "identity"),
    [
        ("bmc1", "https://bmc1", "https://bmc1:443"),
        ("BMC1:8443", "https://bmc1:8443", "https://bmc1:8443"),
        ("http://10.0.0.5:8000/redfish/v1/", "http://10.0.0.5:8000", "http://10.0.0.5:8000"),
        ("https://[fe80::1]", "https://[fe80::1]", "https://[fe80::1]:443"),
    ],
)
def test_address_forms(address: str, base_url: str, identity: str) -> None:
    assert parse_address(address) == (base_url, identity)
    settings = RedfishDriver.validate(
        {"power_address": address, "power_user": "u", "power_pass": "p"}
    )
    assert RedfishDriver(settings).bmc_key() == f"redfish:{identity}"


def test_same_bmc_same_key() -> None:
    def key(address: str) -> str:
        return RedfishDriver(
            RedfishDriver.validate({"power_address": address, "power_user": "u", "power_pass": "p"})
        ).bmc_key()

    assert key("bmc1") == key("https://BMC1:443/") != key("http://bmc1")


def test_capabilities() -> None:
    caps = RedfishDriver.capabilities
    assert (caps.pxe_next_boot, caps.power_query, caps.detailed_errors) == (True, True, True)
    assert (caps.chassis_probe, caps.bmc_enlistment) == (False, True)
    assert RedfishDriver.power_type == "redfish"


def test_without_sushy_imports_and_reports_tool_missing() -> None:
    code = (
        "import sys; sys.modules['sushy'] = None\n"
        "from drivers.errors import ToolMissingError\n"
        "import drivers.redfish as r\n"
        "d = r.RedfishDriver(r.RedfishDriver.validate("
        "{'power_address': 'bmc', 'power_user': 'u', 'power_pass': 'p'}))\n"
        "try:\n    d.query()\nexcept ToolMissingError:\n    print('tool_missing')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "tool_missing"
    assert ToolMissingError.code == "tool_missing"


def test_errors_never_carry_the_password(fleet: RedfishFleet, node: SimNode) -> None:
    raised: list[PowerError] = []
    for fault in ("auth", "busy", "garbage"):
        fleet.fault(node.name, fault)
        with driver(node) as d:
            try:
                d.power_on()
            except PowerError as exc:
                raised.append(exc)
    assert len(raised) == 3
    for exc in raised:
        assert PASSWORD not in str(exc) and PASSWORD not in repr(exc.to_dict())


def test_no_answer_after_login_fails_within_one_timeout(
    fleet: RedfishFleet, nodes: list[SimNode]
) -> None:
    import time

    target = nodes[4]
    fleet.fault(target.name, "none")
    d = driver(target, timeout=0.5)
    try:
        d.query()
        fleet.fault(target.name, "no_answer")
        started = time.monotonic()
        with pytest.raises(CallTimeoutError):
            d.query()
        d.close()  # the connection was dropped: nothing more is sent to a silent BMC
        assert time.monotonic() - started < 0.95
    finally:
        fleet.fault(target.name, "none")
    # The session was left to expire on the BMC rather than waited for once more.
    assert fleet.node(target.name)["counts"]["open_sessions"] == 1
