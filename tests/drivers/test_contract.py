"""The contract every registered driver honours: settings declared with MAAS names,
secrets marked and hidden, validation offline, capabilities backed by real methods,
and the control plane importable without any protocol library."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest
from pydantic import SecretStr

from drivers import registry
from drivers.base import DriverSettings, PowerDriver
from drivers.errors import SettingsError, UnsupportedError
from tests.conftest import ROOT

SECRET = "s3cr3t-Contract-Pw"

# A valid parameter set per power type, with SECRET in every secret field.
EXAMPLES: dict[str, dict[str, Any]] = {
    "ipmi": {"power_address": "10.0.0.5", "power_user": "admin", "power_pass": SECRET},
    "redfish": {"power_address": "https://10.0.0.6", "power_user": "admin", "power_pass": SECRET,
                "node_id": "1"},
    "virsh": {"power_address": "qemu+ssh://ubuntu@10.0.0.7/system", "power_pass": SECRET,
              "power_id": "vm1"},
    "manual": {},
    "vmware": {"power_address": "10.0.0.8", "power_user": "administrator@vsphere.local",
               "power_pass": SECRET, "power_uuid": "4210a3c7-1b2c-4d5e-8f90-123456789abc"},
    "webhook": {"power_on_uri": "http://10.0.0.9/on", "power_off_uri": "http://10.0.0.9/off",
                "power_query_uri": "http://10.0.0.9/status", "power_user": "u", "power_pass": SECRET,
                "power_token": SECRET},
    "dli": {"power_address": "10.0.0.10", "power_user": "admin", "power_pass": SECRET, "outlet_id": 3},
    "openbmc": {"power_address": "10.0.0.11", "power_user": "root", "power_pass": SECRET},
    "rsd": {"power_address": "https://10.0.0.12:8443", "power_user": "admin", "power_pass": SECRET,
            "node_id": "1"},
    "msftocs": {"power_address": "10.0.0.13", "power_port": 8000, "power_user": "admin",
                "power_pass": SECRET, "blade_id": 2},
    "moonshot": {"power_address": "10.0.0.18", "power_user": "admin", "power_pass": SECRET,
                 "power_hwaddress": "-B 0 -T 0x82 -b 7 -t 0x72"},
    "sm15k": {"power_address": "10.0.0.19", "power_user": "admin", "power_pass": SECRET, "system_id": "3",
              "power_control": "restapi2"},
    "wedge": {"power_address": "10.0.0.20", "power_user": "root", "power_pass": SECRET},
    "mscm": {"power_address": "10.0.0.21", "power_user": "admin", "power_pass": SECRET, "node_id": "c1n1"},
    "hmc": {"power_address": "10.0.0.22", "power_user": "hscroot", "power_pass": SECRET,
            "server_name": "p8srv", "lpar": "lpar1"},
    "fence_cdu": {"power_address": "10.0.0.23", "power_user": "admn", "power_pass": SECRET,
                  "power_id": ".A12", "power_protocol": "ssh"},  # telnet needs no library
    "apc": {"power_address": "10.0.0.15", "node_outlet": 3, "community": SECRET},
    "eaton": {"power_address": "10.0.0.16", "node_outlet": 4, "snmp_version": "3", "snmp_user": "ops",
              "snmp_auth_protocol": "sha", "snmp_auth_key": SECRET, "snmp_priv_protocol": "aes",
              "snmp_priv_key": SECRET},
    "raritan": {"power_address": "10.0.0.17", "node_outlet": 5, "community": SECRET},
    "ucsm": {"power_address": "https://10.0.0.14/", "power_user": "admin", "power_pass": SECRET,
             "uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"},
    "amt": {"power_address": "10.0.0.20", "power_user": "admin", "power_pass": SECRET},
    "nova": {"os_authurl": "http://10.0.0.21:5000/v3", "os_tenantname": "maas", "os_username": "maas",
             "os_password": SECRET, "nova_id": "8f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b"},
}

# What drivers talk to devices with; none of it may be needed by scheduler/.
PROTOCOL_LIBRARIES = ("pyghmi", "sushy", "libvirt", "pysnmp", "asyncssh", "paramiko", "pyVmomi", "pyVim",
                      "requests", "defusedxml")

# Every driver shipped in drivers/ (other tests register test-only drivers of their own).
DRIVERS = {n: c for n, c in registry.all_drivers().items() if c.__module__.startswith("drivers.")}


def test_the_foundation_power_types_are_registered() -> None:
    assert {"ipmi", "redfish", "virsh", "manual"} <= set(DRIVERS)


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_declaration(name: str) -> None:
    cls = DRIVERS[name]
    assert issubclass(cls, PowerDriver)
    assert cls.power_type == name
    assert cls.description
    assert issubclass(cls.settings_model, DriverSettings)
    assert name in EXAMPLES, f"add an example parameter set for {name} to this test"
    for field_name, info in cls.settings_model.model_fields.items():
        meta = cls.settings_model.field_meta(field_name)
        assert meta.get("scope") in ("bmc", "node"), f"{name}.{field_name} has no scope"
        assert info.description, f"{name}.{field_name} has no description"
        if meta.get("secret"):
            assert "SecretStr" in str(info.annotation), f"{name}.{field_name} is secret but not SecretStr"
        elif "password" in field_name or field_name.endswith("_pass"):
            pytest.fail(f"{name}.{field_name} looks like a secret but is not marked secret")


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_validation_is_offline_and_hides_secrets(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = DRIVERS[name]

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validate() touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    settings = cls.validate(EXAMPLES[name])
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.public_dict())
    for secret_field in cls.settings_model.secret_fields():
        value = getattr(settings, secret_field)
        assert value is None or isinstance(value, SecretStr)
    # A driver can be built from validated settings without touching anything.
    driver = cls(settings, timeout=1.0)
    assert driver.bmc_key()


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_unknown_parameters_are_refused_without_echoing_values(name: str) -> None:
    cls = DRIVERS[name]
    with pytest.raises(SettingsError) as err:
        cls.validate({**EXAMPLES[name], "no_such_parameter": SECRET})
    assert "no_such_parameter" in err.value.message
    assert SECRET not in err.value.message
    assert SECRET not in repr(err.value.to_dict())


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_capabilities_are_backed_by_methods(name: str) -> None:
    cls = DRIVERS[name]
    caps = cls.capabilities
    if caps.pxe_next_boot:
        assert cls.set_boot_device is not PowerDriver.set_boot_device
    if caps.chassis_probe:
        assert cls.probe_chassis.__func__ is not PowerDriver.probe_chassis.__func__  # type: ignore[attr-defined]
    else:
        with pytest.raises(UnsupportedError):
            cls.probe_chassis({})


def test_unknown_power_type_is_an_error() -> None:
    with pytest.raises(SettingsError) as err:
        registry.get("no-such-type")
    assert err.value.code == "unknown_power_type"


def test_duplicate_power_type_is_an_error() -> None:
    manual = registry.get("manual")

    class Another(manual):  # type: ignore[misc, valid-type]
        pass

    with pytest.raises(registry.DuplicatePowerTypeError):
        registry.register(Another)


def test_control_plane_runs_without_protocol_libraries() -> None:
    """scheduler/ and every settings model work with every protocol library absent, and
    every driver that needs one says ``tool_missing`` instead of failing otherwise."""
    code = f"""
import sys
for lib in {PROTOCOL_LIBRARIES!r}:
    sys.modules[lib] = None
import scheduler.cli, scheduler.planner, scheduler.inventory, scheduler.probe
from drivers import registry
from drivers.errors import ToolMissingError
examples = {EXAMPLES!r}
for name, cls in registry.all_drivers().items():
    if not cls.__module__.startswith("drivers."):
        continue
    settings = cls.validate(examples[name])
    if name == "manual":
        continue
    try:
        cls(settings, timeout=0.5).query()
    except ToolMissingError:
        pass
    else:
        raise SystemExit(name + " did not report its missing library")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
