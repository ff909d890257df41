"""IPMI 2.0 / RMCP+ on the wire: packet framing, the RAKP handshake, session keys.

No sockets and no asyncio here: :mod:`drivers.rmcpplus` does the IO. What this module
implements, by section of the IPMI v2.0 (rev. 1.1) specification:

- RMCP header (13.1.3), IPMI 2.0 session header and trailer (13.6, 13.8; table 13-8):
  auth type 6, payload type with its *encrypted* (0x80) and *authenticated* (0x40) bits,
  session id, session sequence number, payload length, integrity pad (0xFF up to a
  multiple of four bytes), pad length, next header 0x07 and the integrity code.
- Open Session Request / Response (13.17, 13.18), RAKP 1-4 (13.20-13.23); the role byte
  of RAKP 1 carries the *name-only lookup* bit, as ipmitool and pyghmi send it.
- Key derivation (13.31, 13.32): ``SIK = HMAC_Kg(Rm | Rc | role | ulen | uname)`` with
  ``Kg`` the BMC key or, without one, the user's password ``Kuid``;
  ``K1 = HMAC_SIK(0x01 * 20)``, ``K2 = HMAC_SIK(0x02 * 20)``; the AES key is ``K2[:16]``.
- AES-CBC-128 confidentiality (13.29): 16-byte IV, pad bytes 1, 2, 3 ... then the pad
  length, to a multiple of 16. CBC is done over one reusable AES-ECB context per
  direction (the XOR chaining in Python), which costs less than a new ``Cipher`` per packet.
- IPMI LAN messages (13.8 / IPMB framing): rsAddr, netFn/LUN, checksum, rqAddr,
  rqSeq/LUN, command, data, checksum.

Cipher suites served: 3 (RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128) and 17
(RAKP-HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128).

Secrets (password, ``Kg``, ``SIK``, ``K1``, ``K2``) live only in :class:`Target`,
:class:`Login` and :class:`SessionCrypto`, whose ``repr`` never shows them.

The end of the module holds the client-side state kept per BMC login (:class:`Target`,
:class:`SessionState`, its :class:`Pending` exchange) and the in-flight bound
(:class:`Slots`), used by :class:`drivers.rmcpplus.LanplusClient`.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import (
    AuthError,
    BusyError,
    CallTimeoutError,
    DeviceError,
    PowerError,
    SettingsError,
    UnsupportedError,
)

RMCP_HEADER = b"\x06\x00\xff\x07"  # RMCP version 1.0, reserved, no ACK, class IPMI
AUTH_RMCPPLUS = 6

PT_IPMI = 0x00
PT_OPEN_REQUEST = 0x10
PT_OPEN_RESPONSE = 0x11
PT_RAKP1 = 0x12
PT_RAKP2 = 0x13
PT_RAKP3 = 0x14
PT_RAKP4 = 0x15
ENCRYPTED = 0x80
AUTHENTICATED = 0x40
NAME_ONLY_LOOKUP = 0x10

BMC_ADDRESS = 0x20
REMOTE_CONSOLE_ADDRESS = 0x81

PRIV_USER = 2
PRIV_OPERATOR = 3
PRIV_ADMINISTRATOR = 4
PRIVILEGES = {"USER": PRIV_USER, "OPERATOR": PRIV_OPERATOR, "ADMINISTRATOR": PRIV_ADMINISTRATOR}


@dataclass(frozen=True)
class CipherSuite:
    """One RMCP+ cipher suite (IPMI 2.0 table 22-20)."""

    id: int
    auth: int
    """Authentication algorithm number (table 13-17)."""
    integrity: int
    """Integrity algorithm number (table 13-18)."""
    confidentiality: int
    """Confidentiality algorithm number (table 13-19)."""
    digest: str
    """hashlib name of the HMAC's hash."""
    auth_len: int
    """Length of the RAKP 2 / RAKP 3 key exchange authentication code."""
    icv_len: int
    """Length of the RAKP 4 integrity check value and of every packet's integrity code."""


SUITES: dict[int, CipherSuite] = {
    3: CipherSuite(3, auth=1, integrity=1, confidentiality=1, digest="sha1", auth_len=20, icv_len=12),
    17: CipherSuite(17, auth=3, integrity=4, confidentiality=1, digest="sha256", auth_len=32, icv_len=16),
}

# RMCP+ status codes (IPMI 2.0 table 13-15) that mean "not this cipher suite": with no
# suite fixed, the client proposes 17 and falls back to 3 on one of these.
SUITE_REFUSED = frozenset({0x04, 0x05, 0x06, 0x07, 0x10, 0x11})

RMCP_STATUS: dict[int, tuple[type[PowerError], str]] = {
    0x01: (BusyError, "insufficient resources to create a session"),
    0x02: (CallTimeoutError, "invalid session id"),
    0x03: (DeviceError, "invalid payload type"),
    0x04: (UnsupportedError, "invalid authentication algorithm"),
    0x05: (UnsupportedError, "invalid integrity algorithm"),
    0x06: (UnsupportedError, "no matching authentication payload"),
    0x07: (UnsupportedError, "no matching integrity payload"),
    0x08: (CallTimeoutError, "inactive session id"),
    0x09: (AuthError, "invalid role (above the user's privilege limit)"),
    0x0A: (AuthError, "unauthorized role or privilege level"),
    0x0B: (BusyError, "insufficient resources at the requested role"),
    0x0C: (AuthError, "invalid user name length"),
    0x0D: (AuthError, "unauthorized name (unknown user or wrong password)"),
    0x0E: (AuthError, "unauthorized GUID"),
    0x0F: (AuthError, "invalid integrity check value (wrong password or K_g)"),
    0x10: (UnsupportedError, "invalid confidentiality algorithm"),
    0x11: (UnsupportedError, "no cipher suite match"),
    0x12: (AuthError, "illegal or unrecognized parameter"),
}
# In a RAKP 2, "invalid session id" and "illegal parameter" are how some BMCs refuse a
# user name: both are an authentication failure there.
RAKP2_AUTH_STATUS = frozenset({0x02, 0x0D, 0x12})

COMPLETION_CODES: dict[int, tuple[type[PowerError], str]] = {
    0x80: (UnsupportedError, "parameter not supported"),
    0x81: (AuthError, "requested privilege level not available"),
    0x82: (AuthError, "privilege level above the user's limit"),
    0xC0: (BusyError, "node busy"),
    0xC1: (UnsupportedError, "invalid command"),
    0xC3: (CallTimeoutError, "timeout while processing the command"),
    0xC7: (DeviceError, "request data length invalid"),
    0xCC: (DeviceError, "invalid data field in request"),
    0xCE: (BusyError, "command response could not be provided"),
    0xD1: (BusyError, "device in firmware update mode"),
    0xD2: (BusyError, "BMC initialization in progress"),
    0xD4: (AuthError, "insufficient privilege level"),
    0xD5: (DeviceError, "command not supported in present state"),
    0xD6: (UnsupportedError, "command sub-function disabled or unavailable"),
}


def rmcp_status_error(status: int, where: str) -> PowerError:
    cls, text = RMCP_STATUS.get(status, (DeviceError, "error"))
    return cls(f"{where}: RMCP+ status 0x{status:02x}, {text}", rmcp_status=status)


def completion_code_error(code: int, where: str) -> PowerError:
    cls, text = COMPLETION_CODES.get(code, (DeviceError, "error"))
    return cls(f"{where}: completion code 0x{code:02x}, {text}", ipmi_code=code)


# -- framing ----------------------------------------------------------------------------

_HEADER = struct.Struct("<BBIIH")  # auth type, payload type, session id, sequence, length
_PADS = tuple(bytes(range(1, n + 1)) + bytes([n]) for n in range(16))  # AES pad + pad length
_TRAILERS = tuple(b"\xff" * n + bytes([n, 7]) for n in range(4))  # integrity pad, length, 0x07


def handshake_packet(ptype: int, payload: bytes) -> bytes:
    """A session-less RMCP+ packet (open session, RAKP): session id and sequence 0."""
    return RMCP_HEADER + _HEADER.pack(AUTH_RMCPPLUS, ptype, 0, 0, len(payload)) + payload


def handshake_payload(data: bytes) -> tuple[int, bytes] | None:
    """``(payload type, payload)`` of an RMCP+ handshake reply, or None if malformed."""
    if len(data) < 16 + 8 or data[4] != AUTH_RMCPPLUS:
        return None
    length = data[14] | data[15] << 8
    if 16 + length > len(data):
        return None
    return data[5] & 0x3F, data[16:16 + length]


def ipmi_request(netfn: int, cmd: int, rqseq: int, data: bytes = b"") -> bytes:
    """An IPMI LAN request message to the BMC (LUN 0)."""
    first = BMC_ADDRESS + (netfn << 2)
    body = bytes([REMOTE_CONSOLE_ADDRESS, (rqseq & 0x3F) << 2, cmd]) + data
    return bytes([BMC_ADDRESS, netfn << 2, -first & 0xFF]) + body + bytes([-sum(body) & 0xFF])


def ipmi_response(payload: bytes) -> tuple[int, int, int, int, bytes] | None:
    """``(netfn, rqseq, cmd, completion code, data)`` of a LAN response, None if malformed."""
    if len(payload) < 8 or sum(payload[:3]) & 0xFF or sum(payload[3:]) & 0xFF:
        return None
    return payload[1] >> 2, payload[4] >> 2, payload[5], payload[6], payload[7:-1]


# -- handshake --------------------------------------------------------------------------


def open_session_request(tag: int, privilege: int, console_sid: bytes, suite: CipherSuite) -> bytes:
    """Open Session Request payload (13.17) proposing exactly ``suite``."""
    return bytes([tag, privilege, 0, 0]) + console_sid + bytes([
        0, 0, 0, 8, suite.auth, 0, 0, 0,
        1, 0, 0, 8, suite.integrity, 0, 0, 0,
        2, 0, 0, 8, suite.confidentiality, 0, 0, 0,
    ])


@dataclass(frozen=True)
class OpenSessionResponse:
    tag: int
    status: int
    bmc_sid: bytes
    algorithms: tuple[int, int, int]


def parse_open_session_response(payload: bytes) -> OpenSessionResponse | None:
    if len(payload) < 8:
        return None
    if payload[1] != 0:
        return OpenSessionResponse(payload[0], payload[1], b"", (0, 0, 0))
    if len(payload) < 36:
        return None
    algorithms = (payload[16] & 0x3F, payload[24] & 0x3F, payload[32] & 0x3F)
    return OpenSessionResponse(payload[0], 0, bytes(payload[8:12]), algorithms)


class Login:
    """The secret state of one RAKP exchange. Never printed: no field appears in repr."""

    __slots__ = ("suite", "console_sid", "bmc_sid", "role", "user", "_kuid", "_kg", "_rm",
                 "_rc", "_guid", "_sik")

    def __init__(self, suite: CipherSuite, console_sid: bytes, bmc_sid: bytes, user: bytes,
                 password: bytes, kg: bytes | None, privilege: int) -> None:
        self.suite = suite
        self.console_sid = console_sid
        self.bmc_sid = bmc_sid
        self.role = privilege | NAME_ONLY_LOOKUP
        self.user = user
        self._kuid = password
        self._kg = kg or password
        self._rm = os.urandom(16)
        self._rc = b""
        self._guid = b""
        self._sik = b""

    def __repr__(self) -> str:
        return f"Login(suite={self.suite.id})"

    def _hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self.suite.digest)

    def rakp1(self, tag: int) -> bytes:
        return (bytes([tag, 0, 0, 0]) + self.bmc_sid + self._rm
                + bytes([self.role, 0, 0, len(self.user)]) + self.user)

    def check_rakp2(self, payload: bytes) -> int:
        """The RAKP 2 status; -1 when it is 0 but the BMC's code does not match ours
        (a wrong password), -2 when the message is malformed."""
        if len(payload) < 8 or payload[4:8] != self.console_sid:
            return -2
        if payload[1]:
            return payload[1]
        if len(payload) < 40 + self.suite.auth_len:
            return -2
        self._rc, self._guid = bytes(payload[8:24]), bytes(payload[24:40])
        mine = self._hmac(self._kuid, self.console_sid + self.bmc_sid + self._rm + self._rc
                          + self._guid + bytes([self.role, len(self.user)]) + self.user)
        return 0 if hmac.compare_digest(mine, payload[40:40 + self.suite.auth_len]) else -1

    def rakp3(self, tag: int, status: int = 0) -> bytes:
        if status:
            return bytes([tag, status, 0, 0]) + self.bmc_sid
        code = self._hmac(self._kuid, self._rc + self.console_sid
                          + bytes([self.role, len(self.user)]) + self.user)
        return bytes([tag, 0, 0, 0]) + self.bmc_sid + code

    def check_rakp4(self, payload: bytes) -> int:
        """The RAKP 4 status; -1 when the integrity check value does not match (K_g), -2
        when the message is malformed (too short to hold one)."""
        if len(payload) < 8 or payload[4:8] != self.console_sid:
            return -2
        if payload[1]:
            return payload[1]
        if len(payload) < 8 + self.suite.icv_len:
            return -2
        self._sik = self._hmac(self._kg, self._rm + self._rc + bytes([self.role, len(self.user)])
                               + self.user)
        icv = self._hmac(self._sik, self._rm + self.bmc_sid + self._guid)[:self.suite.icv_len]
        return 0 if hmac.compare_digest(icv, payload[8:8 + self.suite.icv_len]) else -1

    def session(self) -> SessionCrypto:
        """The keys of the established session (after a good RAKP 4)."""
        k1 = self._hmac(self._sik, b"\x01" * 20)
        k2 = self._hmac(self._sik, b"\x02" * 20)
        return SessionCrypto(self.suite, self.console_sid, self.bmc_sid, k1, k2[:16])


class SessionCrypto:
    """Seals requests and opens replies of one established session (integrity + AES)."""

    __slots__ = ("suite", "console_sid", "bmc_sid", "_bmc_sid_int", "_k1", "_enc", "_dec",
                 "_digest", "_icv")

    def __init__(self, suite: CipherSuite, console_sid: bytes, bmc_sid: bytes, k1: bytes,
                 aes_key: bytes) -> None:
        self.suite = suite
        self.console_sid = console_sid
        self.bmc_sid = bmc_sid
        self._bmc_sid_int = int.from_bytes(bmc_sid, "little")
        self._k1 = k1
        aes = algorithms.AES(aes_key)
        self._enc = Cipher(aes, modes.ECB()).encryptor()
        self._dec = Cipher(aes, modes.ECB()).decryptor()
        self._digest = suite.digest
        self._icv = suite.icv_len

    def __repr__(self) -> str:
        return f"SessionCrypto(suite={self.suite.id})"

    def seal(self, seq: int, payload: bytes, ptype: int = PT_IPMI) -> bytes:
        """The whole datagram: RMCP header, session header, IV + AES-CBC payload, trailer."""
        plain = payload + _PADS[-(len(payload) + 1) % 16]
        iv = prev = os.urandom(16)
        blocks = [iv]
        update = self._enc.update
        for i in range(0, len(plain), 16):
            block = int.from_bytes(plain[i:i + 16], "big") ^ int.from_bytes(prev, "big")
            prev = update(block.to_bytes(16, "big"))
            blocks.append(prev)
        body = b"".join(blocks)
        msg = _HEADER.pack(AUTH_RMCPPLUS, ptype | ENCRYPTED | AUTHENTICATED, self._bmc_sid_int,
                           seq, len(body)) + body
        msg += _TRAILERS[-(len(msg) + 2) % 4]
        return RMCP_HEADER + msg + hmac.digest(self._k1, msg, self._digest)[:self._icv]

    def open(self, data: bytes) -> bytes | None:
        """The clear payload of an authenticated, encrypted reply; None if not genuine."""
        icv = self._icv
        if len(data) < 16 + 32 + 2 + icv or data[5] & 0xC0 != 0xC0:
            return None
        length = data[14] | data[15] << 8
        if length < 32 or length % 16 or 16 + length + 2 + icv > len(data):
            return None
        if not hmac.compare_digest(hmac.digest(self._k1, data[4:-icv], self._digest)[:icv],
                                   data[-icv:]):
            return None
        iv_ct = data[16:16 + length]
        clear = self._dec.update(iv_ct[16:])
        plain = (int.from_bytes(clear, "big") ^ int.from_bytes(iv_ct[:-16], "big")).to_bytes(
            len(clear), "big")
        pad = plain[-1]
        if pad > 15 or pad + 1 > len(plain):
            return None
        return plain[:-pad - 1]


# -- what the client keeps per target ---------------------------------------------------------

CHASSIS_ACTIONS = {"off": 0, "on": 1, "cycle": 2, "reset": 3, "diag": 4, "soft": 5}
BOOT_DEVICES = {
    "none": 0, "default": 0, "pxe": 1, "network": 1, "disk": 2, "hd": 2, "safe": 3,
    "diag": 4, "cdrom": 5, "cd": 5, "bios": 6, "setup": 6, "floppy": 15,
}


@dataclass(frozen=True)
class Target:
    """One BMC login; hashable, the key of its session. ``repr`` never shows secrets."""

    host: str
    port: int = 623
    username: str = ""
    password: str = field(default="", repr=False)
    kg: str | None = field(default=None, repr=False)
    privilege: str = "ADMINISTRATOR"
    """USER, OPERATOR or ADMINISTRATOR (ADMIN accepted)."""
    cipher_suite: int | None = None
    """3 or 17; None: propose 17, fall back to 3."""

    def __post_init__(self) -> None:
        priv = str(self.privilege).upper()
        priv = "ADMINISTRATOR" if priv == "ADMIN" else priv
        if priv not in PRIVILEGES:
            raise SettingsError(f"ipmi {self.host}: privilege must be USER, OPERATOR or ADMINISTRATOR")
        object.__setattr__(self, "privilege", priv)
        if not isinstance(self.host, str) or not self.host.strip():
            raise SettingsError("ipmi: the BMC address must not be empty")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise SettingsError(f"ipmi {self.host}: port must be between 1 and 65535")
        if len(self.username.encode()) > 16:
            raise SettingsError(f"ipmi {self.host}: IPMI user names are at most 16 bytes")
        if len(self.password.encode()) > 20:
            raise SettingsError(f"ipmi {self.host}: IPMI 2.0 passwords are at most 20 bytes")
        if self.kg is not None and len(self.kg.encode()) > 20:
            raise SettingsError(f"ipmi {self.host}: K_g is at most 20 bytes")
        if self.cipher_suite not in (None, 3, 17):
            raise SettingsError(f"ipmi {self.host}: cipher suite must be 3 or 17")

    def __repr__(self) -> str:
        return (f"Target(host={self.host!r}, port={self.port}, username={self.username!r}, "
                f"privilege={self.privilege!r}, cipher_suite={self.cipher_suite!r})")

    __str__ = __repr__


class Pending:
    """The one outstanding exchange of a session."""

    __slots__ = ("fut", "ptype", "tag", "netfn", "rqseq", "cmd", "packet", "rebuild", "sends",
                 "limit", "deadline", "handle")

    def __init__(self, fut: asyncio.Future[Any], ptype: int, packet: bytes, limit: int,
                 deadline: float) -> None:
        self.fut = fut
        self.ptype = ptype
        self.tag = -1
        self.netfn = self.rqseq = self.cmd = -1
        self.packet = packet
        self.rebuild: Callable[[], bytes] | None = None
        self.sends = 1
        self.limit = limit
        self.deadline = deadline
        self.handle: asyncio.TimerHandle | None = None


class Slots:
    """A counting semaphore handing a freed slot straight to the oldest waiter: O(1) per
    release (asyncio.Semaphore scans its waiters on every release)."""

    __slots__ = ("free", "waiters")

    def __init__(self, size: int) -> None:
        self.free = size
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        fut: asyncio.Future[None] = loop.create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot, then cancelled before using it
            raise

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


class SessionState:
    """One BMC login of the client: its socket, keys, sequence numbers, pending exchange."""

    __slots__ = ("target", "where", "lock", "addr", "sock", "crypto", "console_sid", "priv",
                 "seq", "rqseq", "tag", "last_used", "last_call", "pending", "slot")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.where = f"ipmi {target.host}:{target.port}"
        self.lock = asyncio.Lock()
        self.addr: tuple[Any, ...] = ()
        self.sock: socket.socket | None = None
        self.crypto: SessionCrypto | None = None
        self.console_sid = b""
        self.priv = PRIV_USER
        self.seq = 0
        self.rqseq = 0
        self.tag = 0
        self.last_used = 0.0
        self.last_call = 0.0
        """Loop time of the last call a user made in it (keep-alives left out)."""
        self.pending: Pending | None = None
        self.slot = 0

    def __repr__(self) -> str:
        return f"SessionState({self.target!r}, established={self.crypto is not None})"
