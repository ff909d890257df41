"""``ucsm``: Cisco UCS Manager, through its XML API at ``<power_address>/nuova``.

Every call is one XML document POSTed to ``/nuova``; the reply is the same element with
``response="yes"`` and, on failure, ``errorCode`` / ``errorDescr``. One operation is:

1. ``aaaLogin inName inPassword`` -> ``outCookie``;
2. ``configResolveClass classId=computeItem`` filtered on ``uuid`` -> the server
   (``computeBlade`` or ``computeRackUnit``) with ``operPower`` and ``assignedToDn`` (its
   service profile);
3. for power: ``configResolveChildren`` of the service profile, ``classId=lsPower`` ->
   the power object's dn, then ``configConfMo`` of ``lsPower state=admin-up`` (on),
   ``admin-down`` (off), ``soft-shut-down`` (soft off) or ``cycle-immediate`` (cycle);
4. ``aaaLogout inCookie`` - always, even after an error: the manager has few cookies.

Errors: ``errorCode`` 551 (authentication failed) -> ``auth_failed``; 572 (user reached
the maximum session limit) and 552 (authorization required: the cookie was refused)
-> ``busy``; no server with that UUID -> ``not_found``; a server without a service
profile, or any other ``errorCode`` -> ``device_error``.

Next boot to PXE is not offered: UCS has no one-time boot override in this API, and
changing a boot policy (as MAAS does once, at enlistment, moving ``lsbootLan`` first)
changes every server that shares it. Probe lists every server with UUID and MACs
(``adaptorUnit`` -> ``adaptorHostEthIf``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from xml.etree.ElementTree import Element, SubElement, tostring

from pydantic import SecretStr, field_validator

from .base import (
    Capabilities,
    DriverSettings,
    PowerDriver,
    PowerState,
    ProbedMachine,
    param,
    secret_value,
)
from .errors import AuthError, BusyError, DeviceError, NotFoundError, PowerError
from .httpclient import HttpClient, base_url, local_name
from .registry import register

_POWER = {"on": PowerState.ON, "off": PowerState.OFF}
_BUSY_CODES = {"552", "572"}


def _address(value: str) -> tuple[str, str]:
    text = re.sub(r"/nuova/?$", "", value.strip())
    return base_url(text, allow_path=True)


class UcsmSettings(DriverSettings):
    """MAAS ``ucsm`` power parameters."""

    power_address: str = param(description="UCS Manager URL, e.g. https://ucsm (the API is at /nuova)")
    power_user: str = param(description="UCS Manager user")
    power_pass: SecretStr = param(description="UCS Manager password", secret=True)
    uuid: str = param(description="The server's UUID", scope="node")
    power_verify_ssl: bool = param(False, description="Verify the manager's TLS certificate (MAAS does not)")

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        _address(value)
        return value

    @field_validator("uuid")
    @classmethod
    def _check_uuid(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9A-Fa-f-]{8,64}", value or ""):
            raise ValueError("uuid must be a UUID")
        return value


class _Session:
    """One login (cookie) to the manager; always logged out by :meth:`close`."""

    def __init__(self, client: HttpClient, user: str, password: str) -> None:
        self.client = client
        self.cookie = ""
        self.cookie = self.call("aaaLogin", {"inName": user, "inPassword": password},
                                action="login").get("outCookie", "")
        if not self.cookie:
            raise DeviceError(f"{client.where}: login returned no cookie")

    def call(self, method: str, attrs: dict[str, str], children: Iterable[Element] = (),
             *, action: str) -> Element:
        root = Element(method, attrs if method == "aaaLogin" else {"cookie": self.cookie, **attrs})
        root.extend(children)
        reply = self.client.post("/nuova", action=action, data=tostring(root),
                                 headers={"Content-Type": "application/xml"})
        doc = self.client.xml(reply, action)
        code = doc.get("errorCode")
        if code is not None:
            detail = self.client.scrub(doc.get("errorDescr", ""), limit=80)
            message = f"{self.client.where}: {action}: error {code} ({detail})"
            if code == "551":
                raise AuthError(message, ucs_error=code)
            if code in _BUSY_CODES:
                raise BusyError(message, ucs_error=code)
            raise DeviceError(message, ucs_error=code)
        return doc

    def resolve_class(self, class_id: str, filters: list[Element] | None = None) -> list[Element]:
        in_filter = Element("inFilter")
        in_filter.extend(filters or [])
        doc = self.call("configResolveClass", {"classId": class_id, "inHierarchical": "false"},
                        [in_filter], action=f"resolve {class_id}")
        return _out(doc)

    def children(self, dn: str, class_id: str) -> list[Element]:
        doc = self.call("configResolveChildren", {"inDn": dn, "classId": class_id,
                                                  "inHierarchical": "false"},
                        action=f"resolve {class_id}")
        return [e for e in _out(doc) if local_name(e.tag) == class_id]

    def close(self) -> None:
        if self.cookie:
            try:
                self.client.post("/nuova", action="logout",
                                 data=tostring(Element("aaaLogout", {"inCookie": self.cookie})),
                                 headers={"Content-Type": "application/xml"})
            except PowerError:
                pass
            self.cookie = ""


def _out(doc: Element) -> list[Element]:
    for child in doc:
        if local_name(child.tag) == "outConfigs":
            return list(child)
    return []


@register
class UcsmDriver(PowerDriver):
    """Power a server through Cisco UCS Manager. Raises only :mod:`drivers.errors`."""

    power_type = "ucsm"
    description = "Cisco UCS Manager"
    settings_model = UcsmSettings
    capabilities = Capabilities(power_query=True, chassis_probe=True, detailed_errors=True)

    settings: UcsmSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._client: HttpClient | None = None

    def bmc_key(self) -> str:
        return "ucsm:" + _address(self.settings.power_address)[1]

    def power_on(self) -> None:
        """``lsPower state=admin-up`` (never a cycle, even for a running server). Raises
        the transient errors, :class:`AuthError`, :class:`NotFoundError`,
        :class:`DeviceError`."""
        self._set_power("admin-up", "power on")

    def power_off(self, soft: bool = False) -> None:
        """``admin-down`` (``soft-shut-down`` when ``soft``). Raises like :meth:`power_on`."""
        self._set_power("soft-shut-down" if soft else "admin-down", "power off")

    def power_cycle(self) -> None:
        """``cycle-immediate``. Raises like :meth:`power_on`."""
        self._set_power("cycle-immediate", "power cycle")

    def query(self) -> PowerState:
        """The server's ``operPower``: on / off, anything else unknown. Raises like
        :meth:`power_on`."""
        session = self._login()
        try:
            return _POWER.get(self._server(session).get("operPower", ""), PowerState.UNKNOWN)
        finally:
            session.close()

    @classmethod
    def probe_chassis(
        cls, params: Mapping[str, Any], *, timeout: float = 10.0
    ) -> list[ProbedMachine]:
        """Every ``computeItem`` with its UUID, power and MACs. Raises
        :class:`SettingsError` and like :meth:`power_on`."""
        driver = cls(cls.validate_chassis(params), timeout=timeout)
        session = driver._login()
        try:
            machines = []
            for server in session.resolve_class("computeItem"):
                uuid, dn = server.get("uuid", ""), server.get("dn", "")
                if not uuid or not dn:
                    continue
                macs = []
                for adaptor in session.children(dn, "adaptorUnit"):
                    for nic in session.children(adaptor.get("dn", ""), "adaptorHostEthIf"):
                        if nic.get("mac"):
                            macs.append(nic.get("mac", "").lower())
                machines.append(ProbedMachine(
                    name=re.sub(r"[^a-z0-9-]+", "-", dn.removeprefix("sys/").lower()).strip("-"),
                    power_parameters={"uuid": uuid},
                    power=_POWER.get(server.get("operPower", ""), PowerState.UNKNOWN),
                    description=" ".join(filter(None, (server.get("model"), server.get("serial"), dn))),
                    mac_addresses=tuple(macs),
                ))
            return machines
        finally:
            session.close()
            driver.close()

    def close(self) -> None:
        """Close the HTTP session (every operation has already logged out). Never raises."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- helpers --------------------------------------------------------------------

    def _where(self) -> str:
        uuid = getattr(self.settings, "uuid", None)
        return f"ucsm {_address(self.settings.power_address)[1]}" + (f" server {uuid}" if uuid else "")

    def _login(self) -> _Session:
        if self._client is None:
            s = self.settings
            self._client = HttpClient(
                _address(s.power_address)[0], where=self._where(), timeout=self.timeout,
                verify_ssl=s.power_verify_ssl, secrets=(secret_value(s.power_pass),),
            )
        return _Session(self._client, self.settings.power_user, secret_value(self.settings.power_pass))

    def _server(self, session: _Session) -> Element:
        uuid = self.settings.uuid
        match = Element("eq", {"class": "computeItem", "property": "uuid", "value": uuid})
        servers = session.resolve_class("computeItem", [match])
        servers = [s for s in servers if s.get("uuid", "").lower() == uuid.lower()]
        if not servers:
            raise NotFoundError(f"{self._where()}: no server with that UUID")
        return servers[0]

    def _set_power(self, state: str, action: str) -> None:
        session = self._login()
        try:
            server = self._server(session)
            profile = server.get("assignedToDn", "")
            if not profile:
                raise DeviceError(f"{self._where()}: the server has no service profile")
            powers = session.children(profile, "lsPower")
            if not powers or not powers[0].get("dn"):
                raise DeviceError(f"{self._where()}: the service profile has no lsPower")
            dn = powers[0].get("dn", "")
            in_config = Element("inConfig")
            SubElement(in_config, "lsPower", {"dn": dn, "state": state})
            session.call("configConfMo", {"dn": dn, "inHierarchical": "false"}, [in_config],
                         action=action)
        finally:
            session.close()
