"""``dli``: Digital Loggers web power switch (one outlet per node).

Wire (the switch's classic web interface, as MAAS uses it): ``GET /outlet?<n>=ON``,
``=OFF`` or ``=CCL`` (cycle); the state is read from ``GET /index.htm``, whose
``<!-- state=XX -->`` comment is a hex bitmap of the outlets (outlet n = bit n-1).

- Authentication: HTTP basic, switching to digest when the switch challenges with
  ``Digest`` (newer firmware). Wrong credentials -> ``auth_failed``.
- Unlike MAAS, "on" never switches an outlet off first: the policy queries, and an
  outlet already on is left alone.
- An outlet beyond the bitmap's width (e.g. 9 on an 8-outlet switch) -> ``not_found``.
- No next-boot control (an outlet has none), no probe.
- ``power_address``: host, host:port or an http(s):// URL (default http, as MAAS).
"""

from __future__ import annotations

import re

from pydantic import SecretStr, field_validator

from .base import Capabilities, DriverSettings, PowerDriver, PowerState, param, secret_value
from .errors import DeviceError, NotFoundError
from .httpclient import HttpAuth, HttpClient, base_url
from .registry import register

_STATE = re.compile(r"<!--\s*state=([0-9a-fA-F]+)")


class DliSettings(DriverSettings):
    """MAAS ``dli`` power parameters."""

    power_address: str = param(description="Switch address: host, host:port or http(s):// URL")
    power_user: str = param("", description="Switch user (HTTP basic / digest)")
    power_pass: SecretStr | None = param(None, description="Switch password", secret=True)
    outlet_id: int = param(description="Outlet number (1-based)", scope="node")
    power_verify_ssl: bool = param(
        False, description="Verify the switch's TLS certificate (https only; MAAS does not)"
    )

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        base_url(value, default_scheme="http")
        return value

    @field_validator("outlet_id")
    @classmethod
    def _check_outlet(cls, value: int) -> int:
        if not 1 <= value <= 64:
            raise ValueError("outlet_id must be between 1 and 64")
        return value


@register
class DliDriver(PowerDriver):
    """Power one outlet of a Digital Loggers switch. Raises only :mod:`drivers.errors`."""

    power_type = "dli"
    description = "Digital Loggers, Inc. PDU"
    settings_model = DliSettings
    capabilities = Capabilities(power_query=True, detailed_errors=True)

    settings: DliSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._client: HttpClient | None = None

    def bmc_key(self) -> str:
        return "dli:" + base_url(self.settings.power_address, default_scheme="http")[1]

    def power_on(self) -> None:
        """``/outlet?n=ON``. Raises the transient errors, :class:`AuthError`,
        :class:`NotFoundError`, :class:`DeviceError`."""
        self._outlet("ON", "power on")

    def power_off(self, soft: bool = False) -> None:
        """``/outlet?n=OFF`` (an outlet has no soft off). Raises like :meth:`power_on`."""
        self._outlet("OFF", "power off")

    def power_cycle(self) -> None:
        """``/outlet?n=CCL``: the switch's own off-delay-on. Raises like :meth:`power_on`."""
        self._outlet("CCL", "power cycle")

    def query(self) -> PowerState:
        """Read the outlet's bit in ``index.htm``'s ``state=`` bitmap. Raises like
        :meth:`power_on`; :class:`DeviceError` when the page has no bitmap."""
        client = self._http()
        page = client.get("/index.htm", action="query").text
        match = _STATE.search(page)
        if match is None:
            raise DeviceError(f"{client.where}: query: index.htm has no state= bitmap")
        bits = match.group(1)
        outlet = self.settings.outlet_id
        if outlet > 4 * len(bits):
            raise NotFoundError(
                f"{client.where}: outlet {outlet} not found (the switch has {4 * len(bits)})"
            )
        return PowerState.ON if int(bits, 16) >> (outlet - 1) & 1 else PowerState.OFF

    def close(self) -> None:
        """Close the HTTP session. Never raises."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _http(self) -> HttpClient:
        if self._client is None:
            s = self.settings
            url, identity = base_url(s.power_address, default_scheme="http")
            password = secret_value(s.power_pass)
            auth = HttpAuth(s.power_user, password, "auto") if (s.power_user or password) else None
            self._client = HttpClient(
                url, where=f"dli {identity} outlet {s.outlet_id}", timeout=self.timeout,
                verify_ssl=s.power_verify_ssl, auth=auth,
            )
        return self._client

    def _outlet(self, command: str, action: str) -> None:
        self._http().get(f"/outlet?{self.settings.outlet_id}={command}", action=action)
