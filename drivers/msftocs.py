"""``msftocs``: Microsoft Open Compute (Open CloudServer) chassis manager, one blade per node.

Wire: REST-style ``GET`` requests on port 8000 (``power_port``) with HTTP basic auth and
XML replies in the ``Microsoft.GFS.WCS.Contracts`` namespace, each with a
``completionCode``:

- ``GetBladeState?bladeid=N`` -> ``bladeState`` ON / OFF;
- ``SetBladeOn``, ``SetBladeOff``, ``SetBladeActivePowerCycle`` ``?bladeid=N``;
- ``SetNextBoot?bladeid=N&bootType=2&uefi=false&persistent=false`` (2 PXE, 3 disk,
  5 BIOS setup); ``GetChassisInfo`` lists the blades (number, GUID, name, power, MACs).

``completionCode``: Success -> done; Timeout -> ``timeout``; SerialSessionActive (a
serial console holds the blade) -> ``busy``; ParameterOutOfRange / CommandNotValidForBlade
(no such blade, or not a server) -> ``not_found``; anything else -> ``device_error``.
Unlike MAAS, "on" never powers a running blade off first, nor changes the boot device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from xml.etree.ElementTree import Element

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
from .errors import BusyError, CallTimeoutError, DeviceError, NotFoundError, UnsupportedError
from .httpclient import HttpAuth, HttpClient, base_url, local_name, xml_find, xml_text
from .registry import register

_BOOT_TYPES = {BootDevice.PXE: 2, BootDevice.DISK: 3, BootDevice.BIOS: 5}
_STATES = {"ON": PowerState.ON, "OFF": PowerState.OFF}


class MsftOcsSettings(DriverSettings):
    """MAAS ``msftocs`` power parameters."""

    power_address: str = param(description="Chassis manager address (host, or http(s):// URL)")
    power_port: int = param(8000, description="Chassis manager port (default 8000)", ge=1, le=65535)
    power_user: str = param(description="Chassis manager user")
    power_pass: SecretStr = param(description="Chassis manager password", secret=True)
    blade_id: int = param(description="Blade number (typically 1-24)", scope="node", ge=1)
    power_verify_ssl: bool = param(False, description="Verify the TLS certificate (https only)")

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        base_url(value, default_scheme="http")
        return value

    @property
    def address(self) -> tuple[str, str]:
        return base_url(self.power_address, default_scheme="http", default_port=self.power_port)


@register
class MsftOcsDriver(PowerDriver):
    """Power one blade of an OCS chassis manager. Raises only :mod:`drivers.errors`."""

    power_type = "msftocs"
    description = "Microsoft OCS - Chassis Manager"
    settings_model = MsftOcsSettings
    capabilities = Capabilities(
        pxe_next_boot=True, power_query=True, chassis_probe=True, detailed_errors=True
    )

    settings: MsftOcsSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._client: HttpClient | None = None

    def bmc_key(self) -> str:
        return "msftocs:" + self.settings.address[1]

    def power_on(self) -> None:
        """``SetBladeOn``. Raises the transient errors, :class:`AuthError`,
        :class:`NotFoundError`, :class:`DeviceError`."""
        self._blade("SetBladeOn", "power on")

    def power_off(self, soft: bool = False) -> None:
        """``SetBladeOff`` (the chassis has no soft off). Raises like :meth:`power_on`."""
        self._blade("SetBladeOff", "power off")

    def power_cycle(self) -> None:
        """``SetBladeActivePowerCycle``. Raises like :meth:`power_on`."""
        self._blade("SetBladeActivePowerCycle", "power cycle")

    def query(self) -> PowerState:
        """``GetBladeState`` -> ON / OFF. Raises like :meth:`power_on`."""
        reply = self._blade("GetBladeState", "query")
        state = (xml_text(reply, "bladeState") or "").upper()
        if state not in _STATES:
            raise DeviceError(f"{self._where()}: query: unexpected bladeState")
        return _STATES[state]

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """``SetNextBoot`` with bootType 2 (PXE), 3 (disk) or 5 (BIOS setup). Raises
        :class:`UnsupportedError` for a CD-ROM, and like :meth:`power_on`."""
        boot_type = _BOOT_TYPES.get(BootDevice(device))
        if boot_type is None:
            raise UnsupportedError(f"msftocs cannot boot from {device}")
        self._blade("SetNextBoot", "set next boot", bootType=boot_type,
                    uefi=str(efi).lower(), persistent=str(persistent).lower())

    @classmethod
    def probe_chassis(
        cls, params: Mapping[str, Any], *, timeout: float = 10.0
    ) -> list[ProbedMachine]:
        """``GetChassisInfo``: every blade with its number, power state and MACs. Raises
        :class:`SettingsError` and like :meth:`power_on`."""
        settings = cls.validate_chassis(params)
        driver = cls(settings, timeout=timeout)
        try:
            reply = driver._call("GetChassisInfo", "probe", {})
        finally:
            driver.close()
        machines = []
        for info in reply.iter():
            if local_name(info.tag) != "BladeInfo":
                continue
            number = xml_text(info, "bladeNumber") or ""
            if not number.isdigit():
                continue
            macs = tuple(
                (e.text or "").strip().lower() for e in info.iter()
                if local_name(e.tag) == "macAddress" and (e.text or "").strip()
            )
            machines.append(ProbedMachine(
                name=f"blade{int(number):02d}",
                power_parameters={"blade_id": int(number)},
                power=_STATES.get((xml_text(info, "powerState") or "").upper(), PowerState.UNKNOWN),
                description=" ".join(filter(None, (xml_text(info, "bladeName"),
                                                   xml_text(info, "bladeGuid")))),
                mac_addresses=macs,
            ))
        return machines

    def close(self) -> None:
        """Close the HTTP session. Never raises."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- helpers --------------------------------------------------------------------

    def _where(self) -> str:
        blade = self.settings.blade_id
        return f"msftocs {self.settings.address[1]}" + (f" blade {blade}" if blade else "")

    def _http(self) -> HttpClient:
        if self._client is None:
            s = self.settings
            self._client = HttpClient(
                s.address[0], where=self._where(), timeout=self.timeout,
                verify_ssl=s.power_verify_ssl,
                auth=HttpAuth(s.power_user, secret_value(s.power_pass)),
            )
        return self._client

    def _blade(self, command: str, action: str, **extra: Any) -> Element:
        return self._call(command, action, {"bladeid": self.settings.blade_id, **extra})

    def _call(self, command: str, action: str, params: dict[str, Any]) -> Element:
        client = self._http()
        reply = client.xml(client.get(f"/{command}", action=action, params=params), action)
        code = xml_text(reply, "completionCode")
        if code is None or xml_find(reply, "completionCode") is None:
            raise DeviceError(f"{self._where()}: {action}: reply has no completionCode")
        if code == "Success":
            return reply
        detail = client.scrub(xml_text(reply, "statusDescription") or "", limit=80)
        message = f"{self._where()}: {action}: {code}" + (f" ({detail})" if detail else "")
        if code == "Timeout":
            raise CallTimeoutError(message)
        if code == "SerialSessionActive":
            raise BusyError(message)
        if code in ("ParameterOutOfRange", "CommandNotValidForBlade"):
            raise NotFoundError(message)
        raise DeviceError(message, completion_code=code)
