"""``rsd``: Intel Rack Scale Design pod manager (PODM), one composed node per node.

Wire (Redfish-style JSON, HTTP basic auth):

- ``GET /redfish/v1/Nodes/<id>`` -> ``PowerState`` (On / Off / transient) and
  ``ComposedNodeState`` (Allocating, Allocated, Assembling, Assembled, Failed);
- ``POST …/Actions/ComposedNode.Reset`` ``{"ResetType": …}`` (On, ForceOff,
  GracefulShutdown, ForceRestart, PowerCycle: as ``ResetType@Redfish.AllowableValues``);
- ``POST …/Actions/ComposedNode.Assemble``: an *Allocated* node must be assembled before
  it can power on; the driver assembles it and waits (up to the call timeout) for
  *Assembled*;
- ``PATCH /redfish/v1/Nodes/<id>`` ``{"Boot": {"BootSourceOverrideTarget": "Pxe",
  "BootSourceOverrideEnabled": "Once"}}`` for the next boot;
- ``GET /redfish/v1/Nodes`` lists the composed nodes (chassis probe).

Allocating / Assembling nodes answer ``busy``; a Failed node ``device_error``.
``power_verify_ssl`` is powerq's (MAAS does not verify): off by default.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import SecretStr, field_validator

from .base import (
    BootDevice,
    Capabilities,
    DriverSettings,
    PowerDriver,
    PowerState,
    ProbedMachine,
    param,
    secret_value,
)
from .errors import BusyError, DeviceError, UnsupportedError
from .httpclient import HttpAuth, HttpClient, base_url
from .registry import register

NODES = "/redfish/v1/Nodes"
_STATES = {"On": PowerState.ON, "Off": PowerState.OFF}
_TARGETS = {BootDevice.PXE: "Pxe", BootDevice.DISK: "Hdd", BootDevice.CDROM: "Cd",
            BootDevice.BIOS: "BiosSetup"}


class RsdSettings(DriverSettings):
    """MAAS ``rsd`` power parameters."""

    power_address: str = param(description="Pod manager address: host[:port] or http(s):// URL (default https)")
    power_user: str = param(description="Pod manager user")
    power_pass: SecretStr = param(description="Pod manager password", secret=True)
    node_id: str = param(description="The composed node's Id (as in /redfish/v1/Nodes/<Id>)", scope="node")
    power_verify_ssl: bool = param(False, description="Verify the pod manager's TLS certificate (MAAS does not)")

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        base_url(value)
        return value

    @field_validator("node_id")
    @classmethod
    def _check_node(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value or ""):
            raise ValueError("node_id must be a plain identifier (letters, digits, . _ -)")
        return value


@register
class RsdDriver(PowerDriver):
    """Power a composed node through an RSD pod manager. Raises only :mod:`drivers.errors`."""

    power_type = "rsd"
    description = "Intel Rack Scale Design"
    settings_model = RsdSettings
    capabilities = Capabilities(
        pxe_next_boot=True, power_query=True, chassis_probe=True, detailed_errors=True
    )

    settings: RsdSettings
    assemble_poll: float = 0.25
    """Seconds between reads while waiting for an assembly to finish."""

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0,
                 sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(settings, timeout=timeout)
        self._client: HttpClient | None = None
        self._sleep = sleep or time.sleep

    def bmc_key(self) -> str:
        return "rsd:" + base_url(self.settings.power_address)[1]

    def power_on(self) -> None:
        """Assemble the node if it is only Allocated, then ``Reset On`` unless it is on.
        Raises the transient errors, :class:`AuthError`, :class:`NotFoundError`,
        :class:`DeviceError`, :class:`UnsupportedError`."""
        node = self._node()
        state = node.get("ComposedNodeState")
        if state == "Allocated":
            self._post(node, "#ComposedNode.Assemble", None, "assemble")
            node = self._wait_assembled()
        else:
            self._check_composed(node)
        if node.get("PowerState") not in ("On", "PoweringOn"):
            self._reset(node, "On", "power on")

    def power_off(self, soft: bool = False) -> None:
        """``ForceOff`` (``GracefulShutdown`` when ``soft``). Raises like :meth:`power_on`."""
        node = self._node()
        self._check_composed(node)
        self._reset(node, "GracefulShutdown" if soft else "ForceOff", "power off")

    def power_cycle(self) -> None:
        """``PowerCycle`` if allowed, else ``ForceRestart``. Raises like :meth:`power_on`."""
        node = self._node()
        self._check_composed(node)
        allowed = self._allowed(node)
        self._reset(node, "PowerCycle" if "PowerCycle" in allowed else "ForceRestart", "power cycle")

    def query(self) -> PowerState:
        """``PowerState``: On / Off, anything else unknown. Raises like :meth:`power_on`."""
        return _STATES.get(str(self._node().get("PowerState")), PowerState.UNKNOWN)

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """PATCH the node's ``Boot`` override. Raises :class:`UnsupportedError` when the
        node does not offer the target, and like :meth:`power_on`."""
        target = _TARGETS[BootDevice(device)]
        node = self._node()
        allowed = (node.get("Boot") or {}).get("BootSourceOverrideTarget@Redfish.AllowableValues")
        if isinstance(allowed, list) and target not in allowed:
            raise UnsupportedError(f"{self._where()}: boot target {target} not offered")
        boot: dict[str, Any] = {"BootSourceOverrideTarget": target,
                                "BootSourceOverrideEnabled": "Continuous" if persistent else "Once"}
        if efi:
            boot["BootSourceOverrideMode"] = "UEFI"
        self._http().request("PATCH", self._path(), action="set boot device", json={"Boot": boot})

    @classmethod
    def probe_chassis(
        cls, params: Mapping[str, Any], *, timeout: float = 10.0
    ) -> list[ProbedMachine]:
        """Every composed node listed at ``/redfish/v1/Nodes``. Raises
        :class:`SettingsError` and like :meth:`power_on`."""
        driver = cls(cls.validate_chassis(params), timeout=timeout)
        try:
            client = driver._http()
            listing = client.json(client.get(NODES, action="probe"), "probe")
            machines = []
            for member in listing.get("Members") or []:
                path = str(member.get("@odata.id", ""))
                doc = client.json(client.get(path, action="probe"), "probe")
                ident = str(doc.get("Id") or path.rstrip("/").rsplit("/", 1)[-1])
                machines.append(ProbedMachine(
                    name="node-" + re.sub(r"[^a-z0-9-]+", "-", ident.lower()).strip("-"),
                    power_parameters={"node_id": ident},
                    power=_STATES.get(str(doc.get("PowerState")), PowerState.UNKNOWN),
                    description=" ".join(str(doc.get(k) or "") for k in
                                         ("Name", "ComposedNodeState", "UUID")).strip(),
                ))
            return machines
        except (AttributeError, TypeError):
            raise DeviceError(f"{driver._where()}: probe: the Nodes listing has the wrong shape") from None
        finally:
            driver.close()

    def close(self) -> None:
        """Close the HTTP session. Never raises."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- helpers --------------------------------------------------------------------

    def _where(self) -> str:
        node = getattr(self.settings, "node_id", None)
        return f"rsd {base_url(self.settings.power_address)[1]}" + (f" node {node}" if node else "")

    def _path(self) -> str:
        return f"{NODES}/{self.settings.node_id}"

    def _http(self) -> HttpClient:
        if self._client is None:
            s = self.settings
            self._client = HttpClient(
                base_url(s.power_address)[0], where=self._where(), timeout=self.timeout,
                verify_ssl=s.power_verify_ssl, auth=HttpAuth(s.power_user, secret_value(s.power_pass)),
                headers={"Accept": "application/json"},
            )
        return self._client

    def _node(self) -> dict[str, Any]:
        client = self._http()
        doc = client.json(client.get(self._path(), action="read node"), "read node")
        if not isinstance(doc, dict):
            raise DeviceError(f"{self._where()}: the node is not a JSON object")
        return doc

    def _check_composed(self, node: dict[str, Any]) -> None:
        state = node.get("ComposedNodeState")
        if state in ("Allocating", "Assembling"):
            raise BusyError(f"{self._where()}: the node is {state}")
        if state == "Failed":
            raise DeviceError(f"{self._where()}: the node's composition failed")
        if state == "Allocated":
            raise DeviceError(f"{self._where()}: the node is allocated but not assembled")

    def _wait_assembled(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            node = self._node()
            state = node.get("ComposedNodeState")
            if state == "Assembled":
                return node
            if state == "Failed":
                raise DeviceError(f"{self._where()}: assembly failed")
            if time.monotonic() >= deadline:
                raise BusyError(f"{self._where()}: still {state} after {self.timeout:g}s")
            self._sleep(self.assemble_poll)

    @staticmethod
    def _allowed(node: dict[str, Any]) -> list[str]:
        action = (node.get("Actions") or {}).get("#ComposedNode.Reset") or {}
        allowed = action.get("ResetType@Redfish.AllowableValues")
        return allowed if isinstance(allowed, list) else []

    def _post(self, node: dict[str, Any], action_name: str, body: Any, action: str) -> None:
        target = ((node.get("Actions") or {}).get(action_name) or {}).get("target")
        if not target:
            raise UnsupportedError(f"{self._where()}: the node offers no {action_name}")
        self._http().post(str(target), action=action, json=body)

    def _reset(self, node: dict[str, Any], reset_type: str, action: str) -> None:
        allowed = self._allowed(node)
        if allowed and reset_type not in allowed:
            raise UnsupportedError(f"{self._where()}: ResetType {reset_type} not allowed")
        self._post(node, "#ComposedNode.Reset", {"ResetType": reset_type}, action)
