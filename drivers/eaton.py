"""``eaton``: Eaton ePDU outlets over SNMP (EATON-EPDU-MIB), one node per outlet.

EATON-EPDU-MIB ``outletControlTable`` (``1.3.6.1.4.1.534.6.6.7.6.6.1``), indexed by
``strappingIndex`` (the daisy-chain unit: 0 for a stand-alone or host PDU) and
``outletIndex`` (1-based):

====================== ============ ===================================================
outletControlStatus     column 2     read: 0 off, 1 on (2 pendingOff, 3 pendingOn -> unknown)
outletControlOffCmd     column 3     write a delay in seconds: 0 = now
outletControlOnCmd      column 4     write 0 = on now
outletControlRebootCmd  column 5     write 0 = reboot now (off, then on after the PDU's
                                     configured outletControlRebootOffTime)
====================== ============ ===================================================

Eaton's command objects take a delay rather than an action code; powerq always writes 0
(immediate). SNMP transport, version and credentials: :mod:`drivers.snmp`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from .base import PowerState, param
from .registry import register
from .snmp import SnmpOutletDriver, SnmpSettings

OUTLET_CONTROL_TABLE = "1.3.6.1.4.1.534.6.6.7.6.6.1"
"""EATON-EPDU-MIB outletControlEntry."""
STATUS, OFF_CMD, ON_CMD, REBOOT_CMD = 2, 3, 4, 5
_COLUMN = {"on": ON_CMD, "off": OFF_CMD, "cycle": REBOOT_CMD}


class EatonSettings(SnmpSettings):
    """``eaton`` power parameters (named like MAAS' ``apc``), plus the SNMP credentials."""

    node_outlet: int = param(description="The PDU outlet the node is plugged into (1-based)",
                             scope="node", ge=1)
    pdu_unit: int = param(
        0, description="Daisy-chain unit (strappingIndex) holding the outlet: 0 = the host PDU",
        scope="node", ge=0, le=255,
    )


@register
class EatonDriver(SnmpOutletDriver):
    """An outlet of an Eaton switched / managed ePDU."""

    power_type = "eaton"
    description = "Eaton ePDU (SNMP)"
    settings_model = EatonSettings
    states: ClassVar[dict[int, PowerState]] = {0: PowerState.OFF, 1: PowerState.ON}

    settings: EatonSettings

    def _oid(self, column: int) -> str:
        s = self.settings
        return f"{OUTLET_CONTROL_TABLE}.{column}.{s.pdu_unit}.{s.node_outlet}"

    def state_oid(self) -> str:
        return self._oid(STATUS)

    def command(self, action: Literal["on", "off", "cycle"]) -> tuple[str, int]:
        return self._oid(_COLUMN[action]), 0  # 0 seconds: immediately
