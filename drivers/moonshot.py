"""``moonshot``: an HP Moonshot cartridge node behind the chassis' iLO Chassis Manager.

The Chassis Manager is an IPMI 2.0 BMC (RMCP+, UDP 623); each cartridge node sits on
the chassis' IPMB behind it and is reached by *bridging*: the request is wrapped in
Send Message (netfn App, command 0x34, "track request") to a channel / slave address,
once for a single bridge and twice for a double bridge (through the cartridge
controller). MAAS stores the path as ipmitool options in ``power_hwaddress``::

    -B 0 -T 0x82 -b 7 -t 0x72      transit channel / address, then target channel / address
    -b 7 -t 0x72                   single bridge
    -t 0x72                        single bridge on channel 0

The session handling, error translation and settings are :mod:`drivers.ipmi`'s: this
driver subclasses :class:`~drivers.ipmi.IPMIDriver` and only sends its chassis
commands (Get Chassis Status, Chassis Control, Set System Boot Options) through the
bridge. pyghmi's client builds one Send Message layer (``bridge_request``); the second
layer of a double bridge is added by :func:`double_bridge_payload`, which rewraps the
payload pyghmi built (pyghmi still tracks the innermost reply, so the replies it
waits for are unchanged).

A Send Message that the chassis cannot deliver (no cartridge at that address) is
answered with a non-zero completion code. pyghmi would keep waiting for the bridged
reply until its retry ceiling; the driver hands that answer over as the awaited reply
(a per-call wrapper of the session's reply callback) and reports :class:`NotFoundError`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import field_validator

from .base import BootDevice, Capabilities, DriverSettings, PowerState, param
from .errors import CallTimeoutError, DeviceError, NotFoundError, UnsupportedError
from .ipmi import (
    IPMIDriver,
    IPMISettings,
    classify_pyghmi_error,
    completion_code_error,
)
from .registry import register

Hop = tuple[int, int]
"""One bridge hop: (channel, IPMB slave address)."""

IPMB_BMC_ADDRESS = 0x20
SEND_MESSAGE = 0x34
NETFN_APP = 0x06
TRACK_REQUEST = 0x40

# Set System Boot Options, parameter 5, boot device selector (IPMI 2.0 table 28-14)
BOOT_SELECTORS: dict[BootDevice, int] = {
    BootDevice.PXE: 1,
    BootDevice.DISK: 2,
    BootDevice.CDROM: 5,
    BootDevice.BIOS: 6,
}

_OPTION = re.compile(r"^-([BTbt])$")


def parse_hwaddress(text: str) -> tuple[Hop, ...]:
    """The bridge path (outermost hop first) from MAAS' ipmitool-style ``power_hwaddress``.

    Raises :class:`ValueError` (never echoing more than the option names) when the text
    is not ``[-B chan -T addr] [-b chan] -t addr``.
    """
    tokens = text.split()
    values: dict[str, int] = {}
    if len(tokens) % 2:
        raise ValueError("expected option/value pairs such as '-b 7 -t 0x72'")
    for flag, raw in zip(tokens[0::2], tokens[1::2], strict=True):
        match = _OPTION.match(flag)
        if not match:
            raise ValueError("only the options -B, -T, -b and -t are understood")
        name = match.group(1)
        if name in values:
            raise ValueError(f"option -{name} given twice")
        try:
            values[name] = int(raw, 0)
        except ValueError:
            raise ValueError(f"-{name} needs a number (decimal or 0x..)") from None
    if "t" not in values:
        raise ValueError("the target address (-t) is required")
    if ("B" in values or "T" in values) and "T" not in values:
        raise ValueError("a transit channel (-B) needs a transit address (-T)")
    for name in ("b", "B"):
        if not 0 <= values.get(name, 0) <= 0x0F:
            raise ValueError(f"-{name}: channel must be 0-15")
    for name in ("t", "T"):
        if name in values and not (0 < values[name] <= 0xFE and values[name] % 2 == 0):
            raise ValueError(f"-{name}: IPMB slave addresses are even, 0x02-0xfe")
    target = (values.get("b", 0), values["t"])
    if "T" in values:
        return ((values.get("B", 0), values["T"]), target)
    return (target,)


def _checksum(data: bytes | bytearray) -> int:
    return (0x100 - sum(data)) & 0xFF


def double_bridge_payload(single: bytearray, transit: Hop, target: Hop) -> bytearray:
    """Turn pyghmi's single-bridged IPMI payload (Send Message to ``target``) into a
    double-bridged one: Send Message to ``transit`` carrying Send Message to ``target``.

    ``single`` is ``[0x20, App<<2, cs, 0x81, seq, 0x34, 0x40|chan] + inner + [cs]``
    (IPMI 2.0 figure 14-11). The inner request's requester becomes the transit
    controller, which is who sends it on the target's bus.
    """
    head, inner = single[:7], bytearray(single[7:-1])
    seq = head[4]
    inner[3] = transit[1]
    inner[-1] = _checksum(inner[3:-1])
    middle_header = bytearray((transit[1], NETFN_APP << 2))
    middle = (middle_header + bytes((_checksum(middle_header),))
              + bytes((IPMB_BMC_ADDRESS, seq, SEND_MESSAGE, TRACK_REQUEST | target[0]))
              + inner)
    middle.append(_checksum(middle[3:]))
    outer = bytearray(head)
    outer[6] = TRACK_REQUEST | transit[0]
    payload = outer + middle
    payload.append(_checksum(payload[3:]))
    return payload


class MoonshotSettings(IPMISettings):
    """MAAS ``moonshot`` power parameters: the Chassis Manager's (as ``ipmi``) plus the
    cartridge node's bridge path."""

    power_hwaddress: str = param(
        description="bridge path to the cartridge node, ipmitool style: "
        "'-B 0 -T 0x82 -b 7 -t 0x72' (transit channel/address, target channel/address)",
        scope="node",
    )

    @field_validator("power_hwaddress")
    @classmethod
    def _check_hwaddress(cls, value: str) -> str:
        parse_hwaddress(value)
        return " ".join(value.split())


@register
class MoonshotDriver(IPMIDriver):
    """A Moonshot cartridge node: IPMI through the iLO Chassis Manager, bridged."""

    power_type = "moonshot"
    description = "HP Moonshot - iLO4 (IPMI)"
    settings_model = MoonshotSettings
    capabilities = Capabilities(
        pxe_next_boot=True,
        power_query=True,
        chassis_probe=False,
        detailed_errors=True,
        bmc_enlistment=False,
    )
    settings: MoonshotSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self.path = parse_hwaddress(self.settings.power_hwaddress)

    lease_per_action = False  # many cartridge nodes share one Chassis Manager

    # bmc_key is IPMIDriver's: every cartridge node behind one Chassis Manager shares
    # its sessions, so they share one key (one call in flight per Chassis Manager).

    def _where(self) -> str:
        return f"{super()._where()} [{self.settings.power_hwaddress}]"

    def _bridged(self, cmd: Any, action: str, netfn: int, command: int,
                 data: tuple[int, ...] = ()) -> Any:
        """One request bridged to the cartridge node; raises on a non-zero completion."""
        session = cmd.ipmi_session
        target = self.path[-1]
        bridge = {"channel": target[0], "addr": target[1]}
        original_build = session._make_ipmi_payload
        original_callback = session._generic_callback
        undelivered: list[int] = []

        def build(*args: Any, **kwargs: Any) -> bytearray:
            payload = original_build(*args, **kwargs)
            bridged = args[2] if len(args) > 2 else kwargs.get("bridge_request")
            if len(self.path) == 1 or not bridged:  # e.g. a logout on a broken session
                return payload  # type: ignore[no-any-return]
            return double_bridge_payload(payload, self.path[0], target)

        def callback(response: dict[str, Any]) -> None:
            # pyghmi waits for the bridged reply only; a refused Send Message would leave
            # it waiting until its retry ceiling. Hand it over as the awaited reply.
            if (response.get("netfn") == NETFN_APP + 1 and response.get("command") == SEND_MESSAGE
                    and response.get("code")):
                undelivered.append(response["code"])
                response = {**response, "netfn": netfn + 1, "command": command, "data": b""}
            original_callback(response)

        session._make_ipmi_payload = build
        session._generic_callback = callback
        try:
            response = cmd.raw_command(netfn=netfn, command=command, data=data,
                                       bridge_request=bridge)
        except Exception as exc:
            raise classify_pyghmi_error(
                exc, address=self._where(), action=action, logged_in=True) from exc
        finally:
            del session._make_ipmi_payload  # back to the class' methods
            del session._generic_callback
        where = f"moonshot {self._where()}: {action}"
        if undelivered:
            raise NotFoundError(
                f"{where}: no cartridge node answers at that address "
                f"(Send Message completion code 0x{undelivered[0]:02x})",
                ipmi_code=undelivered[0])
        code = response.get("code", 0)
        if "error" in response and (not code or code == 0xFFFF):
            raise CallTimeoutError(f"{where}: no answer from the BMC")
        if code:
            raise completion_code_error(code, where)
        return response

    def _node_power(self, cmd: Any) -> PowerState:
        response = self._bridged(cmd, "get chassis status", 0x00, 0x01)
        data = response.get("data") or b""
        if not data:
            raise DeviceError(f"moonshot {self._where()}: get chassis status: empty reply")
        return PowerState.ON if data[0] & 0x01 else PowerState.OFF

    def _control(self, cmd: Any, action: str, directive: int) -> None:
        self._bridged(cmd, action, 0x00, 0x02, (directive,))

    # -- the contract --------------------------------------------------------------

    def power_on(self) -> None:
        """Chassis Control power up, only if the node reads off (never a reset).

        Raises AuthError, BusyError, UnreachableError, CallTimeoutError, NotFoundError,
        DeviceError, ToolMissingError.
        """
        def _on(cmd: Any) -> None:
            if self._node_power(cmd) is PowerState.OFF:
                self._control(cmd, "power on", 0x01)

        self._run("power on", _on)

    def power_off(self, soft: bool = False) -> None:
        """Chassis Control power down (hard) or soft off (ACPI) when on. Raises as
        :meth:`power_on`."""
        def _off(cmd: Any) -> None:
            if soft:
                if self._node_power(cmd) is PowerState.ON:
                    self._control(cmd, "soft off", 0x05)
            else:
                self._control(cmd, "power off", 0x00)

        self._run("power off", _off)

    def power_cycle(self) -> None:
        """Chassis Control power cycle when on; power up when off. Raises as
        :meth:`power_on`."""
        def _cycle(cmd: Any) -> None:
            if self._node_power(cmd) is PowerState.OFF:
                self._control(cmd, "power on", 0x01)
            else:
                self._control(cmd, "power cycle", 0x02)

        self._run("power cycle", _cycle)

    def query(self) -> PowerState:
        """Get Chassis Status of the cartridge node. Raises as :meth:`power_on`."""
        return self._run("query", self._node_power)

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """Set System Boot Options (parameter 5, boot flags) on the cartridge node: the
        next boot (or every boot if ``persistent``) from ``device``. Raises as
        :meth:`power_on`, and UnsupportedError for a device IPMI cannot name."""
        selector = BOOT_SELECTORS.get(BootDevice(device))
        if selector is None:
            raise UnsupportedError(f"moonshot cannot boot from {device}")
        uefi = efi or self.settings.power_boot_type == "efi"
        flags = 0x80 | (0x40 if persistent else 0) | (0x20 if uefi else 0)

        def _set(cmd: Any) -> None:
            self._bridged(cmd, "set boot device", 0x00, 0x08, (0x05, flags, selector << 2, 0, 0))

        self._run("set boot device", _set)
