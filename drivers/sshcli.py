"""The one command-line transport for SSH and telnet devices (wedge, mscm, hmc, fence_cdu).

Two ways to talk to a device's CLI:

- :class:`SshSession` — one SSH login (asyncssh, password or keyboard-interactive
  authentication), reused for every command of a driver instance. :meth:`SshSession.run`
  runs one command on its own channel (``exec``) and returns its output and exit status;
  :meth:`SshSession.shell` opens an interactive shell for devices that only offer a prompt.
- :class:`CliShell` — a prompt-driven dialogue (send a line, read up to the next prompt)
  over an SSH shell channel or over telnet (:class:`TelnetChannel`: a minimal RFC 854
  client on a plain socket that refuses every option the device offers; ``telnetlib`` is
  deprecated since Python 3.11 and gone in 3.13).

asyncssh is asyncio-only, and drivers are called from plain threads: every SSH call runs on
one background event loop per process (:func:`_run`), bounded by the driver's timeout.

Host keys (``host_key_policy``, ``known_hosts``):

========== ===========================================================================
accept-new the default: a host seen for the first time has its key recorded in
           ``known_hosts``; from then on a different key is refused (OpenSSH's
           ``StrictHostKeyChecking=accept-new``). Safe against a later man in the middle,
           and it needs no preparation for a new rack.
reject     only hosts already listed in ``known_hosts`` are accepted (strict)
ignore     any key is accepted and nothing is recorded (lab use only)
========== ===========================================================================

``known_hosts`` defaults to ``~/.ssh/known_hosts`` of the user the worker runs as (entries
for a non-standard port are written ``[host]:port``, as OpenSSH does). A refused or unknown
host key is an :class:`~drivers.errors.AuthError` (code ``auth_failed``, detail
``host_key``): it is fatal and never retried.

Errors (:func:`translate`): refused password -> ``auth_failed``; connection refused, no
route, name not resolved, connection lost -> ``unreachable``; no answer within the timeout
-> ``timeout``; SSH disconnect "too many connections", channel refused for lack of
resources, or a device reply matching :data:`BUSY_TEXT` -> ``busy``.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import re
import socket
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from pydantic import SecretStr, field_validator

from .base import DriverSettings, PowerDriver, param, secret_value
from .errors import (
    AuthError,
    BusyError,
    CallTimeoutError,
    DeviceError,
    PowerError,
    ToolMissingError,
    UnreachableError,
)

T = TypeVar("T")

BUSY_TEXT = re.compile(
    r"too many (sessions|connections|users|logins)"
    r"|maximum (number of )?(sessions|connections|users|logins)"
    r"|no (free|available) (sessions?|connections?|slots?)"
    r"|all (sessions|connections|ports) (are )?(in use|busy)",
    re.IGNORECASE,
)
"""Device replies meaning "no free session": each alternative is exercised by a peer test."""


class HostKeyPolicy(StrEnum):
    """What to do with the device's SSH host key (see the module docstring)."""

    ACCEPT_NEW = "accept-new"
    REJECT = "reject"
    IGNORE = "ignore"


DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


class CliSettings(DriverSettings):
    """Parameters shared by every SSH / telnet CLI power type (MAAS names first)."""

    power_address: str = param(description="Host name or IP address of the device")
    power_user: str = param(description="Login user name on the device")
    power_pass: SecretStr = param(description="Login password on the device", secret=True)
    power_port: int | None = param(
        None, description="TCP port of the device's CLI (default: 22 for SSH, 23 for telnet)"
    )
    host_key_policy: HostKeyPolicy = param(
        HostKeyPolicy.ACCEPT_NEW,
        description="SSH host key check: accept-new (record on first contact, then enforce), "
        "reject (only keys already in known_hosts) or ignore (lab use only)",
        choices=tuple(p.value for p in HostKeyPolicy),
    )
    known_hosts: str = param(
        DEFAULT_KNOWN_HOSTS,
        description="known_hosts file used to check and record SSH host keys",
    )

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or "/" in value or "@" in value:
            raise ValueError("must be a host name or IP address")
        return value

    @field_validator("power_port")
    @classmethod
    def _check_port(cls, value: int | None) -> int | None:
        if value is not None and not 0 < value < 65536:
            raise ValueError("must be a TCP port (1-65535)")
        return value


@dataclass(frozen=True)
class Target:
    """Where and how to log in. ``password`` is never printed (``repr=False``)."""

    host: str
    port: int
    user: str
    password: str
    timeout: float
    host_key_policy: HostKeyPolicy = HostKeyPolicy.ACCEPT_NEW
    known_hosts: str = DEFAULT_KNOWN_HOSTS

    def __repr__(self) -> str:
        return f"Target({self.user}@{self.host}:{self.port})"

    @classmethod
    def from_settings(cls, settings: CliSettings, timeout: float, default_port: int = 22) -> Target:
        return cls(
            host=settings.power_address,
            port=settings.power_port or default_port,
            user=settings.power_user,
            password=secret_value(settings.power_pass),
            timeout=timeout,
            host_key_policy=settings.host_key_policy,
            known_hosts=settings.known_hosts,
        )

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def scrub(self, text: str) -> str:
        """``text`` (a device reply) cut short, with the password masked."""
        if self.password:
            text = text.replace(self.password, "***")
        return text.strip()[:300]


@dataclass(frozen=True)
class CommandResult:
    """What one ``exec`` command printed, and its exit status (None if not sent)."""

    output: str
    exit_status: int | None


# -- the background event loop ------------------------------------------------------

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid = 0


def _event_loop() -> asyncio.AbstractEventLoop:
    """The process's SSH event loop, started on first use (and again after a fork)."""
    global _loop, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid() or not _loop.is_running():
            loop = asyncio.new_event_loop()
            started = threading.Event()
            loop.call_soon(started.set)
            threading.Thread(target=loop.run_forever, name="powerq-ssh", daemon=True).start()
            started.wait(5)
            _loop, _loop_pid = loop, os.getpid()
        return _loop


def _run(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run ``coro`` on the SSH loop within ``timeout`` seconds (``TimeoutError`` after)."""
    loop = _event_loop()
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), loop)
    try:
        return future.result(timeout + 2)
    except TimeoutError:
        future.cancel()
        raise


def _asyncssh() -> Any:
    try:
        import asyncssh
    except ImportError as exc:
        raise ToolMissingError("SSH power types need asyncssh (pip install asyncssh)") from exc
    return asyncssh


# -- errors ---------------------------------------------------------------------------


def translate(exc: BaseException, target: Target, action: str) -> PowerError:
    """The taxonomy error for a library / socket exception met while ``action``-ing."""
    where = f"{action} at {target.where}"
    if isinstance(exc, PowerError):
        return exc
    if isinstance(exc, TimeoutError):  # asyncio's and socket's timeouts are this one
        return CallTimeoutError(f"no answer from {where} within {target.timeout:g} s")
    asyncssh: Any
    try:
        import asyncssh
    except ImportError:  # pragma: no cover - only socket errors without asyncssh
        asyncssh = None
    if asyncssh is not None:
        if isinstance(exc, asyncssh.PermissionDenied):
            return AuthError(f"{where}: the device refused user {target.user!r} and its password")
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return AuthError(
                f"{where}: SSH host key not trusted ({target.host_key_policy} policy, "
                f"known_hosts {target.known_hosts}): {target.scrub(str(exc.reason))}",
                host_key="not_verified",
            )
        if isinstance(exc, asyncssh.DisconnectError):
            reason = target.scrub(str(exc.reason))
            if exc.code == asyncssh.DISC_TOO_MANY_CONNECTIONS or BUSY_TEXT.search(reason):
                return BusyError(f"{where}: no free session ({reason})")
            return UnreachableError(f"{where}: connection lost ({reason or 'disconnected'})")
        if isinstance(exc, asyncssh.ChannelOpenError):
            reason = target.scrub(str(exc.reason))
            busy_codes = (asyncssh.OPEN_RESOURCE_SHORTAGE, asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED)
            if exc.code in busy_codes or BUSY_TEXT.search(reason):
                return BusyError(f"{where}: session refused ({reason})")
            return DeviceError(f"{where}: channel refused ({reason})")
        if isinstance(exc, asyncssh.Error):
            return DeviceError(f"{where}: SSH error {type(exc).__name__}")
    if isinstance(exc, ConnectionRefusedError):
        return UnreachableError(f"{where}: connection refused")
    if isinstance(exc, socket.gaierror):
        return UnreachableError(f"{where}: host name not resolved")
    if isinstance(exc, EOFError | ConnectionError | asyncio.IncompleteReadError):
        return UnreachableError(f"{where}: connection closed by the device")
    if isinstance(exc, OSError):
        return UnreachableError(f"{where}: {exc.strerror or type(exc).__name__}")
    return DeviceError(f"{where}: unexpected {type(exc).__name__}")


# -- host keys ---------------------------------------------------------------------------


def _host_pattern(target: Target) -> str:
    return target.host if target.port == 22 else f"[{target.host}]:{target.port}"


def _ip_or_empty(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return ""


def _known_keys(asyncssh: Any, path: Path, target: Target) -> list[Any]:
    if not path.is_file():
        return []
    try:
        keys = asyncssh.match_known_hosts(str(path), target.host, _ip_or_empty(target.host),
                                          target.port)[0]
    except (OSError, ValueError, asyncssh.Error) as exc:
        raise AuthError(f"known_hosts {path} is unreadable", host_key="unreadable") from exc
    return list(keys)


def _record_key(asyncssh: Any, path: Path, target: Target, key: Any) -> None:
    """Append ``key`` for the target under a file lock; if another process recorded a
    different key meanwhile, refuse."""
    kind, blob = key.export_public_key("openssh").decode().split()[:2]
    line = f"{_host_pattern(target)} {kind} {blob}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            now = _known_keys(asyncssh, path, target)
            if now and not any(k.public_data == key.public_data for k in now):
                raise AuthError(
                    f"{target.where}: SSH host key changed while being recorded", host_key="changed"
                )
            if not now:
                fh.write(line)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- SSH --------------------------------------------------------------------------------


class SshSession:
    """One SSH login to a device, opened on first use and reused until :meth:`close`.

    Every method raises only :mod:`drivers.errors` exceptions and is bounded by
    ``target.timeout``. After a timeout or a lost connection the login is dropped, and
    the next call logs in again.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self._conn: Any = None

    def __repr__(self) -> str:
        return f"SshSession({self.target!r})"

    async def _connect(self) -> Any:
        asyncssh = _asyncssh()
        t = self.target
        path = Path(os.path.expanduser(t.known_hosts))
        record = False
        known: Any = None
        listed = t.host_key_policy is not HostKeyPolicy.IGNORE and bool(_known_keys(asyncssh, path, t))
        if listed:
            known = str(path)
        elif t.host_key_policy is HostKeyPolicy.REJECT:
            known = ([], [], [])  # trust nothing: connect anyway, so unreachable shows first
        elif t.host_key_policy is HostKeyPolicy.ACCEPT_NEW:
            record = True
        try:
            conn = await asyncssh.connect(
                t.host, t.port, username=t.user, password=t.password, known_hosts=known,
                client_keys=None, agent_path=None, config=[], connect_timeout=t.timeout,
                preferred_auth="password,keyboard-interactive", keepalive_interval=0,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            why = "does not match" if listed else "is not listed in"
            raise AuthError(
                f"{t.where}: the SSH host key {why} {path} ({t.host_key_policy} policy)",
                host_key="changed" if listed else "unknown",
            ) from exc
        if record:
            try:
                _record_key(asyncssh, path, t, conn.get_server_host_key())
            except BaseException:
                conn.close()
                raise
        return conn

    def _call(self, coro_fn: Any, action: str) -> Any:
        async def body() -> Any:
            if self._conn is None:
                self._conn = await self._connect()
            return await coro_fn(self._conn)

        try:
            return _run(body(), self.target.timeout)
        except BaseException as exc:  # translated below; nothing escapes untranslated
            err = translate(exc, self.target, action)
            if not isinstance(err, AuthError | DeviceError) or self._conn is None:
                self.close()
            if err is exc:
                raise
            raise err from exc

    def connect(self) -> None:
        """Log in now (otherwise the first command does)."""
        self._call(lambda conn: _noop(), "connect")

    def run(self, command: str) -> CommandResult:
        """Run one command on its own channel; its stdout and stderr, and exit status."""

        async def go(conn: Any) -> CommandResult:
            proc = await conn.run(command, check=False, stderr=_asyncssh().STDOUT)
            out = proc.stdout if isinstance(proc.stdout, str) else (proc.stdout or b"").decode(
                "utf-8", "replace")
            return CommandResult(out, proc.exit_status)

        result: CommandResult = self._call(go, f"command {command.split()[0]!r}")
        return result

    def shell(self) -> SshShellChannel:
        """An interactive shell channel (with a terminal) on this login."""

        async def go(conn: Any) -> Any:
            return await conn.create_process(term_type="vt100", encoding="utf-8",
                                             errors="replace")

        return SshShellChannel(self, self._call(go, "shell"))

    def close(self) -> None:
        """Close the login. Never raises."""
        conn, self._conn = self._conn, None
        if conn is None:
            return

        async def shut() -> None:
            conn.close()
            await conn.wait_closed()

        try:
            _run(shut(), 2.0)
        except BaseException:  # noqa: BLE001 - closing must never raise
            pass


async def _noop() -> None:
    return None


class SshShellChannel:
    """The byte stream of an SSH shell, for :class:`CliShell`."""

    def __init__(self, session: SshSession, process: Any) -> None:
        self.session = session
        self.process = process

    def read(self, timeout: float) -> str:
        """Whatever arrives within ``timeout`` s ("" at end of stream); TimeoutError if none."""
        try:
            return _run(self.process.stdout.read(4096), timeout)  # type: ignore[no-any-return]
        except TimeoutError:
            raise
        except BaseException as exc:
            raise translate(exc, self.session.target, "read") from exc

    def write(self, text: str) -> None:
        self.process.stdin.write(text)

    def close(self) -> None:
        try:
            self.process.stdin.write_eof()
        except BaseException:  # noqa: BLE001 - closing must never raise
            pass
        self.session.close()


# -- telnet -----------------------------------------------------------------------------

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240


class TelnetChannel:
    """A minimal telnet client (RFC 854) on a plain socket.

    It offers no option and refuses every option the device asks for or offers (``DO x``
    -> ``WONT x``, ``WILL x`` -> ``DONT x``), skips subnegotiations and undoubles
    ``IAC IAC``. Text is decoded as UTF-8 (Latin-1 bytes are replaced).
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        try:
            self.sock = socket.create_connection((target.host, target.port), timeout=target.timeout)
        except BaseException as exc:
            raise translate(exc, target, "connect") from exc
        self._state = 0  # 0 data, 1 after IAC, 2 after IAC DO/DONT/WILL/WONT, 3 in SB, 4 SB+IAC
        self._verb = 0

    def __repr__(self) -> str:
        return f"TelnetChannel({self.target!r})"

    def _filter(self, data: bytes) -> bytes:
        out = bytearray()
        replies = bytearray()
        for byte in data:
            if self._state == 0:
                if byte == IAC:
                    self._state = 1
                else:
                    out.append(byte)
            elif self._state == 1:
                if byte == IAC:
                    out.append(IAC)
                    self._state = 0
                elif byte in (DO, DONT, WILL, WONT):
                    self._verb, self._state = byte, 2
                elif byte == SB:
                    self._state = 3
                else:  # NOP, GA, AYT...: ignored
                    self._state = 0
            elif self._state == 2:
                if self._verb == DO:
                    replies += bytes((IAC, WONT, byte))
                elif self._verb == WILL:
                    replies += bytes((IAC, DONT, byte))
                self._state = 0
            elif self._state == 3:
                if byte == IAC:
                    self._state = 4
            else:  # 4: IAC inside SB
                self._state = 0 if byte == SE else 3
        if replies:
            self.sock.sendall(bytes(replies))
        return bytes(out)

    def read(self, timeout: float) -> str:
        """Text received within ``timeout`` s ("" at end of stream); TimeoutError if none."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                raise
            except OSError as exc:
                raise translate(exc, self.target, "read") from exc
            if not data:
                return ""
            text = self._filter(data).decode("utf-8", "replace")
            if text:  # a chunk of negotiation only: keep reading
                return text

    def write(self, text: str) -> None:
        try:
            self.sock.sendall(text.encode("utf-8").replace(b"\xff", b"\xff\xff"))
        except OSError as exc:
            raise translate(exc, self.target, "write") from exc

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover - closing must never raise
            pass


# -- prompt-driven dialogue ---------------------------------------------------------------

USER_PROMPT = re.compile(r"(user ?name|login)\s*:\s*$", re.IGNORECASE)
PASSWORD_PROMPT = re.compile(r"password\s*:\s*$", re.IGNORECASE)
AUTH_REFUSED = re.compile(r"access denied|login incorrect|authentication failed|invalid (login|password)",
                          re.IGNORECASE)


class CliShell:
    """Send a line, read up to the next prompt, over an SSH shell or a telnet channel."""

    def __init__(self, channel: SshShellChannel | TelnetChannel, target: Target,
                 prompt: re.Pattern[str]) -> None:
        self.channel = channel
        self.target = target
        self.prompt = prompt
        self._buf = ""

    def __repr__(self) -> str:
        return f"CliShell({self.target!r})"

    def expect(self, *patterns: re.Pattern[str], action: str) -> tuple[int, str]:
        """Read until one of ``patterns`` matches the text received; its index and the
        text before the match. Raises busy / unreachable / timeout errors."""
        deadline = time.monotonic() + self.target.timeout
        while True:
            for i, pat in enumerate(patterns):
                m = pat.search(self._buf)
                if m:
                    before, self._buf = self._buf[: m.start()], self._buf[m.end():]
                    return i, before
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(CallTimeoutError(
                    f"{action} at {self.target.where}: no prompt within {self.target.timeout:g} s"))
            try:
                chunk = self.channel.read(left)
            except TimeoutError:
                continue
            if chunk == "":
                text = self.target.scrub(self._buf)
                if BUSY_TEXT.search(text):
                    self._fail(BusyError(f"{action} at {self.target.where}: no free session ({text})"))
                self._fail(UnreachableError(f"{action} at {self.target.where}: connection closed"))
            self._buf += chunk.replace("\r\n", "\n").replace("\r", "\n")

    def _fail(self, err: PowerError) -> NoReturn:
        self.close()
        raise err

    def start(self) -> None:
        """Wait for the first command prompt, answering the device's own ``Username:`` /
        ``Password:`` prompts (telnet, and SSH devices that ask again) with the target's
        credentials. A refused login raises AuthError, a full device BusyError."""
        i = self._first_prompt()
        if i == 1:
            self.channel.write(self.target.user + "\r\n")
            self.expect(PASSWORD_PROMPT, action="login")
            self.channel.write(self.target.password + "\r\n")
            self._first_prompt(after_login=True)

    def _first_prompt(self, after_login: bool = False) -> int:
        i, _ = self.expect(self.prompt, USER_PROMPT, AUTH_REFUSED, BUSY_TEXT, action="login")
        if (i == 1 and after_login) or i == 2:
            self._fail(AuthError(
                f"login at {self.target.where}: the device refused user {self.target.user!r} "
                "and its password"))
        if i == 3:
            self._fail(BusyError(f"login at {self.target.where}: no free session"))
        return i

    def command(self, line: str) -> str:
        """Send ``line``; the device's reply up to the next prompt, without the echo."""
        self.channel.write(line + "\r\n")
        _, reply = self.expect(self.prompt, action=f"command {line.split()[0]!r}")
        lines = reply.split("\n")
        if lines and lines[0].strip() == line.strip():
            lines = lines[1:]
        return "\n".join(lines)

    def close(self, logout: str = "") -> None:
        """Send ``logout`` (if given), close the channel. Never raises."""
        try:
            if logout:
                self.channel.write(logout + "\r\n")
        except BaseException:  # noqa: BLE001 - closing must never raise
            pass
        try:
            self.channel.close()
        except BaseException:  # noqa: BLE001 - closing must never raise
            pass


# -- the base of the SSH command drivers -------------------------------------------------


class SshCommandDriver(PowerDriver):
    """Base of drivers that run one command per action over one reused SSH login.

    Subclasses set ``settings_model`` to a :class:`CliSettings` subclass.
    """

    settings: CliSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._session: SshSession | None = None

    @property
    def target(self) -> Target:
        return Target.from_settings(self.settings, self.timeout)

    def bmc_key(self) -> str:
        """The device's address and port: one call at a time per device."""
        return f"{self.power_type}:{self.target.where}"

    def exec(self, command: str) -> CommandResult:
        """Run ``command``; a reply saying the device has no free session is BusyError."""
        if self._session is None:
            self._session = SshSession(self.target)
        result = self._session.run(command)
        if BUSY_TEXT.search(result.output):
            raise BusyError(f"{self.power_type} at {self.target.where}: no free session "
                            f"({self.target.scrub(result.output)})")
        return result

    def close(self) -> None:
        """Log out. Never raises."""
        session, self._session = self._session, None
        if session is not None:
            session.close()
