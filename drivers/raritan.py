"""``raritan``: Raritan PX2 / PX3 PDU outlets over SNMP (PDU2-MIB), one node per outlet.

PDU2-MIB objects, indexed by ``pduId`` (1, or the linked PDU's id) and ``outletId``:

======================= ====================================================== ===========
switchingOperation       ``1.3.6.1.4.1.13742.6.4.1.2.1.2.<pdu>.<outlet>``        write 0 off, 1 on, 2 cycle
outletSwitchingState     ``1.3.6.1.4.1.13742.6.4.1.2.1.3.<pdu>.<outlet>``        read 7 on, 8 off
======================= ====================================================== ===========

outletSwitchingState is a SensorStateEnumeration (the same values as the onOff sensor's
measurementsOutletSensorState, ``1.3.6.1.4.1.13742.6.5.4.3.1.3.<pdu>.<outlet>.14``); any
other value (unavailable, transitional) reads as unknown. A cycle keeps the outlet off for
the PDU's configured cycle delay. SNMP transport, version and credentials:
:mod:`drivers.snmp` (Raritan agents speak v1, v2c and v3; the default here is v2c).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from .base import PowerState, param
from .registry import register
from .snmp import SnmpOutletDriver, SnmpSettings

SWITCHING_OPERATION = "1.3.6.1.4.1.13742.6.4.1.2.1.2"
"""PDU2-MIB switchingOperation."""
OUTLET_SWITCHING_STATE = "1.3.6.1.4.1.13742.6.4.1.2.1.3"
"""PDU2-MIB outletSwitchingState."""
_WRITE = {"off": 0, "on": 1, "cycle": 2}


class RaritanSettings(SnmpSettings):
    """``raritan`` power parameters (named like MAAS' ``apc``), plus the SNMP credentials."""

    node_outlet: int = param(description="The PDU outlet the node is plugged into (1-based)",
                             scope="node", ge=1)
    pdu_unit: int = param(
        1, description="PDU id (pduId) holding the outlet: 1, or a linked PDU's id", scope="node",
        ge=1,
    )


@register
class RaritanDriver(SnmpOutletDriver):
    """An outlet of a Raritan switched PDU."""

    power_type = "raritan"
    description = "Raritan PDU (SNMP, PDU2-MIB)"
    settings_model = RaritanSettings
    states: ClassVar[dict[int, PowerState]] = {7: PowerState.ON, 8: PowerState.OFF}

    settings: RaritanSettings

    def _index(self) -> str:
        return f"{self.settings.pdu_unit}.{self.settings.node_outlet}"

    def state_oid(self) -> str:
        return f"{OUTLET_SWITCHING_STATE}.{self._index()}"

    def command(self, action: Literal["on", "off", "cycle"]) -> tuple[str, int]:
        return f"{SWITCHING_OPERATION}.{self._index()}", _WRITE[action]
