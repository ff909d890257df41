"""``ipmi``: any IPMI 2.0 BMC, over RMCP+ (UDP 623), through pyghmi.

Chassis Control (on, off, soft off, power cycle), Get Chassis Status and Set System
Boot Options (boot flags for the next boot only; PXE, disk, CD-ROM or BIOS setup,
legacy or EFI). pyghmi is imported only inside the methods that talk to the BMC, so
the settings model loads on a host without it.

One pyghmi ``Command`` (one RMCP+ session) per driver instance, reused by every call
and logged out by :meth:`IPMIDriver.close`: BMCs have few sessions, shared with people.
Credentials are handed to pyghmi as bytes (with ``str`` a second ``Command`` to the
same BMC in one process waits forever: pyghmi's session cache compares bytes to str).

Every pyghmi failure is translated here into :mod:`drivers.errors`. pyghmi reports
most failures as an ``IpmiException`` whose text is one of its own fixed strings
(its completion-code and RMCP+ status tables, or a few literals); the tables below map
those strings, and the codes behind them, to error classes. Messages are built from
the BMC address and the code, never from the library's text.

Time limits: pyghmi has no per-call deadline. A login to a BMC that never answers
gives up after pyghmi's own retry schedule (about 3-6 s). Once logged in, the
session's retry ceiling is derived from ``timeout`` (retransmits at about 1, 2, 3 ...
s apart while their sum stays within ``timeout``) and pyghmi's silent re-login inside a
call is switched off, so a request to a BMC that stopped answering fails within
``timeout`` with :class:`CallTimeoutError`. A session idle for longer than
:data:`IDLE_RELOGIN` seconds is replaced by a fresh login before the next call, since
BMCs expire idle sessions (typically after 30-60 s) and pyghmi only keeps them alive
while something runs its event loop.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

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
    PowerError,
    SettingsError,
    ToolMissingError,
    UnreachableError,
    UnsupportedError,
)
from .registry import register

T = TypeVar("T")

CipherSuite = Literal["3", "17"]
PrivilegeLevel = Literal["USER", "OPERATOR", "ADMIN"]
BootType = Literal["auto", "legacy", "efi"]
PowerOffMode = Literal["soft", "hard"]

IDLE_RELOGIN = 20.0
"""Seconds a session may stay idle before the next call logs in afresh."""

PRIVILEGE_LEVELS: dict[str, int] = {"USER": 2, "OPERATOR": 3, "ADMIN": 4}
"""IPMI privilege level numbers (IPMI 2.0 table 6-4)."""

USER_ACCESS_LEVELS: dict[str, str] = {"USER": "user", "OPERATOR": "operator", "ADMIN": "administrator"}
"""``privilege_level`` -> pyghmi's name for the user privilege limit it sets."""

PYGHMI_BOOT_DEVICES: dict[BootDevice, str] = {
    BootDevice.PXE: "network",
    BootDevice.DISK: "hd",
    BootDevice.CDROM: "optical",
    BootDevice.BIOS: "setup",
}

# IPMI completion codes (IPMI 2.0 table 5-2) -> error class. Any other non-zero code
# is a DeviceError.
COMPLETION_CODE_ERRORS: dict[int, type[PowerError]] = {
    0xC0: BusyError,  # node busy
    0xC3: CallTimeoutError,  # timeout while processing command
    0xCE: BusyError,  # command response could not be provided
    0xD1: BusyError,  # device in firmware update mode
    0xD2: BusyError,  # BMC initialization in progress
    0xD4: AuthError,  # insufficient privilege level
    0xC1: UnsupportedError,  # invalid command
    0xD6: UnsupportedError,  # subfunction disabled or unavailable
}

# RMCP+ status codes (IPMI 2.0 table 13-15), as answered during the session handshake.
RMCP_STATUS_ERRORS: dict[int, type[PowerError]] = {
    0x01: BusyError,  # insufficient resources to create a session
    0x0B: BusyError,  # insufficient resources at the requested role
    0x02: CallTimeoutError,  # invalid session id: a retransmit crossed a reply
    0x08: CallTimeoutError,  # inactive session id
    0x09: AuthError,  # invalid role
    0x0A: AuthError,  # unauthorized role or privilege level
    0x0C: AuthError,  # invalid user name length
    0x0D: AuthError,  # unauthorized name
    0x0E: AuthError,  # unauthorized GUID
    0x0F: AuthError,  # invalid integrity check value
    0x04: UnsupportedError,  # invalid authentication algorithm
    0x05: UnsupportedError,  # invalid integrity algorithm
    0x06: UnsupportedError,  # no matching authentication payload
    0x07: UnsupportedError,  # no matching integrity payload
    0x10: UnsupportedError,  # invalid confidentiality algorithm
    0x11: UnsupportedError,  # no cipher suite match
}

# pyghmi 1.6.19's literal failure strings (pyghmi/ipmi/private/session.py), matched as
# prefixes, and what they mean. ``None`` = "no answer": unreachable during the login,
# a timeout once a session is open.
PYGHMI_TEXT_ERRORS: tuple[tuple[str, type[PowerError] | None, str], ...] = (
    ("Incorrect password provided", AuthError, "the BMC refused the credentials"),
    ("Invalid RAKP4 integrity code", AuthError, "the BMC refused the credentials (K_g)"),
    ("Password is too long", AuthError, "password too long for the BMC"),
    ("Username too long", AuthError, "user name too long for the BMC"),
    ("Unable to transmit to specified address", UnreachableError, "cannot send to the address"),
    ("Session no longer connected", CallTimeoutError, "session lost, no answer"),
    ("timeout", None, "no answer"),
    ("Timeout", None, "no answer"),
)


def _rmcp_texts() -> list[tuple[str, int]]:
    from pyghmi.ipmi.private import constants

    return sorted(((text, code) for code, text in constants.rmcp_codes.items()),
                  key=lambda item: -len(item[0]))


def _completion_texts() -> dict[str, int]:
    from pyghmi.ipmi.private import constants

    return {text: code for code, text in constants.ipmi_completion_codes.items()}


def classify_pyghmi_error(
    exc: BaseException, *, address: str, action: str, logged_in: bool
) -> PowerError:
    """Translate one pyghmi (or socket) failure into the error taxonomy.

    The message names the BMC, the action and the IPMI / RMCP+ code; never the
    library's text (which may echo user input).
    """
    where = f"ipmi {address}: {action}"
    if isinstance(exc, OSError):
        return UnreachableError(f"{where}: network error ({type(exc).__name__})")
    if isinstance(exc, struct.error | IndexError | AssertionError | TypeError):
        if not logged_in:
            # A garbled packet while logging in (a late retransmit, a reply meant for an
            # earlier session under load): nothing was sent to the node yet, so another
            # login is safe. Transient, retried by the policy (seen in the chaos tests).
            return UnreachableError(f"{where}: malformed reply from the BMC while logging in")
        return DeviceError(f"{where}: malformed reply from the BMC")
    text = exc.args[0] if exc.args else None
    code = getattr(exc, "ipmicode", 0) or 0
    if code and code != 0xFFFF:
        return completion_code_error(code, where)
    if not text or not isinstance(text, str):
        return _no_answer(where, logged_in)
    completion = _completion_texts().get(text)
    if completion is not None:
        if completion == 0xFFFF:
            return _no_answer(where, logged_in)
        return completion_code_error(completion, where)
    for prefix, cls, meaning in PYGHMI_TEXT_ERRORS:
        if text.startswith(prefix):
            if cls is None:
                return _no_answer(where, logged_in)
            return cls(f"{where}: {meaning}")
    for prefix, status in _rmcp_texts():
        if text.startswith(prefix):
            cls = RMCP_STATUS_ERRORS.get(status, DeviceError)
            return cls(f"{where}: session refused, RMCP+ status 0x{status:02x}", rmcp_status=status)
    return DeviceError(f"{where}: the BMC answered with an error")


def completion_code_error(code: int, where: str) -> PowerError:
    """The error for a non-zero IPMI completion code."""
    cls = COMPLETION_CODE_ERRORS.get(code, DeviceError)
    return cls(f"{where}: completion code 0x{code:02x}", ipmi_code=code)


def _no_answer(where: str, logged_in: bool) -> PowerError:
    if logged_in:
        return CallTimeoutError(f"{where}: no answer from the BMC")
    return UnreachableError(f"{where}: no answer from the BMC")


def retry_ceiling(timeout: float) -> int:
    """pyghmi's ``maxtimeout`` for a call bound of ``timeout`` seconds.

    pyghmi waits about t, t+1, t+2, ... seconds (t <= 1) between transmissions while
    the wait stays within ``maxtimeout``: the worst case total is M(M+1)/2 seconds.
    """
    ceiling = 1
    while ceiling < 4 and (ceiling + 1) * (ceiling + 2) / 2 <= 0.8 * timeout:
        ceiling += 1
    return ceiling


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-]?)[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}$")


class IPMISettings(DriverSettings):
    """MAAS ``ipmi`` power parameters (plus ``power_port``)."""

    power_address: str = param(description="BMC IP address or host name")
    power_port: int = param(623, description="BMC UDP port (623; other ports for simulators)")
    power_user: str = param("", description="BMC user name")
    power_pass: SecretStr = param(SecretStr(""), description="BMC password", secret=True)
    k_g: SecretStr | None = param(None, description="BMC key (K_g), if the BMC has one", secret=True)
    cipher_suite_id: CipherSuite = param(
        "3", description="RMCP+ cipher suite (3; 17 in FIPS setups)", choices=("3", "17")
    )
    privilege_level: PrivilegeLevel = param(
        "OPERATOR", description="session privilege level", choices=("USER", "OPERATOR", "ADMIN")
    )
    power_boot_type: BootType = param(
        "auto", description="next boot in legacy or EFI mode", choices=("auto", "legacy", "efi")
    )
    power_off_mode: PowerOffMode = param(
        "hard", description="power off: hard (immediate) or soft (ACPI)", choices=("soft", "hard")
    )
    mac_address: str | None = param(None, description="the node's boot MAC address", scope="node")

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        host = value.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise ValueError("the BMC address must not be empty")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOSTNAME.match(host):
                raise ValueError("not an IP address or host name") from None
        return host

    @field_validator("power_port")
    @classmethod
    def _check_port(cls, value: int) -> int:
        if not 0 < value < 65536:
            raise ValueError("port must be between 1 and 65535")
        return value

    @field_validator("power_user")
    @classmethod
    def _check_user(cls, value: str) -> str:
        if len(value.encode()) > 16:
            raise ValueError("IPMI user names are at most 16 bytes")
        return value

    @field_validator("power_pass")
    @classmethod
    def _check_pass(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value().encode()) > 20:
            raise ValueError("IPMI 2.0 passwords are at most 20 bytes")
        return value

    @field_validator("k_g", mode="before")
    @classmethod
    def _empty_kg(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str | SecretStr) and not str(
                value.get_secret_value() if isinstance(value, SecretStr) else value)):
            return None
        return value

    @field_validator("cipher_suite_id", mode="before")
    @classmethod
    def _suite_text(cls, value: Any) -> Any:
        # MAAS stores it as text; "" means "the tool's default", which is suite 3.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if value == "":
            return "3"
        return value

    @field_validator("privilege_level", mode="before")
    @classmethod
    def _priv_upper(cls, value: Any) -> Any:
        # MAAS' names are upper case; "" means MAAS' default, OPERATOR.
        if value == "":
            return "OPERATOR"
        return value.upper() if isinstance(value, str) else value

    @field_validator("power_boot_type", mode="before")
    @classmethod
    def _boot_type_default(cls, value: Any) -> Any:
        return "auto" if value == "" else value

    @field_validator("power_off_mode", mode="before")
    @classmethod
    def _off_mode_default(cls, value: Any) -> Any:
        return "hard" if value == "" else value

    @field_validator("mac_address", mode="before")
    @classmethod
    def _check_mac(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not _MAC.match(value.strip()):
            raise ValueError("not a MAC address")
        return value.strip().lower()


def _untangle_pyghmi_locks() -> None:
    """pyghmi 1.6 guards its session tables with two locks taken in opposite orders:
    ``awaitresponse`` holds WAITING_SESSIONS and, when a session times out, takes
    KEEPALIVE_SESSIONS (via ``_mark_broken``); ``send_payload`` holds KEEPALIVE_SESSIONS
    and takes WAITING_SESSIONS. Two node threads doing both deadlock the whole worker
    process (found by the chaos tests). Both are re-entrant locks guarding short
    bookkeeping, so making them one lock removes the inversion at little cost."""
    from pyghmi.ipmi.private import session as pyghmi_session

    if pyghmi_session.KEEPALIVE_SESSIONS is not pyghmi_session.WAITING_SESSIONS:
        pyghmi_session.KEEPALIVE_SESSIONS = pyghmi_session.WAITING_SESSIONS


# -- pyghmi sessions shared between drivers ---------------------------------------------------
# pyghmi hands every Command in a process that names the same BMC and credentials the same
# Session object. Cartridge nodes behind one Moonshot Chassis Manager, or servers in one
# SeaMicro chassis, each have a driver but share that session: one driver logging out when
# its node is done would cut the others off in the middle of their calls ("Session no
# longer connected", seen in CI). So the drivers holding a session are counted, and only
# the last one to let go logs it out. A lock per BMC keeps a logout and a new login to the
# same BMC from crossing (pyghmi would hand out the session being logged out); logins to
# different BMCs never wait for each other.
_SESSIONS_LOCK = threading.Lock()
_SESSION_HOLDERS: dict[Any, int] = {}
_BMC_LOCKS: dict[tuple[str, int], threading.Lock] = {}


def _bmc_lock(address: str, port: int) -> threading.Lock:
    with _SESSIONS_LOCK:
        return _BMC_LOCKS.setdefault((address, port), threading.Lock())


def _hold_session(session: Any) -> None:
    with _SESSIONS_LOCK:
        _SESSION_HOLDERS[session] = _SESSION_HOLDERS.get(session, 0) + 1


def _release_session(session: Any) -> bool:
    """Let go of ``session``; True when no driver holds it any more (the caller logs
    it out)."""
    with _SESSIONS_LOCK:
        left = _SESSION_HOLDERS.get(session, 0) - 1
        if left > 0:
            _SESSION_HOLDERS[session] = left
            return False
        _SESSION_HOLDERS.pop(session, None)
        return True


# -- the shared RMCP+ client (issue 4) --------------------------------------------------------
_LANPLUS: dict[str, Any] = {"client": None}


def use_lanplus(client: Any | None) -> None:
    """Send :class:`IPMIDriver`'s power calls (on, off, cycle, query, next boot) through
    ``client``, a :class:`drivers.rmcpplus.BlockingLanplus` shared by the process whose
    sessions stay open across calls and jobs; ``None`` goes back to pyghmi. User
    commands (enlistment), bridging (moonshot) and OEM raw commands (sm15k) stay on pyghmi."""
    _LANPLUS["client"] = client


def lean_target(s: IPMISettings) -> Any:
    """The :class:`drivers.rmcpplus.Target` (the RMCP+ login) of a node's settings."""
    from .rmcpplus import Target

    k_g = secret_value(s.k_g) if s.k_g is not None else ""
    return Target(host=s.power_address, port=int(s.power_port), username=s.power_user,
                  password=secret_value(s.power_pass), kg=k_g or None,
                  privilege=s.privilege_level, cipher_suite=int(s.cipher_suite_id))


@register
class IPMIDriver(PowerDriver):
    """IPMI 2.0 over RMCP+ (pyghmi). One session per instance; ``close()`` logs out."""

    power_type = "ipmi"
    description = "IPMI"
    settings_model = IPMISettings
    capabilities = Capabilities(
        pxe_next_boot=True,
        power_query=True,
        chassis_probe=False,
        detailed_errors=True,
        bmc_enlistment=True,
    )
    settings: IPMISettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._command: Any = None
        self._last_used = 0.0

    lease_per_action = True
    """One node per BMC: the policy holds the BMC's lease for a whole action."""

    @property
    def calls_bounded(self) -> bool:
        """Calls on the shared RMCP+ client end within their timeout by themselves (no
        watchdog thread needed); pyghmi's may not."""
        return _LANPLUS["client"] is not None and type(self) is IPMIDriver

    def bmc_key(self) -> str:
        return f"ipmi:{self.settings.power_address}:{self.settings.power_port}"

    # -- the edge ------------------------------------------------------------------

    def _connect(self, privlevel: int | None = None) -> Any:
        """The open pyghmi ``Command``, logging in if there is none (or it broke), at
        ``privlevel`` (default: the settings' ``privilege_level``)."""
        cmd = self._command
        if cmd is not None:
            session = cmd.ipmi_session
            fresh = time.monotonic() - self._last_used < IDLE_RELOGIN
            if fresh and not session.broken and session.logged:
                return cmd
            self._command = None
            self._drop(cmd)
        try:
            from pyghmi.ipmi import command as ipmi_command

            _untangle_pyghmi_locks()
        except ImportError as exc:
            raise ToolMissingError("ipmi: the pyghmi library is not installed") from exc
        s = self.settings
        k_g = secret_value(s.k_g)
        try:
            # Under the BMC's lock, so that no other driver logs this BMC's shared session
            # out between pyghmi handing it over and this driver counting itself in.
            lock = _bmc_lock(s.power_address, s.power_port)
            if not lock.acquire(timeout=3 * self.timeout):
                raise CallTimeoutError(
                    f"ipmi {self._where()}: login: another login to this BMC is still stuck")
            try:
                cmd = ipmi_command.Command(
                    bmc=s.power_address,
                    userid=s.power_user.encode(),
                    password=secret_value(s.power_pass).encode(),
                    port=s.power_port,
                    kg=k_g.encode() if k_g else None,
                    privlevel=privlevel or PRIVILEGE_LEVELS[s.privilege_level],
                )
                _hold_session(cmd.ipmi_session)
            finally:
                lock.release()
        except PowerError:
            raise
        except Exception as exc:
            raise classify_pyghmi_error(
                exc, address=self._where(), action="login", logged_in=False
            ) from exc
        if s.cipher_suite_id == "17" and getattr(cmd.ipmi_session, "currhashlib", None) is not hashlib.sha256:
            self._drop(cmd)
            raise UnsupportedError(
                f"ipmi {self._where()}: login: the BMC does not offer cipher suite 17"
            )
        session = cmd.ipmi_session
        session.maxtimeout = retry_ceiling(self.timeout)
        session.logontries = 0
        self._command = cmd
        self._last_used = time.monotonic()
        return cmd

    def _run(self, action: str, call: Callable[[Any], T]) -> T:
        cmd = self._connect()
        try:
            result = call(cmd)
        except PowerError:
            if cmd.ipmi_session.broken:
                self._command = None
                self._drop(cmd)
            raise
        except Exception as exc:
            if cmd.ipmi_session.broken:
                self._command = None
                self._drop(cmd)
            raise classify_pyghmi_error(
                exc, address=self._where(), action=action, logged_in=True
            ) from exc
        self._last_used = time.monotonic()
        return result

    def _where(self) -> str:
        return f"{self.settings.power_address}:{self.settings.power_port}"

    def _raw(self, cmd: Any, action: str, netfn: int, command: int, data: tuple[int, ...] = ()) -> Any:
        """One raw request; a non-zero completion code raises the matching error."""
        response = cmd.raw_command(netfn=netfn, command=command, data=data)
        code = response.get("code", 0)
        if "error" in response and (not code or code == 0xFFFF):
            raise _no_answer(f"ipmi {self._where()}: {action}", logged_in=True)
        if code:
            raise completion_code_error(code, f"ipmi {self._where()}: {action}")
        return response

    def _chassis_power(self, cmd: Any) -> PowerState:
        response = self._raw(cmd, "get chassis status", 0x00, 0x01)
        data = response.get("data") or b""
        if not data:
            raise DeviceError(f"ipmi {self._where()}: get chassis status: empty reply")
        return PowerState.ON if data[0] & 0x01 else PowerState.OFF

    # -- the contract --------------------------------------------------------------

    def _lean(self, call: Callable[[Any, Any], Any]) -> Any:
        """Run ``call(client, target)`` on the shared RMCP+ client, bounded by the call
        timeout (the client retransmits inside it)."""
        target = lean_target(self.settings)
        client = _LANPLUS["client"]
        return client.call(lambda c: call(c, target), timeout=self.timeout)

    def power_on(self) -> None:
        """Chassis power on, unless the chassis already reports on (never a reset).

        Raises AuthError, BusyError, UnreachableError, CallTimeoutError, DeviceError,
        ToolMissingError.
        """
        if _LANPLUS["client"] is not None:
            self._lean(lambda c, t: c.chassis_control(t, "on"))
            return
        self._run("power on", lambda cmd: cmd.set_power("on", wait=False))

    def power_off(self, soft: bool = False) -> None:
        """Chassis power off: hard ("off") by default, soft ("shutdown", ACPI) if asked.

        Only ``soft`` decides; ``settings.power_off_mode`` is the execution policy's to
        read and pass as ``soft``. A soft off of a node that is already off sends nothing.
        Raises as :meth:`power_on`.
        """
        if _LANPLUS["client"] is not None:
            if soft and self.query() is PowerState.OFF:
                return
            self._lean(lambda c, t: c.chassis_control(t, "soft" if soft else "off"))
            return

        def _off(cmd: Any) -> None:
            if soft:
                if self._chassis_power(cmd) is PowerState.OFF:
                    return
                cmd.set_power("shutdown", wait=False)
            else:
                cmd.set_power("off", wait=False)

        self._run("power off", _off)

    def power_cycle(self) -> None:
        """Chassis Control power cycle if on; power on if off (as pyghmi's "boot").

        Raises as :meth:`power_on`.
        """
        if _LANPLUS["client"] is not None:
            on = self.query() is PowerState.ON
            self._lean(lambda c, t: c.chassis_control(t, "cycle" if on else "on"))
            return

        def _cycle(cmd: Any) -> None:
            if self._chassis_power(cmd) is PowerState.OFF:
                cmd.set_power("on", wait=False)
            else:
                self._raw(cmd, "power cycle", 0x00, 0x02, (0x02,))

        self._run("power cycle", _cycle)

    def query(self) -> PowerState:
        """Get Chassis Status: ``on`` or ``off``. Raises as :meth:`power_on`."""
        if _LANPLUS["client"] is not None:
            return PowerState(self._lean(lambda c, t: c.query(t)))
        return self._run("query", self._chassis_power)

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """Set System Boot Options boot flags: the next boot (or every boot if
        ``persistent``) from ``device``, in EFI mode if ``efi`` or the node's
        ``power_boot_type`` is ``efi``. Raises as :meth:`power_on`.
        """
        name = PYGHMI_BOOT_DEVICES.get(BootDevice(device))
        if name is None:
            raise UnsupportedError(f"ipmi cannot boot from {device}")
        uefi = efi or self.settings.power_boot_type == "efi"
        if _LANPLUS["client"] is not None:  # every BootDevice is an RMCP+ boot device name
            where = str(BootDevice(device))
            self._lean(lambda c, t: c.set_boot_device(t, where, efi=uefi, persistent=persistent))
            return

        def _set(cmd: Any) -> None:
            result = cmd.set_bootdev(name, persist=persistent, uefiboot=uefi)
            if isinstance(result, dict) and "error" in result:
                raise DeviceError(f"ipmi {self._where()}: set boot device: refused")

        self._run("set boot device", _set)

    def create_user(self, username: str, password: str) -> dict[str, Any]:
        """Create, or reset if it exists, the BMC user ``username`` with ``password``.

        Logs in at ADMINISTRATOR level with the current credentials (the one session of
        this driver is logged out first, and the admin session afterwards), finds the
        LAN channel (Get Channel Info), takes the user id already named ``username`` or
        else the first unnamed one from 2 up (user 1 is the null user), and sets its
        name, its password (16-byte form up to 16 bytes, the 20-byte IPMI 2.0 form up
        to 20), its access on the LAN channel (IPMI messaging, the privilege limit of
        ``privilege_level``: OPERATOR by default) and enables it.

        Returns ``{"power_user": username, "power_pass": password}``. Raises
        SettingsError (name or password too long, or the admin user's own name),
        AuthError (admin credentials refused, or no ADMINISTRATOR rights), BusyError
        (no free user id, or the BMC busy), UnsupportedError (no LAN channel),
        DeviceError (a refused request), UnreachableError, CallTimeoutError,
        ToolMissingError. Messages never hold the password.
        """
        if not username or len(username.encode()) > 16:
            raise SettingsError("ipmi: a BMC user name is 1 to 16 bytes")
        if not password or len(password.encode()) > 20:
            raise SettingsError("ipmi: a BMC password is 1 to 20 bytes")
        if username == self.settings.power_user:
            raise SettingsError("ipmi: the user to create must not be the admin user itself")
        self.close()
        self._connect(privlevel=PRIVILEGE_LEVELS["ADMIN"])
        try:
            self._run("create user", lambda cmd: self._create_user(cmd, username, password))
        finally:
            self.close()
        return {"power_user": username, "power_pass": password}

    def _create_user(self, cmd: Any, username: str, password: str) -> None:
        where = f"ipmi {self._where()}: create user"
        channel = cmd.get_network_channel()
        if channel is None:
            raise UnsupportedError(f"{where}: the BMC has no LAN channel")
        max_users = cmd.get_user_access(1, channel)["channel_info"]["max_user_count"]
        uid, free = None, None
        for candidate in range(2, max_users + 1):
            name = cmd.get_user_name(candidate, return_none_on_error=False)
            if name == username:
                uid = candidate
                break
            if name is None and free is None:
                free = candidate
        if uid is None:
            if free is None:
                raise BusyError(f"{where}: no free user id (the BMC has {max_users})")
            uid = free
            cmd.set_user_name(uid, username)
        cmd.set_user_password(uid, mode="set_password", password=password)
        cmd.set_user_access(uid, channel, callback=False, link_auth=True, ipmi_msg=True,
                            privilege_level=USER_ACCESS_LEVELS[self.settings.privilege_level])
        cmd.set_user_password(uid, mode="enable")

    def close(self) -> None:
        """Log the session out. Never raises."""
        cmd, self._command = self._command, None
        if cmd is not None:
            self._drop(cmd)

    def _drop(self, cmd: Any) -> None:
        """Let go of ``cmd``'s session, logging it out if no other driver in this
        process holds it. Never raises."""
        try:
            session = cmd.ipmi_session
            lock = _bmc_lock(self.settings.power_address, self.settings.power_port)
            locked = lock.acquire(timeout=3 * self.timeout)
            try:
                # Without the lock (a login to this BMC is stuck) the session is let go
                # of but not logged out: the BMC expires it.
                if _release_session(session) and locked and not session.broken:
                    session.logout()
            finally:
                if locked:
                    lock.release()
        except Exception:  # noqa: S110 - close() never raises
            pass
