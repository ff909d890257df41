"""``apc``: APC switched rack PDUs over SNMP (APC PowerNet-MIB), one node per outlet.

OIDs (PowerNet-MIB), chosen by ``pdu_type``:

=============== ================================================= ==========================
``RPDU``        rPDUOutletControlOutletCommand                    ``1.3.6.1.4.1.318.1.1.12.3.3.1.1.4.<outlet>``
``MASTERSWITCH`` sPDUOutletCtl                                    ``1.3.6.1.4.1.318.1.1.4.4.2.1.3.<outlet>``
=============== ================================================= ==========================

Write 1 = on (immediateOn / outletOn), 2 = off, 3 = reboot; the same object reads back
1 = on, 2 = off (as MAAS reads it); other values (outletUnknown, pending) read as unknown.

``power_on_delay`` keeps its MAAS meaning, the seconds an outlet stays off when the node is
power-cycled: :meth:`ApcDriver.power_cycle` writes off, waits ``power_on_delay`` (an
injectable ``sleep``), then writes on. Unlike MAAS, ``power_on`` never switches an outlet
off first: the worker queries first, and "on" only writes on. Keep ``power_on_delay``
below the worker's call timeout.

The SNMP transport, version and credentials are those of :mod:`drivers.snmp`; APC's
PowerNet agents speak v1 and v3 (AOS), hence the default ``snmp_version`` 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from .base import DriverSettings, PowerState, param
from .registry import register
from .snmp import SnmpOutletDriver, SnmpSettings, SnmpVersion

RPDU_COMMAND = "1.3.6.1.4.1.318.1.1.12.3.3.1.1.4"
"""PowerNet-MIB rPDUOutletControlOutletCommand."""
MASTERSWITCH_CONTROL = "1.3.6.1.4.1.318.1.1.4.4.2.1.3"
"""PowerNet-MIB sPDUOutletCtl."""

_COLUMNS = {"RPDU": RPDU_COMMAND, "MASTERSWITCH": MASTERSWITCH_CONTROL}
_WRITE = {"on": 1, "off": 2, "cycle": 3}


class ApcSettings(SnmpSettings):
    """MAAS ``apc`` power parameters, plus the SNMP credentials of :mod:`drivers.snmp`."""

    snmp_version: SnmpVersion = param(
        "1", description="SNMP version: 1, 2c or 3 (APC PowerNet: 1 or 3)", choices=("1", "2c", "3")
    )
    node_outlet: int = param(description="The PDU outlet the node is plugged into (1-based)",
                             scope="node", ge=1)
    power_on_delay: float = param(
        5.0, description="Seconds the outlet stays off during a power cycle (0-60)"
    )
    pdu_type: Literal["RPDU", "MASTERSWITCH"] = param(
        "RPDU", description="APC PDU family: RPDU (rack PDU) or MASTERSWITCH",
        choices=("RPDU", "MASTERSWITCH"),
    )

    @field_validator("pdu_type", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("power_on_delay")
    @classmethod
    def _check_delay(cls, value: float) -> float:
        if not 0 <= value <= 60:
            raise ValueError("power_on_delay must be between 0 and 60 seconds")
        return value


@register
class ApcDriver(SnmpOutletDriver):
    """An outlet of an APC switched PDU."""

    power_type = "apc"
    description = "APC Switched Rack PDU"
    settings_model = ApcSettings
    states: ClassVar[dict[int, PowerState]] = {1: PowerState.ON, 2: PowerState.OFF}

    settings: ApcSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0,
                 sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(settings, timeout=timeout)
        self._sleep = sleep or time.sleep

    def _oid(self) -> str:
        return f"{_COLUMNS[self.settings.pdu_type]}.{self.settings.node_outlet}"

    def state_oid(self) -> str:
        return self._oid()

    def command(self, action: Literal["on", "off", "cycle"]) -> tuple[str, int]:
        return self._oid(), _WRITE[action]

    def power_cycle(self) -> None:
        """Off, wait ``power_on_delay`` seconds, on. Raises like :meth:`power_on`."""
        self._write("off")
        if self.settings.power_on_delay > 0:
            self._sleep(self.settings.power_on_delay)
        self._write("on")
