"""``openbmc``: an OpenBMC BMC over its REST (D-Bus object) API.

Wire: ``POST /login`` with ``{"data": [user, password]}`` (a session cookie; bmcweb also
sets ``XSRF-TOKEN``, echoed as ``X-XSRF-TOKEN``), ``POST /logout`` with ``{"data": []}``.
Replies are ``{"data": ..., "message": ..., "status": "ok" | "error"}``.

- state: ``GET /xyz/openbmc_project/state/host0/attr/CurrentHostState`` ->
  ``xyz.openbmc_project.State.Host.HostState.Running`` (on; also Quiesced,
  DiagnosticMode) / ``.Off`` (off) / ``.TransitioningTo*`` (unknown);
- on / soft off / cycle: ``PUT .../state/host0/attr/RequestedHostTransition``
  ``{"data": "xyz.openbmc_project.State.Host.Transition.On|Off|Reboot"}``;
- hard off: ``PUT /xyz/openbmc_project/state/chassis0/attr/RequestedPowerTransition``
  ``xyz.openbmc_project.State.Chassis.Transition.Off``;
- next boot: ``PUT /xyz/openbmc_project/control/host0/boot/one_time/attr/BootSource``
  (``xyz.openbmc_project.Control.Boot.Source.Sources.Network`` for PXE, ``Disk``,
  ``ExternalMedia``) and ``.../one_time/attr/Enabled`` ``true`` (persistent: the
  ``boot/attr/BootSource`` object and one-time ``Enabled`` false); ``efi`` also sets
  ``BootType`` ``EFI``.

One login per driver instance, logged out by :meth:`close`; a session the BMC expired
(401 after a good login) is renewed once. Unlike MAAS, "on" never powers a running host
off first. ``power_verify_ssl`` is powerq's (MAAS does not verify): off by default.
"""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr, field_validator

from .base import (
    BootDevice,
    Capabilities,
    DriverSettings,
    PowerDriver,
    PowerState,
    param,
    secret_value,
)
from .errors import AuthError, DeviceError, UnsupportedError
from .httpclient import HttpClient, base_url
from .registry import register

HOST = "/xyz/openbmc_project/state/host0/attr/"
CHASSIS = "/xyz/openbmc_project/state/chassis0/attr/"
BOOT = "/xyz/openbmc_project/control/host0/boot/"
HOST_TRANSITION = "xyz.openbmc_project.State.Host.Transition."
CHASSIS_TRANSITION = "xyz.openbmc_project.State.Chassis.Transition."
BOOT_SOURCE = "xyz.openbmc_project.Control.Boot.Source.Sources."
BOOT_TYPE = "xyz.openbmc_project.Control.Boot.Type.Types."

_HOST_STATES = {"Running": PowerState.ON, "Quiesced": PowerState.ON,
                "DiagnosticMode": PowerState.ON, "Off": PowerState.OFF}
_SOURCES = {BootDevice.PXE: "Network", BootDevice.DISK: "Disk", BootDevice.CDROM: "ExternalMedia"}


class OpenBmcSettings(DriverSettings):
    """MAAS ``openbmc`` power parameters."""

    power_address: str = param(description="BMC address: host, host:port or http(s):// URL (default https)")
    power_user: str = param(description="OpenBMC user")
    power_pass: SecretStr = param(description="OpenBMC password", secret=True)
    power_verify_ssl: bool = param(False, description="Verify the BMC's TLS certificate (MAAS does not)")

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        base_url(value)
        return value

    @field_validator("power_user")
    @classmethod
    def _check_user(cls, value: str) -> str:
        if not value:
            raise ValueError("power_user is required")
        return value


@register
class OpenBmcDriver(PowerDriver):
    """Power through OpenBMC's REST API. Raises only :mod:`drivers.errors`."""

    power_type = "openbmc"
    description = "OpenBMC Power Driver"
    settings_model = OpenBmcSettings
    capabilities = Capabilities(pxe_next_boot=True, power_query=True, detailed_errors=True)

    settings: OpenBmcSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._client: HttpClient | None = None
        self._logged_in = False

    def bmc_key(self) -> str:
        return "openbmc:" + base_url(self.settings.power_address)[1]

    def power_on(self) -> None:
        """Host transition ``On`` (a no-op for a running host: never a reboot). Raises
        the transient errors, :class:`AuthError`, :class:`DeviceError`."""
        self._put(HOST + "RequestedHostTransition", HOST_TRANSITION + "On", "power on")

    def power_off(self, soft: bool = False) -> None:
        """Hard: chassis transition ``Off``; soft: host transition ``Off`` (the host
        shuts down). Raises like :meth:`power_on`."""
        if soft:
            self._put(HOST + "RequestedHostTransition", HOST_TRANSITION + "Off", "soft off")
        else:
            self._put(CHASSIS + "RequestedPowerTransition", CHASSIS_TRANSITION + "Off", "power off")

    def power_cycle(self) -> None:
        """Host transition ``Reboot``. Raises like :meth:`power_on`."""
        self._put(HOST + "RequestedHostTransition", HOST_TRANSITION + "Reboot", "power cycle")

    def query(self) -> PowerState:
        """``CurrentHostState``: Running / Quiesced / DiagnosticMode -> on, Off -> off,
        anything else (transitioning) -> unknown. Raises like :meth:`power_on`."""
        data = self._call("GET", HOST + "CurrentHostState", "query")
        if not isinstance(data, str):
            raise DeviceError(f"{self._where()}: query: CurrentHostState is not a string")
        return _HOST_STATES.get(data.rsplit(".", 1)[-1], PowerState.UNKNOWN)

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """Set the (one-time unless ``persistent``) boot source; PXE is ``Network``.
        Raises :class:`UnsupportedError` for BIOS setup, and like :meth:`power_on`."""
        source = _SOURCES.get(BootDevice(device))
        if source is None:
            raise UnsupportedError(f"openbmc cannot boot into {device}")
        where = BOOT if persistent else BOOT + "one_time/"
        self._put(where + "attr/BootSource", BOOT_SOURCE + source, "set boot source")
        if efi:
            self._put(where + "attr/BootType", BOOT_TYPE + "EFI", "set boot type")
        self._put(BOOT + "one_time/attr/Enabled", not persistent, "enable boot override")

    def close(self) -> None:
        """Log out (if logged in) and close the session. Never raises."""
        client, self._client = self._client, None
        if client is None:
            return
        if self._logged_in:
            try:
                client.post("/logout", action="logout", json={"data": []},
                            headers=self._xsrf(client))
            except Exception:  # noqa: BLE001 - close never raises
                pass
        self._logged_in = False
        client.close()

    # -- helpers --------------------------------------------------------------------

    def _where(self) -> str:
        return f"openbmc {base_url(self.settings.power_address)[1]}"

    def _http(self) -> HttpClient:
        if self._client is None:
            s = self.settings
            self._client = HttpClient(
                base_url(s.power_address)[0], where=self._where(), timeout=self.timeout,
                verify_ssl=s.power_verify_ssl, headers={"Accept": "application/json"},
                secrets=(secret_value(s.power_pass),),
            )
        return self._client

    def _login(self) -> HttpClient:
        client = self._http()
        if not self._logged_in:
            s = self.settings
            reply = client.post(
                "/login", action="login",
                json={"data": [s.power_user, secret_value(s.power_pass)]},
            )
            self._check(client.json(reply, "login"), "login")
            self._logged_in = True
        return client

    def _call(self, method: str, path: str, action: str, data: Any = None) -> Any:
        client = self._login()
        body = None if method == "GET" else {"data": data}
        for attempt in (1, 2):
            try:
                reply = client.request(method, path, action=action, json=body,
                                       headers=self._xsrf(client))
            except AuthError:
                if attempt == 2:
                    raise
                self._logged_in = False  # the session expired: log in once more
                client = self._login()
                continue
            return self._check(client.json(reply, action), action)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _xsrf(client: HttpClient) -> dict[str, str]:
        """bmcweb's CSRF guard: echo its ``XSRF-TOKEN`` cookie on writes."""
        xsrf = client.session.cookies.get("XSRF-TOKEN") if client.session else None
        return {"X-XSRF-TOKEN": xsrf} if xsrf else {}

    def _put(self, path: str, value: Any, action: str) -> None:
        self._call("PUT", path, action, value)

    def _check(self, reply: Any, action: str) -> Any:
        if not isinstance(reply, dict):
            raise DeviceError(f"{self._where()}: {action}: reply is not a JSON object")
        if str(reply.get("status", "")).lower() != "ok":
            message = self._http().scrub(str(reply.get("message", "")), limit=80)
            raise DeviceError(f"{self._where()}: {action} failed: {message}")
        return reply.get("data")
