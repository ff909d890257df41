"""``amt``: Intel Active Management Technology, through WS-Management (SOAP 1.2 over HTTP).

The AMT firmware serves WS-Management at ``http://<address>:16992/wsman`` (TLS on 16993,
``power_protocol=https``) with HTTP digest authentication. Every call is one SOAP
envelope POSTed there (built here with :mod:`xml.etree`), naming an action, a resource
URI and a selector set:

- query: WS-Transfer ``Get`` of ``CIM_AssociatedPowerManagementService`` -> ``PowerState``
  (2 on; 6, 8, 12, 13 off; the sleep / transitional states 3, 4, 5, 7, 9, 10, 14, 15, 16
  read as on, as MAAS reads them);
- power: ``CIM_PowerManagementService.RequestPowerStateChange`` with ``PowerState`` 2 (on),
  8 (off, hard), 12 (off, soft graceful) or 10 (master bus reset: the cycle MAAS uses);
- next boot: ``Get`` / ``Put`` of ``AMT_BootSettingData`` (redirection and BIOS options
  cleared), ``CIM_BootConfigSetting.ChangeBootOrder`` with the source
  ``Intel(r) AMT: Force PXE Boot`` (or hard-drive / CD-DVD), then
  ``CIM_BootService.SetBootConfigRole`` role 1 (IsNextSingleUse): AMT boot overrides are
  one-time only.

Errors: HTTP 401 -> ``auth_failed``; a WS-Man fault (HTTP 400 / 500 with a SOAP ``Fault``):
``wsman:AccessDenied`` -> ``auth_failed``, ``wsa:EndpointUnavailable``,
``wsman:Concurrency``, ``wsman:QuotaLimit`` -> ``busy``, ``wsman:TimedOut`` -> ``timeout``,
``wsa:DestinationUnreachable`` / ``wsman:InvalidSelectors`` -> ``not_found``, others ->
``device_error``; HTTP 503 -> ``busy``. Method ``ReturnValue`` codes: see ``_POWER_RETURN``
and ``_BOOT_RETURN``.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Literal
from xml.etree.ElementTree import Element, SubElement, tostring

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
from .errors import (
    AuthError,
    BusyError,
    CallTimeoutError,
    DeviceError,
    NotFoundError,
    PowerError,
    UnsupportedError,
)
from .httpclient import (
    HttpAuth,
    HttpClient,
    base_url,
    error_for_status,
    local_name,
    parse_xml,
    xml_find,
    xml_text,
)
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    import requests

SOAP = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
WSMAN = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
CIM = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/"
AMT = "http://intel.com/wbem/wscim/1/amt-schema/1/"
ANONYMOUS = WSA + "/role/anonymous"
T_GET = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Get"
T_PUT = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Put"

R_ASSOC_PMS = CIM + "CIM_AssociatedPowerManagementService"
R_PMS = CIM + "CIM_PowerManagementService"
R_COMPUTER = CIM + "CIM_ComputerSystem"
R_BOOT_DATA = AMT + "AMT_BootSettingData"
R_BOOT_CONFIG = CIM + "CIM_BootConfigSetting"
R_BOOT_SOURCE = CIM + "CIM_BootSourceSetting"
R_BOOT_SERVICE = CIM + "CIM_BootService"

PMS_SELECTORS = {
    "CreationClassName": "CIM_PowerManagementService",
    "Name": "Intel(r) AMT Power Management Service",
    "SystemCreationClassName": "CIM_ComputerSystem",
    "SystemName": "Intel(r) AMT",
}
BOOT_SERVICE_SELECTORS = {
    "CreationClassName": "CIM_BootService",
    "Name": "Intel(r) AMT Boot Service",
    "SystemCreationClassName": "CIM_ComputerSystem",
    "SystemName": "Intel(r) AMT",
}
BOOT_CONFIG_ID = "Intel(r) AMT: Boot Configuration 0"
BOOT_DATA_ID = "Intel(r) AMT:BootSettingData 0"
BOOT_SOURCES = {
    BootDevice.PXE: "Intel(r) AMT: Force PXE Boot",
    BootDevice.DISK: "Intel(r) AMT: Force Hard-drive Boot",
    BootDevice.CDROM: "Intel(r) AMT: Force CD/DVD Boot",
}
# AMT_BootSettingData options that would divert the next boot from the chosen source.
BOOT_DATA_CLEARED = ("BIOSPause", "BIOSSetup", "ConfigurationDataReset", "ReflashBIOS",
                     "UseIDER", "UseSOL", "UseSafeMode", "UserPasswordBypass", "SecureErase")

POWER_ON, POWER_OFF_HARD, POWER_RESET, POWER_OFF_SOFT = 2, 8, 10, 12
_ON_STATES = {2, 3, 4, 5, 7, 9, 10, 14, 15, 16}
_OFF_STATES = {6, 8, 12, 13}

# RequestPowerStateChange ReturnValue (CIM_PowerManagementService ValueMap).
_POWER_RETURN: dict[int, tuple[type[PowerError] | None, str]] = {
    0: (None, "completed"), 4096: (None, "job started"),
    1: (UnsupportedError, "not supported"), 2: (DeviceError, "unknown or unspecified error"),
    3: (CallTimeoutError, "cannot complete within the timeout period"), 4: (DeviceError, "failed"),
    5: (DeviceError, "invalid parameter"), 6: (BusyError, "in use"),
    4097: (DeviceError, "invalid state transition"),
    4098: (DeviceError, "timeout parameter not supported"), 4099: (BusyError, "busy"),
}
# ChangeBootOrder / SetBootConfigRole ReturnValue (CIM_BootConfigSetting, CIM_BootService).
_BOOT_RETURN: dict[int, tuple[type[PowerError] | None, str]] = {
    0: (None, "completed"), 1: (UnsupportedError, "not supported"),
    2: (DeviceError, "unknown or unspecified error"), 3: (BusyError, "busy"),
    4: (DeviceError, "invalid reference"), 5: (DeviceError, "invalid parameter"),
    6: (AuthError, "access denied"),
}
_FAULTS: dict[str, type[PowerError]] = {
    "AccessDenied": AuthError,
    "EndpointUnavailable": BusyError, "Concurrency": BusyError, "QuotaLimit": BusyError,
    "TimedOut": CallTimeoutError,
    "DestinationUnreachable": NotFoundError, "InvalidSelectors": NotFoundError,
    "ActionNotSupported": UnsupportedError,
}


class AmtSettings(DriverSettings):
    """MAAS ``amt`` power parameters (``power_user`` is fixed to ``admin`` in MAAS)."""

    power_address: str = param(description="AMT address: host or IP (port 16992 / 16993 by default)")
    power_user: str = param("admin", description="AMT user (default admin)")
    power_pass: SecretStr = param(description="AMT password", secret=True)
    power_protocol: Literal["http", "https"] = param(
        "http", description="http (port 16992, as MAAS) or https (TLS, port 16993)",
        choices=("http", "https"))
    power_verify_ssl: bool = param(False, description="Verify the AMT TLS certificate (https only)")

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        base_url(value, default_scheme="http")
        return value

    @property
    def address(self) -> tuple[str, str]:
        """(base URL, identity) with the AMT port of the protocol unless the address names one."""
        port = 16993 if self.power_protocol == "https" else 16992
        return base_url(self.power_address, default_scheme=self.power_protocol, default_port=port)


class WsMan:
    """A WS-Management client over one :class:`HttpClient` (digest auth)."""

    def __init__(self, client: HttpClient) -> None:
        self.client = client

    def call(self, action: str, resource: str, selectors: dict[str, str] | None = None,
             body: Element | None = None, *, what: str) -> Element:
        """Send one envelope; return the reply's ``Body``. Raises the taxonomy errors
        (faults translated, see the module docstring)."""
        env = Element(f"{{{SOAP}}}Envelope")
        header = SubElement(env, f"{{{SOAP}}}Header")
        SubElement(header, f"{{{WSA}}}Action", {f"{{{SOAP}}}mustUnderstand": "true"}).text = action
        SubElement(header, f"{{{WSA}}}To", {f"{{{SOAP}}}mustUnderstand": "true"}).text = \
            self.client.url("/wsman")
        SubElement(header, f"{{{WSMAN}}}ResourceURI", {f"{{{SOAP}}}mustUnderstand": "true"}).text = resource
        SubElement(header, f"{{{WSA}}}MessageID", {f"{{{SOAP}}}mustUnderstand": "true"}).text = \
            f"uuid:{uuid.uuid4()}"
        reply_to = SubElement(header, f"{{{WSA}}}ReplyTo")
        SubElement(reply_to, f"{{{WSA}}}Address").text = ANONYMOUS
        SubElement(header, f"{{{WSMAN}}}OperationTimeout").text = f"PT{max(1, int(self.client.timeout))}S"
        if selectors:
            header.append(selector_set(selectors))
        body_elem = SubElement(env, f"{{{SOAP}}}Body")
        if body is not None:
            body_elem.append(body)
        reply = self.client.post(
            "/wsman", action=what, data=tostring(env, xml_declaration=True, encoding="utf-8"),
            headers={"Content-Type": "application/soap+xml;charset=UTF-8"}, allow=(400, 500))
        if reply.status_code in (400, 500):
            doc = _parse_or_status(self.client, reply, what)
        else:
            doc = self.client.xml(reply, what)
        fault = xml_find(doc, "Fault")
        if fault is not None:
            raise self._fault(fault, what)
        found = xml_find(doc, "Body")
        if found is None:
            raise DeviceError(f"{self.client.where}: {what}: the reply has no SOAP Body")
        return found

    def invoke(self, resource: str, method: str, selectors: dict[str, str], body: Element,
               returns: dict[int, tuple[type[PowerError] | None, str]], *, what: str) -> int:
        """Invoke ``method``; translate a non-success ``ReturnValue`` with ``returns``."""
        reply = self.call(f"{resource}/{method}", resource, selectors, body, what=what)
        text = xml_text(reply, "ReturnValue")
        try:
            code = int(text or "")
        except ValueError:
            raise DeviceError(f"{self.client.where}: {what}: no ReturnValue in the reply") from None
        cls, meaning = returns.get(code, (DeviceError, "unknown return value"))
        if cls is not None:
            raise cls(f"{self.client.where}: {what}: ReturnValue {code} ({meaning})", return_value=code)
        return code

    def _fault(self, fault: Element, what: str) -> PowerError:
        subcode = ""
        for elem in fault.iter():
            if local_name(elem.tag) == "Subcode":
                subcode = (xml_text(elem, "Value") or "").rsplit(":", 1)[-1]
                break
        reason = self.client.scrub(" ".join((xml_text(fault, "Text") or "").split()), limit=100)
        cls = _FAULTS.get(subcode, DeviceError)
        return cls(f"{self.client.where}: {what}: WS-Management fault {subcode or '?'} ({reason})",
                   fault=subcode)


def _parse_or_status(client: HttpClient, reply: requests.Response, what: str) -> Element:
    """A 400 / 500 reply: the SOAP fault it carries, or the status' error."""
    try:
        return parse_xml(reply.content, client.where, what)
    except DeviceError:
        raise error_for_status(reply.status_code, client.where, what, client.detail(reply)) from None


def selector_set(selectors: dict[str, str]) -> Element:
    """A ``wsman:SelectorSet`` element."""
    elem = Element(f"{{{WSMAN}}}SelectorSet")
    for name, value in selectors.items():
        SubElement(elem, f"{{{WSMAN}}}Selector", {"Name": name}).text = value
    return elem


def endpoint_ref(parent: Element, tag: str, resource: str, selectors: dict[str, str]) -> Element:
    """An EPR (``Address`` + ``ReferenceParameters``) as child ``tag`` of ``parent``."""
    ref = SubElement(parent, tag)
    SubElement(ref, f"{{{WSA}}}Address").text = ANONYMOUS
    params = SubElement(ref, f"{{{WSA}}}ReferenceParameters")
    SubElement(params, f"{{{WSMAN}}}ResourceURI").text = resource
    params.append(selector_set(selectors))
    return ref


@register
class AmtDriver(PowerDriver):
    """Power a machine through its Intel AMT firmware. Raises only :mod:`drivers.errors`."""

    power_type = "amt"
    description = "Intel AMT"
    settings_model = AmtSettings
    capabilities = Capabilities(power_query=True, pxe_next_boot=True, detailed_errors=True)

    settings: AmtSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._wsman: WsMan | None = None

    def bmc_key(self) -> str:
        return "amt:" + self.settings.address[1]

    def query(self) -> PowerState:
        """``PowerState`` of ``CIM_AssociatedPowerManagementService``. Raises
        :class:`AuthError`, :class:`BusyError`, :class:`UnreachableError`,
        :class:`CallTimeoutError`, :class:`DeviceError`."""
        body = self._ws().call(T_GET, R_ASSOC_PMS, what="power query")
        text = xml_text(body, "PowerState")
        try:
            state = int(text or "")
        except ValueError:
            raise DeviceError(f"{self._where()}: power query: no PowerState in the reply") from None
        if state in _ON_STATES:
            return PowerState.ON
        if state in _OFF_STATES:
            return PowerState.OFF
        return PowerState.UNKNOWN

    def power_on(self) -> None:
        """``RequestPowerStateChange`` 2. AMT refuses it for a machine already on (never a
        reboot); that refusal is success when a query then reads on. Raises like
        :meth:`query`, and :class:`UnsupportedError`."""
        try:
            self._power(POWER_ON, "power on")
        except DeviceError:
            if self.query() is not PowerState.ON:
                raise

    def power_off(self, soft: bool = False) -> None:
        """``RequestPowerStateChange`` 8 (hard) or 12 (soft graceful). Raises like :meth:`power_on`."""
        try:
            self._power(POWER_OFF_SOFT if soft else POWER_OFF_HARD, "power off")
        except DeviceError:
            if self.query() is not PowerState.OFF:
                raise

    def power_cycle(self) -> None:
        """``RequestPowerStateChange`` 10 (master bus reset, as MAAS); a machine that is off
        (AMT refuses the reset) is powered on instead. Raises like :meth:`power_on`."""
        try:
            self._power(POWER_RESET, "power cycle")
        except DeviceError:
            if self.query() is not PowerState.OFF:
                raise
            self._power(POWER_ON, "power on")

    def set_boot_device(self, device: BootDevice, *, efi: bool = False, persistent: bool = False) -> None:
        """One-time boot from ``device`` (pxe, disk, cdrom): ``AMT_BootSettingData`` cleared,
        ``ChangeBootOrder``, ``SetBootConfigRole`` 1. Raises :class:`UnsupportedError`
        (persistent, bios) and like :meth:`query`."""
        source = BOOT_SOURCES.get(device)
        if source is None:
            raise UnsupportedError(f"amt cannot boot from {device}")
        if persistent:
            raise UnsupportedError("amt boot overrides are one-time only")
        ws = self._ws()
        self._clear_boot_options(ws)
        change = Element(f"{{{R_BOOT_CONFIG}}}ChangeBootOrder_INPUT")
        endpoint_ref(change, f"{{{R_BOOT_CONFIG}}}Source", R_BOOT_SOURCE, {"InstanceID": source})
        ws.invoke(R_BOOT_CONFIG, "ChangeBootOrder", {"InstanceID": BOOT_CONFIG_ID}, change,
                  _BOOT_RETURN, what="change boot order")
        role = Element(f"{{{R_BOOT_SERVICE}}}SetBootConfigRole_INPUT")
        endpoint_ref(role, f"{{{R_BOOT_SERVICE}}}BootConfigSetting", R_BOOT_CONFIG,
                     {"InstanceID": BOOT_CONFIG_ID})
        SubElement(role, f"{{{R_BOOT_SERVICE}}}Role").text = "1"  # IsNextSingleUse
        ws.invoke(R_BOOT_SERVICE, "SetBootConfigRole", BOOT_SERVICE_SELECTORS, role,
                  _BOOT_RETURN, what="set boot config role")

    def close(self) -> None:
        """Close the HTTP session (WS-Man keeps no login). Never raises."""
        ws, self._wsman = self._wsman, None
        if ws is not None:
            ws.client.close()

    # -- helpers --------------------------------------------------------------------

    def _where(self) -> str:
        return f"amt {self.settings.address[1]}"

    def _ws(self) -> WsMan:
        if self._wsman is None:
            s = self.settings
            password = secret_value(s.power_pass)
            self._wsman = WsMan(HttpClient(
                s.address[0], where=self._where(), timeout=self.timeout,
                verify_ssl=s.power_verify_ssl, auth=HttpAuth(s.power_user, password, "digest"),
            ))
        return self._wsman

    def _power(self, state: int, what: str) -> None:
        body = Element(f"{{{R_PMS}}}RequestPowerStateChange_INPUT")
        SubElement(body, f"{{{R_PMS}}}PowerState").text = str(state)
        endpoint_ref(body, f"{{{R_PMS}}}ManagedElement", R_COMPUTER,
                     {"CreationClassName": "CIM_ComputerSystem", "Name": "ManagedSystem"})
        self._ws().invoke(R_PMS, "RequestPowerStateChange", PMS_SELECTORS, body, _POWER_RETURN, what=what)

    def _clear_boot_options(self, ws: WsMan) -> None:
        """Get ``AMT_BootSettingData`` and put it back with the options that would divert
        the next boot (IDE redirection, BIOS setup / pause, ...) switched off."""
        selectors = {"InstanceID": BOOT_DATA_ID}
        body = ws.call(T_GET, R_BOOT_DATA, selectors, what="read boot settings")
        data = next((e for e in body if local_name(e.tag) == "AMT_BootSettingData"), None)
        if data is None:
            raise DeviceError(f"{self._where()}: read boot settings: no AMT_BootSettingData")
        for child in data:
            if local_name(child.tag) in BOOT_DATA_CLEARED:
                child.text = "false"
        ws.call(T_PUT, R_BOOT_DATA, selectors, data, what="write boot settings")
