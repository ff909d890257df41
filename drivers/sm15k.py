"""``sm15k``: a server of a SeaMicro 15000 chassis, by IPMI OEM command or REST.

``power_control`` picks the wire, as in MAAS:

- ``ipmi``: the chassis' IPMI 2.0 BMC (RMCP+, through :mod:`drivers.ipmi`'s session
  handling) and the OEM raw command ``netfn 0x2E cmd 0x01 data 00 7d ab <op> 00
  <server>``, op 1 = power on, 6 = power off. IPMI has no power-state read for a
  server, so :meth:`SM15KDriver.query` (and probing) goes through the REST API (v2.0,
  then v0.9) with the same credentials, as MAAS' probe does.
- ``restapi`` (v0.9): ``GET /v0.9/login?<user>&<password>`` -> a token (order-dependent
  positional query parameters, as the chassis wants them); every reply is a JSON-RPC
  envelope ``{"error": {"code": N}, "result": ...}``; ``GET servers/all?<token>`` lists
  one row per server NIC (``serverId`` "<id>/0", ``serverNIC``, ``serverMacAddr``,
  ``serverActive``); ``PUT servers/<index>?action=Power-On&using-pxe=true&<token>``,
  ``action=Power-Off&force=true``, ``action=Reset&using-pxe=true``; ``GET logout?<token>``.
- ``restapi2`` (v2.0): ``POST /v2.0/login`` JSON ``{username, password}`` -> a JSON
  string token ``"OpaqueRef:..."``; ``GET /v2.0/servers[/<id>/0]?authtoken=<token>``
  (``active``, ``nic.<n>.macAddr``); ``PUT /v2.0/servers/<id>/0`` JSON ``{"action":
  "power-on", "using-pxe": true, "authtoken": ...}`` (``power-off`` with ``force``,
  ``reset``); ``GET /v2.0/logout?authtoken=<token>``.

The chassis allows one login at a time: every node of a chassis shares one ``bmc_key``
(one call in flight per chassis), and every driver call logs in and out again (the
login never outlives the call, since other nodes' calls come in between). A login
refused because another holds the slot (REST 503 / JSON-RPC 503) is ``busy``; wrong
credentials (401 at login) ``auth_failed``; a token refused after login (another login
took the slot over) ``busy``; an unknown server ``not_found``.

Power on over REST always asks for a PXE boot (``using-pxe=true``), as MAAS does; there
is no separate next-boot setting, so the driver does not declare ``pxe_next_boot``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import quote

from pydantic import SecretStr, field_validator, model_validator

from .base import (
    Capabilities,
    DriverSettings,
    PowerDriver,
    PowerState,
    ProbedMachine,
    param,
    secret_value,
)
from .errors import (
    AuthError,
    BusyError,
    DeviceError,
    NotFoundError,
    PowerError,
    SettingsError,
    UnsupportedError,
)
from .httpclient import HttpClient
from .ipmi import IPMIDriver, IPMISettings
from .registry import register

PowerControl = Literal["ipmi", "restapi", "restapi2"]

SEAMICRO_NETFN = 0x2E
SEAMICRO_COMMAND = 0x01
SEAMICRO_IANA = (0x00, 0x7D, 0xAB)
IPMI_OPS = {"on": 1, "off": 6}
CC_INVALID_DATA = 0xCC


class SM15KSettings(DriverSettings):
    """MAAS ``sm15k`` power parameters (plus the chassis' IPMI and REST ports)."""

    power_address: str = param(description="the chassis' IP address or host name")
    power_user: str = param("", description="chassis user name")
    power_pass: SecretStr = param(SecretStr(""), description="chassis password", secret=True)
    power_control: PowerControl = param(
        "ipmi", description="ipmi (OEM raw command), restapi (REST v0.9) or restapi2 (REST v2.0)",
        choices=("ipmi", "restapi", "restapi2"),
    )
    system_id: str = param(description="the server number in the chassis (e.g. 5)", scope="node")
    power_port: int = param(623, description="the chassis' IPMI UDP port")
    rest_port: int = param(80, description="the chassis' REST API TCP port (HTTP)")

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        return IPMISettings._check_address(value)  # type: ignore[no-any-return]

    @field_validator("system_id", mode="before")
    @classmethod
    def _check_system_id(cls, value: Any) -> str:
        text = str(value).strip()
        if text.endswith("/0"):
            text = text[:-2]
        if not text.isdigit() or int(text) > 255:
            raise ValueError("the server number must be 0-255")
        return str(int(text))

    @field_validator("power_port", "rest_port")
    @classmethod
    def _check_port(cls, value: int) -> int:
        if not 0 < value < 65536:
            raise ValueError("port must be between 1 and 65535")
        return value

    @model_validator(mode="after")
    def _ipmi_limits(self) -> SM15KSettings:
        if self.power_control == "ipmi":
            if len(self.power_user.encode()) > 16:
                raise ValueError("IPMI user names are at most 16 bytes")
            if len(secret_value(self.power_pass).encode()) > 20:
                raise ValueError("IPMI 2.0 passwords are at most 20 bytes")
        return self


class _RestV09:
    """The v0.9 API: JSON-RPC envelopes, order-dependent positional query parameters."""

    version = "v0.9"

    def __init__(self, http: HttpClient, user: str, password: str) -> None:
        self.http, self.user, self.password = http, user, password
        self.token: str | None = None

    def _call(self, method: str, path: str, params: list[str], action: str,
              login: bool = False) -> Any:
        query = "&".join(params)
        response = self.http.request(method, f"/v0.9/{path}", action=action, params=query or None,
                                     headers={"Content-Type": "text/json"} if method == "PUT" else None)
        body = self.http.json(response, action)
        try:
            code = int(body["error"]["code"])
        except (KeyError, TypeError, ValueError):
            raise DeviceError(f"{self.http.where}: {action}: not a JSON-RPC reply") from None
        if code in (200, 202, 304):
            return body.get("result")
        if code == 401:
            if login:
                raise AuthError(f"{self.http.where}: {action}: the chassis refused the credentials")
            raise BusyError(f"{self.http.where}: {action}: token refused (another login took the slot)")
        if code in (409, 503):
            raise BusyError(f"{self.http.where}: {action}: another login holds the chassis ({code})")
        if code == 404:
            raise NotFoundError(f"{self.http.where}: {action}: not found")
        raise DeviceError(f"{self.http.where}: {action}: JSON-RPC error {code}")

    def login(self) -> None:
        if self.token is None:
            token = self._call("GET", "login", [quote(self.user, safe=""), quote(self.password, safe="")],
                               "login", login=True)
            if not isinstance(token, str) or not token:
                raise DeviceError(f"{self.http.where}: login: no token in the reply")
            self.token = token
            self.http.secrets.append(token)

    def logout(self) -> None:
        token, self.token = self.token, None
        if token:
            self._call("GET", "logout", [quote(token, safe="")], "logout")

    def _rows(self) -> list[dict[str, Any]]:
        self.login()
        assert self.token is not None
        result = self._call("GET", "servers/all", [quote(self.token, safe="")], "list servers")
        if not isinstance(result, dict):
            raise DeviceError(f"{self.http.where}: list servers: unexpected reply")
        rows = []
        for index, row in result.items():
            if isinstance(row, dict) and str(row.get("serverNIC", "0")) == "0":
                rows.append({**row, "_index": str(index)})
        return rows

    def servers(self) -> list[tuple[str, PowerState, tuple[str, ...]]]:
        out: list[tuple[str, PowerState, tuple[str, ...]]] = []
        for row in self._rows():
            sid = str(row.get("serverId", "")).split("/")[0]
            mac = row.get("serverMacAddr")
            out.append((sid, _state(row.get("serverActive")), (str(mac),) if mac else ()))
        return out

    def _index(self, system_id: str) -> str:
        for row in self._rows():
            if str(row.get("serverId")) == f"{system_id}/0":
                return str(row["_index"])
        raise NotFoundError(f"{self.http.where}: server {system_id} is not in this chassis")

    def state(self, system_id: str) -> PowerState:
        for sid, state, _macs in self.servers():
            if sid == system_id:
                return state
        raise NotFoundError(f"{self.http.where}: server {system_id} is not in this chassis")

    def action(self, system_id: str, action: str) -> None:
        index = self._index(system_id)
        assert self.token is not None
        params = {
            "on": ["action=Power-On", "using-pxe=true"],
            "off": ["action=Power-Off", "force=true"],
            "soft_off": ["action=Power-Off", "force=false"],
            "reset": ["action=Reset", "using-pxe=true"],
        }[action]
        self._call("PUT", f"servers/{index}", [*params, quote(self.token, safe="")], f"power {action}")


class _RestV2:
    """The v2.0 API: JSON bodies, ``authtoken`` in the query (GET) or body (PUT)."""

    version = "v2.0"

    def __init__(self, http: HttpClient, user: str, password: str) -> None:
        self.http, self.user, self.password = http, user, password
        self.token: str | None = None

    def _call(self, method: str, path: str, action: str, body: dict[str, Any] | None = None,
              login: bool = False) -> Any:
        params = None
        if not login:
            self.login()
            if method == "GET":
                params = {"authtoken": self.token}
            else:
                body = {**(body or {}), "authtoken": self.token}
        try:
            response = self.http.request(method, f"/v2.0/{path}", action=action, params=params,
                                         json=body)
        except AuthError:
            if login:
                raise
            raise BusyError(f"{self.http.where}: {action}: token refused (another login took the slot)") from None
        return self.http.json(response, action) if response.content else None

    def login(self) -> None:
        if self.token is None:
            token = self._call("POST", "login", "login",
                               {"username": self.user, "password": self.password}, login=True)
            if not isinstance(token, str) or "OpaqueRef" not in token:
                raise DeviceError(f"{self.http.where}: login: no token in the reply")
            self.token = token
            self.http.secrets.append(token)

    def logout(self) -> None:
        token, self.token = self.token, None
        if token:
            self.http.request("GET", "/v2.0/logout", action="logout", params={"authtoken": token})

    def servers(self) -> list[tuple[str, PowerState, tuple[str, ...]]]:
        result = self._call("GET", "servers", "list servers")
        if not isinstance(result, dict):
            raise DeviceError(f"{self.http.where}: list servers: unexpected reply")
        out = []
        for key, server in sorted(result.items()):
            if not isinstance(server, dict):
                continue
            nics = server.get("nic") or {}
            macs = tuple(str(n["macAddr"]) for _, n in sorted(nics.items())
                         if isinstance(n, dict) and n.get("macAddr"))
            out.append((str(key).split("/")[0], _state(server.get("active")), macs))
        return out

    def state(self, system_id: str) -> PowerState:
        server = self._call("GET", f"servers/{system_id}/0", "query")
        if not isinstance(server, dict):
            raise DeviceError(f"{self.http.where}: query: unexpected reply")
        return _state(server.get("active"))

    def action(self, system_id: str, action: str) -> None:
        bodies: dict[str, dict[str, Any]] = {
            "on": {"action": "power-on", "using-pxe": True},
            "off": {"action": "power-off", "force": True},
            "soft_off": {"action": "power-off"},
            "reset": {"action": "reset", "using-pxe": True},
        }
        self._call("PUT", f"servers/{system_id}/0", f"power {action}", bodies[action])


def _state(value: Any) -> PowerState:
    if isinstance(value, bool):
        return PowerState.ON if value else PowerState.OFF
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return PowerState.ON if value.lower() == "true" else PowerState.OFF
    return PowerState.UNKNOWN


@register
class SM15KDriver(PowerDriver):
    """A SeaMicro 15000 server: IPMI OEM raw command, or REST v0.9 / v2.0."""

    power_type = "sm15k"
    description = "SeaMicro 15000"
    settings_model = SM15KSettings
    capabilities = Capabilities(
        pxe_next_boot=False,
        power_query=True,
        chassis_probe=True,
        detailed_errors=True,
        bmc_enlistment=False,
    )
    settings: SM15KSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._ipmi: IPMIDriver | None = None
        self._http: HttpClient | None = None
        self._rest: _RestV09 | _RestV2 | None = None

    def bmc_key(self) -> str:
        """One key per chassis: it allows one login at a time, whatever the wire."""
        return f"sm15k:{self.settings.power_address}"

    # -- wires ---------------------------------------------------------------------

    def _ipmi_driver(self) -> IPMIDriver:
        if self._ipmi is None:
            s = self.settings
            try:
                ipmi_settings = IPMISettings(power_address=s.power_address, power_port=s.power_port,
                                             power_user=s.power_user, power_pass=s.power_pass)
            except ValueError:
                raise SettingsError("sm15k: parameters unusable for IPMI") from None
            self._ipmi = IPMIDriver(ipmi_settings, timeout=self.timeout)
        return self._ipmi

    def _ipmi_power(self, op: str) -> None:
        ipmi = self._ipmi_driver()
        data = (*SEAMICRO_IANA, IPMI_OPS[op], 0, int(self.settings.system_id))
        action = f"power {op}"
        try:
            ipmi._run(action, lambda cmd: ipmi._raw(cmd, action, SEAMICRO_NETFN, SEAMICRO_COMMAND, data))
        except DeviceError as exc:
            if exc.details.get("ipmi_code") == CC_INVALID_DATA:
                raise NotFoundError(
                    f"sm15k {self.settings.power_address}: server {self.settings.system_id} "
                    "is not in this chassis (completion code 0xcc)") from exc
            raise

    def _rest_api(self, version: str | None = None) -> _RestV09 | _RestV2:
        wanted = version or {"restapi": "v0.9", "restapi2": "v2.0"}.get(self.settings.power_control, "v2.0")
        if self._rest is not None and self._rest.version == wanted:
            return self._rest
        self._close_rest()
        s = self.settings
        host = f"[{s.power_address}]" if ":" in s.power_address else s.power_address
        self._http = HttpClient(f"http://{host}:{s.rest_port}", where=f"sm15k {host}:{s.rest_port}",
                                timeout=self.timeout, secrets=[secret_value(s.power_pass)])
        cls = _RestV09 if wanted == "v0.9" else _RestV2
        self._rest = cls(self._http, s.power_user, secret_value(s.power_pass))
        return self._rest

    def _rest_any(self, call: Any) -> Any:
        """``call(api)`` on the configured REST API (for ``ipmi``: v2.0, then v0.9), logged
        out afterwards: the worker serialises *calls* per chassis, not whole jobs, so a
        login must not outlive the call that made it."""
        try:
            if self.settings.power_control != "ipmi":
                return call(self._rest_api())
            try:
                return call(self._rest_api("v2.0"))
            except NotFoundError:
                self._close_rest()
                return call(self._rest_api("v0.9"))
        finally:
            self._close_rest()

    # -- the contract --------------------------------------------------------------

    def power_on(self) -> None:
        """Power the server on (REST: with a PXE boot). Never resets a server that is on:
        the chassis' power-on of a running server is a no-op. Raises AuthError,
        BusyError, UnreachableError, CallTimeoutError, NotFoundError, DeviceError."""
        if self.settings.power_control == "ipmi":
            self._ipmi_power("on")
        else:
            self._rest_any(lambda api: api.action(self.settings.system_id, "on"))

    def power_off(self, soft: bool = False) -> None:
        """Power the server off: forced, or (REST only) graceful with ``soft``. Raises as
        :meth:`power_on`, and UnsupportedError for a soft off over IPMI."""
        if self.settings.power_control == "ipmi":
            if soft:
                raise UnsupportedError("sm15k over IPMI has no graceful power off")
            self._ipmi_power("off")
        else:
            self._rest_any(lambda api: api.action(self.settings.system_id, "soft_off" if soft else "off"))

    def power_cycle(self) -> None:
        """REST: the Reset action (with PXE) when on, power on when off; IPMI: off then on.
        Raises as :meth:`power_on`."""
        if self.settings.power_control == "ipmi":
            self._ipmi_power("off")
            self._ipmi_power("on")
            return
        def _cycle(api: _RestV09 | _RestV2) -> None:
            if api.state(self.settings.system_id) is PowerState.OFF:
                api.action(self.settings.system_id, "on")
            else:
                api.action(self.settings.system_id, "reset")

        self._rest_any(_cycle)

    def query(self) -> PowerState:
        """The server's state from the REST API (for ``ipmi``: v2.0, else v0.9). Raises
        as :meth:`power_on`."""
        return self._rest_any(lambda api: api.state(self.settings.system_id))  # type: ignore[no-any-return]

    @classmethod
    def probe_chassis(cls, params: Mapping[str, Any], *, timeout: float = 10.0) -> list[ProbedMachine]:
        """Every server of the chassis, with its first NIC's MAC and power state, over
        REST (``ipmi``: v2.0, then v0.9). Raises as :meth:`power_on`."""
        settings = cls.validate_chassis(params)
        probe = cls(settings, timeout=timeout)
        try:
            servers = probe._rest_any(lambda api: api.servers())
        finally:
            probe.close()
        host = str(getattr(settings, "power_address", "")).replace(".", "-").replace(":", "-")
        return [
            ProbedMachine(name=f"sm15k-{host}-s{sid}", power_parameters={"system_id": sid},
                          power=state, description=f"SeaMicro server {sid}/0", mac_addresses=macs)
            for sid, state, macs in servers
        ]

    def _close_rest(self) -> None:
        rest, self._rest = self._rest, None
        if rest is not None:
            try:
                rest.logout()
            except PowerError:
                pass
        http, self._http = self._http, None
        if http is not None:
            http.close()

    def close(self) -> None:
        """Log out of the REST API and the IPMI session. Never raises."""
        try:
            self._close_rest()
        except Exception:  # noqa: BLE001 - close never raises
            pass
        ipmi, self._ipmi = self._ipmi, None
        if ipmi is not None:
            ipmi.close()
