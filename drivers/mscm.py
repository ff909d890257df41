"""``mscm``: HP Moonshot iLO Chassis Manager, through its SSH command line.

Nodes are cartridge nodes ``cXnY`` (cartridge X, node Y) behind one chassis manager: all
share the manager's ``bmc_key``, so one command at a time reaches it. Each action is one
CLI command over one reused SSH login (:mod:`drivers.sshcli`):

====================  =============================================================
query                 ``show node power cXnY`` -> ``Power State: On|Off|PoweringOn|Unavailable``
on                    ``set node power on cXnY`` (a node already on is left alone)
off (hard / soft)     ``set node power off force cXnY`` / ``set node power off cXnY``
cycle                 off (force) then on, on the same login
next boot PXE         ``set node bootonce pxe cXnY`` (one time; ``persistent`` ignored)
probe                 ``show node list``, then ``show node macaddr cXnY`` per node
====================  =============================================================

``Unavailable`` (the manager cannot read the node) is reported as ``unknown``. A reply
naming a node or cartridge that is not there is ``not_found``; a reply starting
``Error:`` is ``device_error``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import field_validator

from .base import BootDevice, Capabilities, PowerState, ProbedMachine, param
from .errors import DeviceError, NotFoundError, UnsupportedError
from .registry import register
from .sshcli import CliSettings, SshCommandDriver

NODE_ID = re.compile(r"^c\d+n\d+$")
_POWER = re.compile(r"Power State:\s*(\w+)")
_STATES = {"on": PowerState.ON, "poweringon": PowerState.ON, "off": PowerState.OFF}
_NOT_FOUND = re.compile(r"not present|not found|no such (node|cartridge)|invalid node", re.IGNORECASE)
_ERROR = re.compile(r"^\s*(error|invalid|unknown command)\b", re.IGNORECASE | re.MULTILINE)
_LIST_ROW = re.compile(r"^\s*(\d+)\s+(c\d+n\d+)\b(.*)$", re.MULTILINE)
_MAC = re.compile(r"\b[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}\b")


class MscmSettings(CliSettings):
    """MAAS ``mscm`` power parameters (plus the shared SSH ones)."""

    node_id: str = param(description="Cartridge node, cXnY (X = cartridge, Y = node)", scope="node")

    @field_validator("node_id")
    @classmethod
    def _check_node(cls, value: str) -> str:
        value = value.lower()
        if not NODE_ID.match(value):
            raise ValueError("must be cXnY, e.g. c1n1")
        return value


@register
class MscmDriver(SshCommandDriver):
    power_type = "mscm"
    description = "HP Moonshot - iLO Chassis Manager"
    settings_model = MscmSettings
    capabilities = Capabilities(
        pxe_next_boot=True, power_query=True, chassis_probe=True, detailed_errors=True
    )
    settings: MscmSettings

    def cli(self, command: str) -> str:
        """Run one CLI command; its output. Not-found and error replies raise."""
        output = self.exec(command).output
        text = self.target.scrub(output)
        if _NOT_FOUND.search(output):
            raise NotFoundError(f"mscm at {self.target.where}: {command!r}: {text}")
        if _ERROR.search(output):
            raise DeviceError(f"mscm at {self.target.where}: {command!r}: {text}")
        return output

    def query(self) -> PowerState:
        output = self.cli(f"show node power {self.settings.node_id}")
        match = _POWER.search(output)
        if match is None:
            raise DeviceError(f"mscm at {self.target.where}: no power state in "
                              f"{self.target.scrub(output)!r}")
        return _STATES.get(match.group(1).lower(), PowerState.UNKNOWN)

    def power_on(self) -> None:
        self.cli(f"set node power on {self.settings.node_id}")

    def power_off(self, soft: bool = False) -> None:
        force = "" if soft else "force "
        self.cli(f"set node power off {force}{self.settings.node_id}")

    def power_cycle(self) -> None:
        self.power_off()
        self.power_on()

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """``set node bootonce pxe``: PXE on the next boot only. Other devices are
        refused: the one-time override this driver is tested with is PXE."""
        if BootDevice(device) is not BootDevice.PXE:
            raise UnsupportedError(f"mscm: next boot {device!s} is not supported (only pxe)")
        self.cli(f"set node bootonce pxe {self.settings.node_id}")

    @classmethod
    def probe_chassis(
        cls, params: Mapping[str, Any], *, timeout: float = 10.0
    ) -> list[ProbedMachine]:
        """Every cartridge node in ``show node list``, with its MACs from
        ``show node macaddr``."""
        driver = cls(cls.validate_chassis(params), timeout=timeout)
        try:
            return driver.list_nodes()
        finally:
            driver.close()

    def list_nodes(self) -> list[ProbedMachine]:
        machines = []
        for match in _LIST_ROW.finditer(self.cli("show node list")):
            node_id, rest = match.group(2), " ".join(match.group(3).split())
            words = rest.split()
            power = PowerState.UNKNOWN
            for word in words:
                if word.lower() in ("on", "off"):
                    power = PowerState(word.lower())
            macs: tuple[str, ...] = ()
            if "No Asset Information" not in rest:
                found = _MAC.findall(self.cli(f"show node macaddr {node_id}"))
                macs = tuple(dict.fromkeys(m.lower() for m in found))
            machines.append(ProbedMachine(
                name=node_id, power_parameters={"node_id": node_id}, power=power,
                description=f"Moonshot cartridge node {node_id}: {rest}".strip(),
                mac_addresses=macs,
            ))
        return machines
