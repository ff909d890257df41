"""``virsh``: libvirt domains (virtual systems), through libvirt-python.

One node is one libvirt domain (``power_id``) on one hypervisor (``power_address``, a
libvirt URI such as ``qemu+ssh://user@host/system``, ``qemu:///system`` or
``test+unix:///default?socket=…``). All nodes on a hypervisor share its ``bmc_key``, so
the worker policy sends one call at a time to it.

Power mapping (``virsh domstate``):

========================================================= ===========
running, blocked, paused, in shutdown, pmsuspended         ``on``
shut off, crashed                                          ``off``
no state                                                   ``unknown``
========================================================= ===========

Next boot: libvirt has no one-time boot override. The boot order lives in the domain's
persistent definition (``<os><boot dev=…/>``), so :meth:`VirshDriver.set_boot_device`
rewrites that definition and it stays until changed again, whatever ``persistent`` says.
A "one-time" PXE boot is written as network first, disk second: when the PXE server has
nothing to offer (a deployed machine), the firmware falls through to the disk, which is
how MAAS drives libvirt VMs too. A changed definition only takes effect at the next cold
start, which is why :meth:`VirshDriver.power_cycle` destroys and starts a running domain
(instead of resetting it) when its pending boot order differs from the live one.

Authentication: ``power_pass`` answers libvirt's passphrase (and, with the URI's user
name, auth-name) credential requests through ``virConnectOpenAuth``; this covers SASL and
the libssh / libssh2 transports. Plain ``+ssh`` URIs run the ``ssh`` program, which needs a
key: it never asks libvirt for a password.

Errors, by libvirt error code (:data:`ERROR_CODES`): a refused password or SASL login is
``VIR_ERR_AUTH_FAILED`` (``auth_failed``). libvirt has no "busy" reply: a libvirtd at its
client limits (``max_clients``, ``max_anonymous_clients``, ``max_client_requests``) stops
accepting or reading, so the call waits and ends as the worker's ``timeout``, and a domain
whose state-change lock is held (qemu, not the test driver) answers
``VIR_ERR_OPERATION_TIMEOUT`` after waiting (``timeout``). So this driver never reports
``busy``.

Per-call time limits are the worker policy's job: libvirt calls have no timeout of their
own (libvirt's keepalive needs an event loop, which a worker does not run).
"""

from __future__ import annotations

import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

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
from .errors import (
    AuthError,
    CallTimeoutError,
    DeviceError,
    NotFoundError,
    PowerError,
    ToolMissingError,
    UnreachableError,
    UnsupportedError,
)
from .registry import register

# A libvirt URI's scheme: driver[+transport], e.g. qemu, qemu+ssh, test+unix, esx.
_SCHEME = re.compile(r"^[a-z][a-z0-9]*(\+(unix|ssh|tcp|tls|ext|libssh|libssh2))?$")


class VirshSettings(DriverSettings):
    """MAAS ``virsh`` power parameters."""

    power_address: str = param(
        description="libvirt URI of the hypervisor, e.g. qemu+ssh://user@host/system"
    )
    power_pass: SecretStr | None = param(
        None,
        description="Password / passphrase libvirt asks for while connecting (optional)",
        secret=True,
    )
    power_id: str = param(description="libvirt domain name of this node", scope="node")

    @field_validator("power_address")
    @classmethod
    def _check_uri(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a libvirt URI without spaces")
        try:
            parts = urlsplit(value)
        except ValueError:
            raise ValueError("is not a valid URI") from None
        if "://" not in value or not _SCHEME.match(parts.scheme):
            raise ValueError(
                "must be a libvirt URI with a scheme such as qemu+ssh://host/system, "
                "qemu:///system or test:///default"
            )
        if not parts.netloc and not parts.path:
            raise ValueError("names no host and no path")
        if parts.password is not None:
            raise ValueError("must not carry a password: put it in power_pass")
        return value

    @field_validator("power_id")
    @classmethod
    def _check_domain(cls, value: str) -> str:
        if not value:
            raise ValueError("must name a libvirt domain")
        if "/" in value or any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("is not a libvirt domain name")
        return value


# libvirt error code (name of the libvirt constant) -> taxonomy class. Looked up by
# name so that this module imports without libvirt. Codes not listed are DeviceError.
ERROR_CODES: dict[str, type[PowerError]] = {
    "VIR_ERR_AUTH_FAILED": AuthError,
    "VIR_ERR_AUTH_CANCELLED": AuthError,
    "VIR_ERR_AUTH_UNAVAILABLE": AuthError,
    "VIR_ERR_ACCESS_DENIED": AuthError,
    "VIR_ERR_OPERATION_DENIED": AuthError,
    "VIR_ERR_NO_DOMAIN": NotFoundError,
    "VIR_ERR_NO_CONNECT": UnreachableError,
    "VIR_ERR_SYSTEM_ERROR": UnreachableError,
    "VIR_ERR_RPC": UnreachableError,
    "VIR_ERR_NO_SERVER": UnreachableError,
    "VIR_ERR_UNKNOWN_HOST": UnreachableError,
    "VIR_ERR_SSH": UnreachableError,
    "VIR_ERR_LIBSSH": UnreachableError,
    "VIR_ERR_GNUTLS_ERROR": UnreachableError,
    "VIR_ERR_OPERATION_TIMEOUT": CallTimeoutError,
    "VIR_ERR_AGENT_UNRESPONSIVE": CallTimeoutError,
    "VIR_ERR_NO_SUPPORT": UnsupportedError,
    "VIR_ERR_OPERATION_UNSUPPORTED": UnsupportedError,
    "VIR_ERR_ARGUMENT_UNSUPPORTED": UnsupportedError,
    "VIR_ERR_CONFIG_UNSUPPORTED": UnsupportedError,
    "VIR_ERR_OPERATION_INVALID": DeviceError,
    "VIR_ERR_OPERATION_FAILED": DeviceError,
    "VIR_ERR_XML_ERROR": DeviceError,
    "VIR_ERR_INTERNAL_ERROR": DeviceError,
}

# An internal error raised by libvirt's transport layers (e.g. "client socket is
# closed") means the connection is gone: error domain name -> taxonomy class.
TRANSPORT_DOMAINS: dict[str, type[PowerError]] = {
    "VIR_FROM_RPC": UnreachableError,
    "VIR_FROM_REMOTE": UnreachableError,
    "VIR_FROM_SSH": UnreachableError,
    "VIR_FROM_LIBSSH": UnreachableError,
}

_ON_STATES = ("VIR_DOMAIN_RUNNING", "VIR_DOMAIN_BLOCKED", "VIR_DOMAIN_PAUSED",
              "VIR_DOMAIN_SHUTDOWN", "VIR_DOMAIN_PMSUSPENDED")
_OFF_STATES = ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_CRASHED")

# Boot device -> libvirt <os><boot dev=…/> order written for it.
BOOT_ORDER: dict[BootDevice, tuple[str, ...]] = {
    BootDevice.PXE: ("network", "hd"),
    BootDevice.DISK: ("hd", "network"),
    BootDevice.CDROM: ("cdrom", "hd", "network"),
}

_error_handler_lock = threading.Lock()
_error_handler_set = False


def _libvirt() -> Any:
    """Import libvirt-python, silencing its default print-to-stderr error handler.

    Raises :class:`ToolMissingError` when it is not installed.
    """
    global _error_handler_set
    try:
        import libvirt
    except ImportError as exc:
        raise ToolMissingError("virsh needs libvirt-python (pip install libvirt-python)") from exc
    with _error_handler_lock:
        if not _error_handler_set:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _error_handler_set = True
    return libvirt


# VIR_ERR_NONE / WARNING / ERROR are error *levels* whose values collide with codes.
_ERROR_LEVELS = frozenset({"VIR_ERR_NONE", "VIR_ERR_WARNING", "VIR_ERR_ERROR"})
_names_cache: dict[str, dict[int, str]] = {}


def _code_names(lv: Any, prefix: str) -> dict[int, str]:
    """libvirt constant value -> name, for error codes (``VIR_ERR_``) or domains (``VIR_FROM_``)."""
    names = _names_cache.get(prefix)
    if names is None:
        names = {
            getattr(lv, n): n
            for n in sorted(dir(lv))
            if n.startswith(prefix) and n not in _ERROR_LEVELS and isinstance(getattr(lv, n), int)
        }
        _names_cache[prefix] = names
    return names


def boot_order(xml: str) -> list[str]:
    """The ``<os><boot dev=…/>`` order of a domain definition."""
    root = ET.fromstring(xml)
    os_el = root.find("os")
    if os_el is None:
        return []
    return [b.get("dev", "") for b in os_el.findall("boot")]


def with_boot_order(xml: str, first: tuple[str, ...]) -> str:
    """``xml`` with its ``<os>`` boot order set to ``first`` followed by the devices it
    already listed. Per-device ``<boot order=…/>`` elements are removed, since libvirt
    refuses a definition that has both kinds."""
    root = ET.fromstring(xml)
    os_el = root.find("os")
    if os_el is None:
        os_el = ET.SubElement(root, "os")
        ET.SubElement(os_el, "type").text = "hvm"
    old = [b.get("dev", "") for b in os_el.findall("boot")]
    for b in os_el.findall("boot"):
        os_el.remove(b)
    for parent in root.iter():
        for child in list(parent):
            if child.tag == "boot" and parent is not os_el and child.get("order") is not None:
                parent.remove(child)
    order = list(first) + [d for d in old if d and d not in first]
    # <boot dev> goes after <type>, <loader>, <nvram>, <kernel>…: after the last of those.
    insert_at = 0
    for i, child in enumerate(list(os_el)):
        if child.tag in ("type", "firmware", "loader", "nvram", "kernel", "initrd", "cmdline", "dtb"):
            insert_at = i + 1
    for offset, dev in enumerate(order):
        el = ET.Element("boot", {"dev": dev})
        el.tail = "\n    "
        os_el.insert(insert_at + offset, el)
    return ET.tostring(root, encoding="unicode")


@register
class VirshDriver(PowerDriver):
    """A libvirt domain. One connection per driver instance, opened on first use."""

    power_type = "virsh"
    description = "Virsh (virtual systems)"
    settings_model = VirshSettings
    capabilities = Capabilities(
        pxe_next_boot=True,
        power_query=True,
        chassis_probe=True,
        detailed_errors=True,
    )
    settings: VirshSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._conn: Any = None

    # -- plumbing -----------------------------------------------------------------

    @property
    def uri(self) -> str:
        return self.settings.power_address

    def bmc_key(self) -> str:
        return f"virsh:{self.uri}"

    def _where(self) -> str:
        return f"domain {self.settings.power_id!r} at {self.uri}"

    def _translate(self, exc: Any, action: str) -> NoReturn:
        """Raise the taxonomy error for a ``libvirtError``: by error code, and for an
        internal error by the layer that raised it; the class never depends on message
        text. The message names the action, domain, URI and code, plus libvirt's own text
        with the password masked."""
        lv = _libvirt()
        code = exc.get_error_code()
        domain = exc.get_error_domain()
        code_name = _code_names(lv, "VIR_ERR_").get(code, f"code {code}") if code is not None else "unknown"
        domain_name = _code_names(lv, "VIR_FROM_").get(domain, "") if domain is not None else ""
        cls: type[PowerError] | None = None
        if code_name == "VIR_ERR_INTERNAL_ERROR":
            cls = TRANSPORT_DOMAINS.get(domain_name)
        if cls is None:
            cls = ERROR_CODES.get(code_name, DeviceError)
        if cls in (UnreachableError, CallTimeoutError):
            self._drop_connection()
        detail = self._scrub(str(exc.get_error_message() or ""))
        message = f"virsh {action} failed for {self._where()}: {code_name}"
        if detail:
            message += f": {detail}"
        raise cls(message, libvirt_code=code_name, libvirt_domain=domain_name) from exc

    def _scrub(self, text: str) -> str:
        password = secret_value(self.settings.power_pass)
        if password:
            text = text.replace(password, "***")
        return text[:300]

    def _auth_callback(self, creds: list[list[Any]], _opaque: Any) -> int:
        lv = _libvirt()
        user = urlsplit(self.uri).username
        for cred in creds:
            if cred[0] == lv.VIR_CRED_AUTHNAME:
                cred[4] = unquote(user) if user else cred[3]
            elif cred[0] == lv.VIR_CRED_PASSPHRASE:
                password = secret_value(self.settings.power_pass)
                if not password:
                    return -1
                cred[4] = password
        return 0

    def _connection(self) -> Any:
        lv = _libvirt()
        if self._conn is not None:
            try:
                if self._conn.isAlive():
                    return self._conn
            except lv.libvirtError:
                pass
            self._drop_connection()
        try:
            if self.settings.power_pass is not None:
                auth = [[lv.VIR_CRED_AUTHNAME, lv.VIR_CRED_PASSPHRASE], self._auth_callback, None]
                conn = lv.openAuth(self.uri, auth, 0)
            else:
                conn = lv.open(self.uri)
        except lv.libvirtError as exc:
            self._translate(exc, "connect")
        if conn is None:  # very old bindings returned None instead of raising
            raise UnreachableError(f"virsh could not connect to {self.uri}")
        self._conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing must never raise
                pass

    def _call(self, action: str, fn: Any, *args: Any) -> Any:
        lv = _libvirt()
        try:
            return fn(*args)
        except lv.libvirtError as exc:
            self._translate(exc, action)

    def _domain(self) -> Any:
        conn = self._connection()
        return self._call("lookup", conn.lookupByName, self.settings.power_id)

    def _state(self, dom: Any) -> int:
        return int(self._call("domstate", dom.state)[0])

    def _map_state(self, state: int) -> PowerState:
        lv = _libvirt()
        if state in {getattr(lv, n) for n in _ON_STATES}:
            return PowerState.ON
        if state in {getattr(lv, n) for n in _OFF_STATES}:
            return PowerState.OFF
        return PowerState.UNKNOWN

    # -- operations -----------------------------------------------------------------

    def power_on(self) -> None:
        """Start the domain if it is off. A running domain gets nothing; a paused one is
        resumed, a suspended (pmsuspended) one woken, a crashed one still held by the
        hypervisor destroyed and started. Raises the :mod:`drivers.errors` taxonomy."""
        lv = _libvirt()
        dom = self._domain()
        state = self._state(dom)
        if state == lv.VIR_DOMAIN_PAUSED:
            self._call("resume", dom.resume)
        elif state == lv.VIR_DOMAIN_PMSUSPENDED:
            self._call("wakeup", dom.pMWakeup, 0)
        elif state == lv.VIR_DOMAIN_CRASHED and self._call("isactive", dom.isActive):
            # A crashed domain kept for inspection (on_crash=preserve) must go first.
            self._call("destroy", dom.destroy)
            self._call("start", dom.create)
        elif self._map_state(state) is not PowerState.ON:
            self._call("start", dom.create)

    def power_off(self, soft: bool = False) -> None:
        """``destroy`` (hard) or ``shutdown`` (ACPI, soft) unless already off."""
        dom = self._domain()
        if self._map_state(self._state(dom)) is PowerState.OFF:
            return
        if soft:
            self._call("shutdown", dom.shutdown)
        else:
            self._call("destroy", dom.destroy)

    def power_cycle(self) -> None:
        """Reset a running domain, or start one that is off.

        A running domain whose pending (persistent) boot order differs from its live one
        is destroyed and started instead, so that the new boot device takes effect; so is
        one that is paused or suspended, or whose hypervisor cannot reset.
        """
        lv = _libvirt()
        dom = self._domain()
        state = self._state(dom)
        if self._map_state(state) is not PowerState.ON:
            self._call("start", dom.create)
            return
        if state == lv.VIR_DOMAIN_RUNNING and not self._boot_pending(dom):
            try:
                dom.reset(0)
                return
            except lv.libvirtError as exc:
                unsupported = {lv.VIR_ERR_NO_SUPPORT, getattr(lv, "VIR_ERR_OPERATION_UNSUPPORTED", -1)}
                if exc.get_error_code() not in unsupported:
                    self._translate(exc, "reset")
        self._call("destroy", dom.destroy)
        self._call("start", dom.create)

    def _boot_pending(self, dom: Any) -> bool:
        lv = _libvirt()
        live = self._call("dumpxml", dom.XMLDesc, 0)
        pending = self._call("dumpxml", dom.XMLDesc, lv.VIR_DOMAIN_XML_INACTIVE)
        return boot_order(live) != boot_order(pending)

    def query(self) -> PowerState:
        return self._map_state(self._state(self._domain()))

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """Rewrite the domain's persistent boot order with ``device`` first.

        libvirt has no one-time boot: the order stays until changed, whatever
        ``persistent`` says (see the module docstring). ``efi`` is not used: firmware is
        part of the domain definition. Nothing is sent when the order is already right.
        Raises :class:`UnsupportedError` for BIOS setup.
        """
        try:
            first = BOOT_ORDER[BootDevice(device)]
        except (KeyError, ValueError):
            raise UnsupportedError(f"virsh cannot boot {device!s} next") from None
        lv = _libvirt()
        dom = self._domain()
        flags = lv.VIR_DOMAIN_XML_INACTIVE | lv.VIR_DOMAIN_XML_SECURE  # keep graphics passwords
        xml = self._call("dumpxml", dom.XMLDesc, flags)
        try:
            if boot_order(xml)[: len(first)] == list(first):
                return
            new_xml = with_boot_order(xml, first)
        except ET.ParseError as exc:
            raise DeviceError(f"virsh: unreadable definition of {self._where()}") from exc
        self._call("define", self._connection().defineXML, new_xml)

    @classmethod
    def probe_chassis(
        cls, params: Mapping[str, Any], *, timeout: float = 10.0
    ) -> list[ProbedMachine]:
        """Every domain of the hypervisor, by name, with its power state."""
        with cls(cls.validate_chassis(params), timeout=timeout) as driver:
            assert isinstance(driver, VirshDriver)
            return driver.list_domains()

    def list_domains(self) -> list[ProbedMachine]:
        """Every domain of the hypervisor this driver is connected to."""
        conn = self._connection()
        domains = self._call("list", conn.listAllDomains, 0)
        out = []
        for dom in sorted(domains, key=lambda d: d.name()):
            try:
                power = self._map_state(self._state(dom))
            except NotFoundError:  # undefined while we listed
                continue
            out.append(ProbedMachine(name=dom.name(), power_parameters={"power_id": dom.name()},
                                     power=power, description="libvirt domain"))
        return out

    def close(self) -> None:
        """Close the connection. Never raises."""
        self._drop_connection()
