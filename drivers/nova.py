"""``nova``: an OpenStack Nova instance, through the compute API with Keystone v3 tokens.

1. ``POST <os_authurl>/v3/auth/tokens`` (password method, user and project in their
   domains, project-scoped) -> the token in the ``X-Subject-Token`` header and the service
   catalog in the body; the compute endpoint is the catalog's ``compute`` service,
   ``public`` interface. The token is kept for the driver instance's life (a 401 on a
   later call logs in once more) and never appears in a message.
2. ``GET /servers/<nova_id>`` -> ``OS-EXT-STS:power_state``: 1 running, 3 paused -> on;
   4 shutdown, 6 crashed, 7 suspended -> off; 0 no state -> unknown.
3. ``POST /servers/<nova_id>/action`` with ``{"os-start": null}``, ``{"os-stop": null}``
   or ``{"reboot": {"type": "HARD"}}`` -> 202.

Errors: 401 / 403 -> ``auth_failed``; 404 -> ``not_found``; 409 Conflict: the instance is
already in the wanted state (``Cannot 'os-start' instance ... while it is in vm_state
active``) -> success; a task under way (``task_state`` set) -> ``busy``; any other
vm_state (suspended, error...) -> ``device_error``; 429 / 503 -> ``busy``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pydantic import SecretStr, field_validator

from .base import Capabilities, DriverSettings, PowerDriver, PowerState, param, secret_value
from .errors import AuthError, BusyError, DeviceError, NotFoundError, PowerError
from .httpclient import HttpClient, base_url, bearer_headers
from .registry import register

_STATES = {1: PowerState.ON, 3: PowerState.ON, 4: PowerState.OFF, 6: PowerState.OFF,
           7: PowerState.OFF, 0: PowerState.UNKNOWN}
_WANTED = {"os-start": PowerState.ON, "os-stop": PowerState.OFF}


class NovaSettings(DriverSettings):
    """MAAS ``nova`` power parameters (plus the Keystone v3 domains, default ``Default``)."""

    os_authurl: str = param(description="Keystone URL, e.g. http://keystone:5000 (with or without /v3)")
    os_tenantname: str = param(description="Project (tenant) name the token is scoped to")
    os_username: str = param(description="OpenStack user name")
    os_password: SecretStr = param(description="OpenStack password", secret=True)
    nova_id: str = param(description="The instance's UUID", scope="node")
    os_user_domain: str = param("Default", description="The user's domain name (Keystone v3)")
    os_project_domain: str = param("Default", description="The project's domain name (Keystone v3)")
    os_verify_ssl: bool = param(True, description="Verify the TLS certificates of Keystone and Nova")

    @field_validator("os_authurl")
    @classmethod
    def _check_url(cls, value: str) -> str:
        base_url(value, allow_path=True)
        return value

    @field_validator("nova_id", "os_tenantname", "os_username")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value

    @property
    def keystone(self) -> str:
        """The Keystone base URL, without ``/v3``."""
        return base_url(self.os_authurl, allow_path=True)[0].removesuffix("/v3")


def _mapping(value: Any) -> dict[str, Any]:
    """``value`` if the device sent a JSON object there, else ``{}`` (garbage replies)."""
    return value if isinstance(value, dict) else {}


@register
class NovaDriver(PowerDriver):
    """Power a Nova instance. Raises only :mod:`drivers.errors`."""

    power_type = "nova"
    description = "OpenStack Nova"
    settings_model = NovaSettings
    capabilities = Capabilities(power_query=True, detailed_errors=True)

    settings: NovaSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._client: HttpClient | None = None
        self._token = ""
        self._compute = ""

    def bmc_key(self) -> str:
        """One key per cloud and project: Nova takes many calls at once, but a project's
        API rate limit is shared."""
        return f"nova:{self.settings.keystone}:{self.settings.os_tenantname}"

    def query(self) -> PowerState:
        """``OS-EXT-STS:power_state`` of the instance. Raises :class:`AuthError`,
        :class:`NotFoundError`, :class:`BusyError`, :class:`UnreachableError`,
        :class:`CallTimeoutError`, :class:`DeviceError`."""
        return _STATES.get(self._server().get("OS-EXT-STS:power_state"), PowerState.UNKNOWN)  # type: ignore[arg-type]

    def power_on(self) -> None:
        """``os-start``; a running instance is left alone. Raises like :meth:`query`."""
        self._action("os-start", None)

    def power_off(self, soft: bool = False) -> None:
        """``os-stop`` (Nova has one stop: a clean shutdown with the guest's timeout, then
        off). Raises like :meth:`query`."""
        self._action("os-stop", None)

    def power_cycle(self) -> None:
        """``reboot`` type HARD. Raises like :meth:`query`."""
        self._action("reboot", {"type": "HARD"})

    def close(self) -> None:
        """Forget the token and close the HTTP session. Never raises."""
        client, self._client = self._client, None
        self._token = self._compute = ""
        if client is not None:
            client.close()

    # -- helpers --------------------------------------------------------------------

    def _where(self) -> str:
        return f"nova {self.settings.keystone} instance {self.settings.nova_id}"

    def _http(self) -> HttpClient:
        if self._client is None:
            s = self.settings
            self._client = HttpClient(s.keystone, where=self._where(), timeout=self.timeout,
                                      verify_ssl=s.os_verify_ssl, secrets=(secret_value(s.os_password),))
        return self._client

    def _login(self) -> None:
        s = self.settings
        client = self._http()
        body = {"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": s.os_username, "domain": {"name": s.os_user_domain},
                "password": secret_value(s.os_password)}}},
            "scope": {"project": {"name": s.os_tenantname, "domain": {"name": s.os_project_domain}}},
        }}
        reply = client.post("/v3/auth/tokens", action="keystone login", json=body)
        token = reply.headers.get("X-Subject-Token", "")
        if not token:
            raise DeviceError(f"{self._where()}: keystone login: no X-Subject-Token in the reply")
        client.secrets.append(token)
        catalog = _mapping(_mapping(client.json(reply, "keystone login")).get("token")).get("catalog")
        for service in map(_mapping, catalog if isinstance(catalog, list) else []):
            if service.get("type") != "compute":
                continue
            endpoints = service.get("endpoints")
            for endpoint in map(_mapping, endpoints if isinstance(endpoints, list) else []):
                if endpoint.get("interface") == "public" and endpoint.get("url"):
                    self._token, self._compute = token, str(endpoint["url"]).rstrip("/")
                    return
        raise DeviceError(f"{self._where()}: the service catalog has no public compute endpoint")

    def _call(self, method: str, path: str, *, action: str, json: Any = None,
              allow: tuple[int, ...] = ()) -> Any:
        """One compute API call with the token; a refused token is renewed once."""
        for attempt in (0, 1):
            if not self._token:
                self._login()
            try:
                return self._http().request(
                    method, self._compute + path, action=action, json=json, allow=allow,
                    headers={**bearer_headers(self._token), "X-Auth-Token": self._token,
                             "Accept": "application/json"})
            except AuthError:
                if attempt:
                    raise
                self._token = ""
        raise AssertionError("unreachable")  # pragma: no cover

    def _server(self) -> dict[str, Any]:
        path = "/servers/" + quote(self.settings.nova_id, safe="")
        try:
            reply = self._call("GET", path, action="get server")
        except NotFoundError:
            raise NotFoundError(f"{self._where()}: no such instance") from None
        server = _mapping(self._http().json(reply, "get server")).get("server")
        if not isinstance(server, dict):
            raise DeviceError(f"{self._where()}: get server: no server in the reply")
        return server

    def _action(self, name: str, value: Any) -> None:
        path = "/servers/" + quote(self.settings.nova_id, safe="") + "/action"
        try:
            reply = self._call("POST", path, action=name, json={name: value}, allow=(409,))
        except NotFoundError:
            raise NotFoundError(f"{self._where()}: no such instance") from None
        if reply.status_code != 409:
            return
        # Conflict: already in the wanted state (fine), a task under way (busy), or stuck.
        server = self._server()
        power = _STATES.get(server.get("OS-EXT-STS:power_state"), PowerState.UNKNOWN)  # type: ignore[arg-type]
        if _WANTED.get(name) is power and not server.get("OS-EXT-STS:task_state"):
            return
        task, vm_state = server.get("OS-EXT-STS:task_state"), server.get("OS-EXT-STS:vm_state")
        error: type[PowerError] = BusyError if task else DeviceError
        raise error(f"{self._where()}: {name} refused (HTTP 409): vm_state {vm_state}, task_state {task}",
                    status=409, vm_state=vm_state, task_state=task)
