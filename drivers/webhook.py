"""``webhook``: MAAS's generic HTTP power type.

Wire (as MAAS does it): ``POST power_on_uri`` / ``POST power_off_uri`` with no body;
``GET power_query_uri`` and search its body with ``power_on_regex`` (default
``status.*\\:.*running``) then ``power_off_regex`` (default ``status.*\\:.*stopped``):
the first that matches gives on / off, neither gives ``unknown``. Every request carries
``Accept: application/json``, a ``System_Id`` header when ``system_id`` is set, and
``Authorization: Bearer <power_token>`` if a token is given, else HTTP basic auth when
``power_user`` and ``power_pass`` are. A 404 on a URI without a trailing ``/`` is tried
once more with one (as MAAS does: some services need it).

- ``power_query_uri`` is required, as in MAAS: the driver declares ``power_query``.
- Cycle is ``POST power_off_uri`` then ``POST power_on_uri`` (MAAS has no webhook
  reset). A soft off is the same off request: the service decides what "off" means.
- There is no next-boot (PXE) control: MAAS's webhook has none.
- ``power_verify_ssl`` takes MAAS's ``y`` / ``n`` (or a boolean); default ``n``, as MAAS.
- ``bmc_key`` is the query URI's scheme, host, port and path (never its query string,
  which may hold a token): nodes sharing one endpoint are served one call at a time.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr, field_validator

from .base import Capabilities, DriverSettings, PowerDriver, PowerState, param, secret_value
from .errors import NotFoundError
from .httpclient import HttpAuth, HttpClient, bearer_headers
from .registry import register

DEFAULT_ON_REGEX = r"status.*\:.*running"
DEFAULT_OFF_REGEX = r"status.*\:.*stopped"


def _check_uri(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value.strip()


def _origin(uri: str, with_path: bool = False) -> str:
    """``scheme://host:port`` (and the path) of a URI: safe to print (no query, no user)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{host}:{port}" + (parts.path if with_path else "")


def yes_no(value: Any) -> Any:
    """MAAS's ``y`` / ``n`` choice (or yes / no / true / false) as a boolean."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("y", "yes", "true", "1"):
            return True
        if text in ("n", "no", "false", "0", ""):
            return False
    return value


class WebhookSettings(DriverSettings):
    """MAAS ``webhook`` power parameters (plus powerq's ``system_id``)."""

    power_on_uri: str = param(description="URI to POST to power the node on", scope="node")
    power_off_uri: str = param(description="URI to POST to power the node off", scope="node")
    power_query_uri: str = param(description="URI to GET the node's power status", scope="node")
    power_on_regex: str = param(
        DEFAULT_ON_REGEX, description="Regex that, found in the query reply, means on", scope="node"
    )
    power_off_regex: str = param(
        DEFAULT_OFF_REGEX, description="Regex that, found in the query reply, means off", scope="node"
    )
    power_user: str = param("", description="User for HTTP basic authentication")
    power_pass: SecretStr | None = param(
        None, description="Password for HTTP basic authentication", secret=True
    )
    power_token: SecretStr | None = param(
        None, description="Bearer token, used in place of power_user / power_pass", secret=True
    )
    power_verify_ssl: bool = param(
        False, description="Verify TLS certificates with the system CAs: y / n (default n, as MAAS)"
    )
    system_id: str | None = param(
        None, description="Sent as the System_Id header (MAAS sends the machine's id)", scope="node"
    )

    @field_validator("power_on_uri", "power_off_uri", "power_query_uri")
    @classmethod
    def _check_uris(cls, value: str) -> str:
        return _check_uri(value)

    @field_validator("power_on_regex", "power_off_regex")
    @classmethod
    def _check_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"is not a valid regular expression ({exc.msg})") from None
        return value

    @field_validator("power_verify_ssl", mode="before")
    @classmethod
    def _yes_no(cls, value: Any) -> Any:
        return yes_no(value)


@register
class WebhookDriver(PowerDriver):
    """Power through a generic HTTP service. Every method raises only
    :mod:`drivers.errors` (HTTP statuses mapped as in :mod:`drivers.httpclient`)."""

    power_type = "webhook"
    description = "Webhook"
    settings_model = WebhookSettings
    capabilities = Capabilities(power_query=True, detailed_errors=True)

    settings: WebhookSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._client: HttpClient | None = None

    def bmc_key(self) -> str:
        return f"webhook:{_origin(self.settings.power_query_uri, with_path=True)}"

    def power_on(self) -> None:
        """POST ``power_on_uri``. Raises the transient errors, :class:`AuthError`,
        :class:`NotFoundError`, :class:`DeviceError`."""
        self._send("POST", self.settings.power_on_uri, "power on")

    def power_off(self, soft: bool = False) -> None:
        """POST ``power_off_uri`` (``soft`` makes no difference). Raises like
        :meth:`power_on`."""
        self._send("POST", self.settings.power_off_uri, "power off")

    def power_cycle(self) -> None:
        """POST ``power_off_uri`` then ``power_on_uri``. Raises like :meth:`power_on`."""
        self._send("POST", self.settings.power_off_uri, "power cycle (off)")
        self._send("POST", self.settings.power_on_uri, "power cycle (on)")

    def query(self) -> PowerState:
        """GET ``power_query_uri``; on / off by the regexes, else ``UNKNOWN``. Raises
        like :meth:`power_on`."""
        body = self._send("GET", self.settings.power_query_uri, "query")
        if re.search(self.settings.power_on_regex, body):
            return PowerState.ON
        if re.search(self.settings.power_off_regex, body):
            return PowerState.OFF
        return PowerState.UNKNOWN

    def close(self) -> None:
        """Close the HTTP session. Never raises."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- helpers --------------------------------------------------------------------

    def _http(self) -> HttpClient:
        if self._client is None:
            s = self.settings
            token = secret_value(s.power_token)
            password = secret_value(s.power_pass)
            headers = {"Accept": "application/json", "User-Agent": "powerq"}
            if s.system_id:
                headers["System_Id"] = s.system_id
            auth = None
            if token:
                headers.update(bearer_headers(token))
            elif s.power_user and password:
                auth = HttpAuth(s.power_user, password)
            self._client = HttpClient(
                _origin(s.power_query_uri), where=f"webhook {_origin(s.power_query_uri)}",
                timeout=self.timeout, verify_ssl=s.power_verify_ssl, auth=auth,
                headers=headers, secrets=(token, password),
            )
        return self._client

    def _send(self, method: str, uri: str, action: str) -> str:
        client = self._http()
        response = client.request(method, uri, action=action, allow=(404,))
        if response.status_code == 404:
            if not urlsplit(uri).path.endswith("/"):
                parts = urlsplit(uri)
                retry = parts._replace(path=parts.path + "/").geturl()
                response = client.request(method, retry, action=action, allow=(404,))
            if response.status_code == 404:
                raise NotFoundError(f"{client.where}: {action}: the URI was not found (HTTP 404)")
        return response.text
