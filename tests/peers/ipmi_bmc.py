"""A simulated IPMI fleet: pyghmi's BMC server (``pyghmi.ipmi.bmc.Bmc``) as the peer.

The IPMI 2.0 / RMCP+ server code (open session, RAKP 1-4, integrity, AES, message
framing) is pyghmi's, written by others. This module only hosts many of those BMCs in
one process and fixes the traps listed in ``/work/shared/PEERS.md``:

- every simulated BMC binds its own loopback address (``127.x.y.z``), port 623 by
  default, and keeps its *own* session table keyed by client address (pyghmi keys its
  global table by client address and BMC port, which collides when every BMC uses 623);
- receiving is non-blocking, on one epoll loop per shard; every packet is handled in
  that one thread (no receive/send race between client sessions); pyghmi's own IO
  thread is never started;
- the open-session response refuses every proposal but cipher suite 3 with RMCP+ status
  0x11, so pyghmi clients (which propose suite 17 first) fall back to 3 instead of
  failing on a SHA-1 reply to a SHA-256 proposal;
- a retransmitted handshake packet (open session, RAKP 1, RAKP 3) is answered with the
  very reply sent the first time, and a retransmitted IPMI request with the same reply
  without acting twice; a closed session lingers ``CLOSED_LINGER`` seconds to answer a
  resent Close Session (else FreeIPMI waits out its 20 s session timeout when the first
  reply came late);
- replies are delayed on a timer heap, so an injected latency never blocks other BMCs:
  a fleet-wide ``latency`` with ``jitter`` (spec keys, seconds; default 0) and the
  ``slow`` fault's latency on top;
- FreeIPMI resends RAKP 1 and RAKP 3 with a new message tag (not byte-identical): a
  repeated RAKP 1 is answered with the same random number under the new tag, a repeated
  RAKP 3 after the session is up with RAKP 4 again, unencrypted as the first one (pyghmi's
  own code would encrypt it and restart the sequence numbers, and the client would then
  time out).

Behaviour of one BMC: chassis power on / off / cycle / hard reset / soft off, Get
Chassis Status, Set / Get System Boot Options (boot flags, parameter 5: device, EFI,
persistent), Get Device ID, session privilege (chassis control and boot options need
OPERATOR, else completion code 0xD4), a session limit (``max_sessions``, then RMCP+
status 0x01) and an idle expiry (``session_timeout``). A boot (off -> on, cycle, reset)
consumes a one-time boot override: ``boot`` goes back to ``None`` and ``booted_from``
records where the node booted. Power cycle or reset of a node that is off answers 0xD5
(command not supported in present state), as many BMCs do.

User accounts (for BMC enlistment): a user table per BMC of ``max_users`` slots (spec
key ``max_users``, default 16; user 1 is the null user, the node's ``power_user`` is
user 2 with ADMINISTRATOR rights). Get Channel Info (LAN channel 1; 0x0E = this one),
Get / Set User Access, Get / Set User Name and Set User Password (disable, enable,
set 16- or 20-byte password, test: 0x80 on a mismatch) behave as IPMI 2.0 section 22
says; the Set commands need an ADMINISTRATOR session (else 0xD4). A login succeeds for an
enabled user with IPMI messaging on, and only up to that user's privilege limit (RAKP 2
status 0x09, invalid role, above it). ``GET /nodes`` lists the named or enabled slots as
``accounts`` (uid, name, enabled, privilege, ipmi_msg: never a password) and
``max_users``.

Counts (control API ``GET /nodes``): ``on``, ``off``, ``soft_off``, ``cycle``,
``reset``, ``boot`` (boot flags set), ``query`` (Get Chassis Status), ``sessions``
(login attempts: RAKP 1 received), ``open_sessions`` (established, not closed or
expired), plus ``established``, ``auth_failed``, ``refused`` (sessions or commands
refused as busy), ``retransmits``, ``users`` (Set User Name / Access / Password
requests accepted). Actions refused (busy, privilege) are not counted.

Start times (``GET /nodes``, for power budgets): ``power_on_times``, ``cycle_times`` and
``reset_times`` list the wall-clock time (``time.time()``, epoch seconds, this host's
clock) at which the BMC executed each Chassis Control power on, power cycle and hard
reset: one entry per ``on`` / ``cycle`` / ``reset`` count, a power on of a node already
on included. Cleared with the counts.

Faults (``POST /nodes/<name>/fault``): ``no_answer`` drops every packet; ``slow`` delays
every reply by ``latency`` more seconds (default 1 s); ``auth`` refuses every login (RAKP 2
status 0x0D, unauthorized name); ``busy`` refuses new sessions (RMCP+ status 0x01,
insufficient resources) and answers commands in open sessions with completion code
0xC0 (node busy).

Run one shard: ``python -m tests.peers.ipmi_bmc --spec FILE --control-port N``, where
FILE is JSON ``{"nodes": [SimNode.to_json(), ...], "max_sessions": 16,
"session_timeout": 60, "max_users": 16, "latency": 0.05, "jitter": 0.01}``. From Python, use :func:`make_nodes` and :func:`start_fleet`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import heapq
import hmac
import ipaddress
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyghmi.ipmi import bmc as pyghmi_bmc
from pyghmi.ipmi.private import constants, serversession

from tests.peers.common import PeerControl, SimNode, free_port, raise_open_files, serve_control

REPO_ROOT = Path(__file__).resolve().parents[2]

COUNT_KEYS = (
    "on", "off", "soft_off", "cycle", "reset", "boot", "query", "sessions",
    "established", "auth_failed", "refused", "retransmits", "users",
)
TIMED_KEYS = ("on", "cycle", "reset")
"""Counts whose every occurrence also records when it was executed (``power_on_times``,
``cycle_times``, ``reset_times`` in a node's snapshot)."""

# RMCP+ status codes (IPMI 2.0 table 13-15)
RMCP_INSUFFICIENT_RESOURCES = 0x01
RMCP_INVALID_SESSION_ID = 0x02
RMCP_INVALID_ROLE = 0x09
RMCP_UNAUTHORIZED_NAME = 0x0D
RMCP_INVALID_INTEGRITY_CHECK = 0x0F
RMCP_NO_CIPHER_SUITE_MATCH = 0x11

# IPMI completion codes
CC_NODE_BUSY = 0xC0
CC_INVALID_COMMAND = 0xC1
CC_INVALID_DATA = 0xCC
CC_PARAM_NOT_SUPPORTED = 0x80
CC_INSUFFICIENT_PRIVILEGE = 0xD4
CC_NOT_IN_PRESENT_STATE = 0xD5
CC_PASSWORD_TEST_FAILED = 0x80
CC_PASSWORD_WRONG_SIZE = 0x81
CC_REQUEST_LENGTH_INVALID = 0xC7

PRIV_OPERATOR = 3
PRIV_ADMIN = 4
PRIV_NO_ACCESS = 0x0F
PRIV_NAMES = {1: "CALLBACK", 2: "USER", 3: "OPERATOR", 4: "ADMINISTRATOR", 5: "OEM",
              PRIV_NO_ACCESS: "NO_ACCESS"}

LAN_CHANNEL = 1
THIS_CHANNEL = 0x0E
DEFAULT_MAX_USERS = 16


@dataclass
class BmcUser:
    """One slot of a BMC's user table (IPMI 2.0 section 22.26-22.30)."""

    name: str = ""
    password: str = ""
    enabled: bool = False
    privilege: int = PRIV_NO_ACCESS  # the user's privilege limit on the LAN channel
    ipmi_msg: bool = False
    link_auth: bool = False
    callback: bool = False

    def can_login(self) -> bool:
        return self.enabled and self.ipmi_msg and 1 <= self.privilege <= 5

# boot device selector (Set System Boot Options, parameter 5, data 2 bits 5:2)
BOOT_DEVICES = {1: "pxe", 2: "disk", 3: "safe", 5: "cdrom", 6: "bios", 15: "floppy"}
BOOT_SELECTORS = {name: sel for sel, name in BOOT_DEVICES.items()}

HANDSHAKE_TYPES = (0x10, 0x12, 0x14)  # open session request, RAKP 1, RAKP 3

PENDING_SESSION_TIMEOUT = 10.0
CLOSED_LINGER = 10.0
"""Seconds a closed session is remembered, to answer a retransmitted Close Session."""


class _Wire:
    """What pyghmi's server code takes for its socket: every reply goes through here."""

    def __init__(self, bmc: SimBmc, sock: socket.socket) -> None:
        self.bmc = bmc
        self.sock = sock

    def setblocking(self, flag: int) -> None:  # pyghmi's _io_sendto calls this
        pass

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def sendto(self, packet: bytes | bytearray, addr: Any) -> None:
        data = bytes(packet)
        if self.bmc.capture is not None:
            self.bmc.capture.append(data)
        self.bmc.shard.send(self.bmc, data, addr)


class SimSession(serversession.ServerSession):
    """One client session of one simulated BMC (pyghmi's server session, own table)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> SimSession:
        return object.__new__(cls)

    def __init__(self, bmc: SimBmc, clientaddr: Any, request: bytes) -> None:
        # pyghmi's ServerSession.__init__, minus its registration in the global,
        # client-address-keyed handler table.
        self.uuid = bmc.uuid
        self.currhashlib = hashlib.sha1
        self.currhashlen = 12
        self.rqaddr = constants.IPMI_BMC_ADDRESS
        self.authdata = bmc.authdata
        self.servermode = True
        self.ipmiversion = 2.0
        self.sequencenumber = 0
        self.sessionid = 0
        self.bmc = bmc
        self.lastpayload = None
        self.rqlun = None
        self.broken = False
        self.authtype = 6
        self.integrityalgo = 0
        self.confalgo = 0
        self.kg = bmc.kg
        self.k1 = None
        self.socket = bmc.serversocket
        self.sockaddr = clientaddr
        self.pendingpayloads: deque[Any] = deque()
        self.pktqueue: deque[Any] = deque()
        self.clientpriv = 1
        self.maxpriv = 0
        self.refused = False
        self.established = False
        self.last_seen = time.monotonic()
        self.handshake_replies: dict[bytes, list[bytes]] = {}
        self.last_request: bytes | None = None
        self.last_reply: bytes | None = None
        self.closed = False
        response = self.create_open_session_response(bytearray(request))
        self.send_payload(
            response, constants.payload_types["rmcpplusopenresponse"], retry=False
        )

    # -- handshake -----------------------------------------------------------------

    def create_open_session_response(self, request: bytearray) -> bytearray:
        clienttag = request[0]
        self.clientsessionid = request[4:8]
        status = 0
        if len(request) < 32 or (request[12] & 0x3F, request[20] & 0x3F, request[28] & 0x3F) != (1, 1, 1):
            # only cipher suite 3 (RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128) is served
            status = RMCP_NO_CIPHER_SUITE_MATCH
        elif self.bmc.fault == "busy" or self.bmc.sessions_full(self.sockaddr):
            status = RMCP_INSUFFICIENT_RESOURCES
        if status:
            self.refused = True
            if status == RMCP_INSUFFICIENT_RESOURCES:
                self.bmc.counts["refused"] += 1
            return bytearray([clienttag, status, 0, 0]) + self.clientsessionid
        self.managedsessionid = os.urandom(4)
        requested = request[1] & 0x0F
        self.privlevel = requested if 0 < requested <= 4 else 4
        return (
            bytearray([clienttag, 0, self.privlevel, 0])
            + self.clientsessionid
            + self.managedsessionid
            + bytearray([
                0, 0, 0, 8, 1, 0, 0, 0,  # auth: RAKP-HMAC-SHA1
                1, 0, 0, 8, 1, 0, 0, 0,  # integrity: HMAC-SHA1-96
                2, 0, 0, 8, 1, 0, 0, 0,  # confidentiality: AES-CBC-128
            ])
        )

    def _got_rmcp_openrequest(self, data: Any) -> None:
        pass  # a new open request from the same client makes a new session instead

    def _rakp2_error(self, clienttag: int, status: int) -> None:
        self.send_payload(
            bytearray([clienttag, status, 0, 0]) + self.clientsessionid,
            constants.payload_types["rakp2"],
            retry=False,
        )

    def _send_setup_payload(self, payload: bytearray, payload_type: int) -> None:
        """Send a session-setup payload (RAKP 2 / 4) as sent before the session was
        established: session id 0, sequence 0, no integrity, no encryption."""
        saved = (self.integrityalgo, self.confalgo, self.sessionid, self.sequencenumber)
        self.integrityalgo = self.confalgo = 0
        self.sessionid = self.sequencenumber = 0
        try:
            serversession.ServerSession.send_payload(self, payload, payload_type, retry=False)
        finally:
            self.integrityalgo, self.confalgo, self.sessionid, self.sequencenumber = saved

    def _got_rakp1(self, data: Any) -> None:
        clienttag = data[0]
        if self.established:
            return  # a late RAKP 1: the client has moved on
        if (hasattr(self, "Rc") and bytes(data[8:24]) == bytes(self.Rm)
                and data[24] == self.rolem and bytes(data[28:28 + data[27]]) == self.username):
            # FreeIPMI retransmits RAKP 1 with a new message tag (so not byte-identical):
            # answer with the same managed-system random number, under the new tag.
            self.bmc.counts["retransmits"] += 1
            self._send_setup_payload(
                bytearray([clienttag]) + self._rakp2_body[1:], constants.payload_types["rakp2"])
            return
        self.bmc.counts["sessions"] += 1
        if bytes(data[4:8]) != bytes(self.managedsessionid):
            self._rakp2_error(clienttag, RMCP_INVALID_SESSION_ID)
            return
        self.Rm = data[8:24]
        self.rolem = data[24]
        self.maxpriv = self.rolem & 0b111
        self.username = bytes(data[28:28 + data[27]])
        name = self.username.decode("utf-8", "replace")
        password = self.authdata.get(name)
        if password is None or self.bmc.fault == "auth":
            self.bmc.counts["auth_failed"] += 1
            self._rakp2_error(clienttag, RMCP_UNAUTHORIZED_NAME)
            return
        limit = self.bmc.privilege_limit(name)
        if (self.rolem & 0x0F) > limit:
            self.bmc.counts["auth_failed"] += 1
            self._rakp2_error(clienttag, RMCP_INVALID_ROLE)
            return
        self.maxpriv = min(self.maxpriv, limit)
        self.uuiddata = self.uuid.bytes
        self.Rc = os.urandom(16)
        hmacdata = (
            self.clientsessionid + self.managedsessionid + self.Rm + self.Rc
            + self.uuiddata + bytearray([self.rolem, len(self.username)]) + self.username
        )
        self.kuid = password.encode("utf-8")
        if self.kg is None:
            self.kg = self.kuid
        authcode = hmac.new(self.kuid, bytes(hmacdata), hashlib.sha1).digest()
        self._rakp2_body = (bytearray([clienttag, 0, 0, 0]) + self.clientsessionid + self.Rc
                            + self.uuiddata + authcode)
        self.send_payload(self._rakp2_body, constants.payload_types["rakp2"], retry=False)

    def _got_rakp3(self, data: Any) -> None:
        if not hasattr(self, "Rc"):
            return
        if data[1] != 0:  # the client did not like our RAKP 2 (wrong password)
            return
        if self.established:
            # FreeIPMI retransmits RAKP 3 with a new message tag when RAKP 4 came late:
            # answer again, as before the session was established (pyghmi's own code
            # would now encrypt RAKP 4 and restart the sequence numbers).
            if hmac.compare_digest(bytes(self._rakp3_code), bytes(data[8:])):
                self.bmc.counts["retransmits"] += 1
                self._send_setup_payload(
                    bytearray([data[0]]) + self._rakp4_body[1:], constants.payload_types["rakp4"])
            return
        rm_rc = self.Rm + self.Rc
        hmacdata = (
            self.Rc + self.clientsessionid
            + struct.pack("2B", self.rolem, len(self.username)) + self.username
        )
        expected = hmac.new(self.kuid, bytes(hmacdata), hashlib.sha1).digest()
        if expected != bytes(data[8:]):
            self.bmc.counts["auth_failed"] += 1
            payload = bytearray([data[0], RMCP_INVALID_INTEGRITY_CHECK, 0, 0]) + self.clientsessionid
            self.send_payload(payload, constants.payload_types["rakp4"], retry=False)
            return
        self.sik = hmac.new(
            self.kg,
            bytes(rm_rc) + struct.pack("2B", self.rolem, len(self.username)) + self.username,
            hashlib.sha1,
        ).digest()
        self.k1 = hmac.new(self.sik, b"\x01" * 20, hashlib.sha1).digest()
        self.k2 = hmac.new(self.sik, b"\x02" * 20, hashlib.sha1).digest()
        self.aeskey = self.k2[0:16]
        self.localsid = struct.unpack("<I", self.managedsessionid)[0]
        self.ipmicallback = self.handle_client_request
        self.clientpriv = 2  # a session starts at USER level (IPMI 2.0 13.xx)
        self._rakp3_code = bytes(data[8:])
        self._rakp4_body = bytearray([data[0], 0, 0, 0]) + self.clientsessionid + hmac.new(
            self.sik, bytes(self.Rm + self.managedsessionid + self.uuiddata), hashlib.sha1).digest()[:12]
        self._send_rakp4(data[0], 0)
        self.established = True
        # From now on only a retransmitted RAKP 3 is a retransmit: pyghmi's client starts
        # every login with the same tag and console session id, so a new login's open
        # request can be byte-identical to this session's first one.
        self.handshake_replies = {
            k: v for k, v in self.handshake_replies.items() if k[5] & 0x3F == 0x14
        }
        self.bmc.counts["established"] += 1

    # -- established session -------------------------------------------------------

    def send_payload(self, payload: Any = (), payload_type: Any = None, retry: bool = True,
                     delay_xmit: Any = None, needskeepalive: bool = False, timeout: Any = None) -> None:
        if payload and payload_type == constants.payload_types["ipmi"]:
            self.last_reply = bytes(payload)
        super().send_payload(payload, payload_type, retry=False, delay_xmit=delay_xmit,
                             needskeepalive=needskeepalive, timeout=timeout)

    def _parse_ipmi_payload(self, payload: Any) -> Any:
        request = bytes(payload)
        if request == self.last_request and self.last_reply is not None:
            # the client retransmitted: same sequence number, command and data
            self.bmc.counts["retransmits"] += 1
            super().send_payload(bytearray(self.last_reply), constants.payload_types["ipmi"], retry=False)
            return None
        self.last_request = request
        self.last_reply = None
        return super()._parse_ipmi_payload(payload)

    def handle_client_request(self, request: dict[str, Any]) -> None:
        netfn, command = request["netfn"], request["command"]
        if self.closed:
            # Only a Close Session resent (FreeIPMI: new sequence numbers) because our
            # reply came late: answer it again, else the client waits out its whole
            # session timeout. Anything else on a closed session is dropped.
            if netfn == 6 and command == 0x3C:
                self.bmc.counts["retransmits"] += 1
                self.send_ipmi_response()
            return
        if netfn == 6 and command == 0x3B:  # set session privilege level
            wanted = request["data"][0] & 0x0F if request["data"] else 0
            if wanted == 0:
                self.send_ipmi_response(data=[self.clientpriv])
            elif wanted > self.maxpriv or wanted > 4:
                self.send_ipmi_response(code=0x81)
            else:
                self.clientpriv = wanted
                self.send_ipmi_response(data=[self.clientpriv])
        elif netfn == 6 and command == 0x3C:  # close session
            self.send_ipmi_response()
            self.bmc.drop_session(self.sockaddr, self)
        elif self.bmc.fault == "busy":
            self.bmc.counts["refused"] += 1
            self.send_ipmi_response(code=CC_NODE_BUSY)
        else:
            self.bmc.handle_raw_request(request, self)


class SimBmc(pyghmi_bmc.Bmc):
    """One simulated BMC: pyghmi's Bmc with power and boot state, counts and faults."""

    def __init__(self, shard: Shard, node: SimNode) -> None:
        # pyghmi's IpmiServer.__init__ minus _assignsocket (which would start pyghmi's
        # own IO thread and have it read our sockets).
        params = node.power_parameters
        self.shard = shard
        self.name = node.name
        self.address = str(params["power_address"])
        self.port = int(params.get("power_port", 623))
        self.max_users = int(getattr(shard, "max_users", DEFAULT_MAX_USERS))
        if not 2 <= self.max_users <= 63:
            raise ValueError("max_users must be between 2 and 63")
        self.users = [BmcUser() for _ in range(self.max_users)]  # index: user id - 1
        admin_name, admin_pass = str(params.get("power_user", "")), str(params.get("power_pass", ""))
        self.users[1 if admin_name else 0] = BmcUser(
            admin_name, admin_pass, enabled=True, privilege=PRIV_ADMIN, ipmi_msg=True, link_auth=True)
        self.authdata: dict[str, str] = {}
        self._sync_authdata()
        self.revision = 0
        self.deviceid = 0x20
        self.firmwaremajor = 1
        self.firmwareminor = 0
        self.ipmiversion = 2
        self.additionaldevices = 0x80  # chassis device
        self.mfgid = 0
        self.prodid = 0
        self.pktqueue: deque[Any] = deque()
        self.uuid = uuid.uuid5(uuid.NAMESPACE_DNS, f"{node.name}.ipmi.powerq.test")
        self.kg = None
        authstatus = 0b00000100  # non-null user names enabled
        k_g = params.get("k_g")
        if k_g:
            self.set_kg(str(k_g))
            authstatus |= 0b00100000
        self.authcap = struct.pack("BBBBBBBBB", 0, 1, 0b10000000, authstatus, 0b10, 0, 0, 0, 0)
        self.timeout = 60
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        # No SO_REUSEADDR: for UDP it would let a second peer bind the same address
        # and silently share its packets; a clash must fail loudly instead.
        self.sock.bind((self.address, self.port))
        self.sock.setblocking(False)
        self.serversocket = _Wire(self, self.sock)
        self.capture: list[bytes] | None = None
        self.sessions: dict[Any, SimSession] = {}
        self.closed: dict[Any, tuple[SimSession, float]] = {}
        self.power = "on" if node.power == "on" else "off"
        self.boot: str | None = None
        self.boot_efi = False
        self.boot_persistent = False
        self.booted_from: str | None = None
        self.fault = "none"
        self.latency = 0.0
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.times: dict[str, list[float]] = {key: [] for key in TIMED_KEYS}

    # -- users ---------------------------------------------------------------------

    def _sync_authdata(self) -> None:
        """pyghmi's server looks passwords up in ``authdata`` (name -> password): keep it
        (the same dict object, which sessions share) in step with the user table."""
        self.authdata.clear()
        for user in self.users:
            if user.can_login():
                self.authdata.setdefault(user.name, user.password)

    def privilege_limit(self, name: str) -> int:
        """The privilege limit of the first enabled user called ``name`` (0: none)."""
        for user in self.users:
            if user.can_login() and user.name == name:
                return user.privilege
        return 0

    def _user(self, uid: int) -> BmcUser | None:
        return self.users[uid - 1] if 1 <= uid <= self.max_users else None

    def _user_command(self, command: int, data: bytes, session: Any) -> None:
        """Get Channel Info and the user commands (netfn App 0x42-0x47)."""
        if command == 0x42:  # get channel info
            channel = data[0] & 0x0F if data else -1
            if channel not in (LAN_CHANNEL, THIS_CHANNEL):
                session.send_ipmi_response(code=CC_INVALID_DATA)
                return
            sessions = min(self.open_sessions(), 0x3F)
            # LAN channel 1, 802.3 LAN, IPMB-1.0 protocol, multi-session, IPMI's IANA
            session.send_ipmi_response(data=[LAN_CHANNEL, 4, 1, 0x80 | sessions, 0xF2, 0x1B, 0, 0, 0])
            return
        writes = command in (0x43, 0x45, 0x47)
        needed = PRIV_ADMIN if writes else PRIV_OPERATOR
        if session.clientpriv < needed:
            session.send_ipmi_response(code=CC_INSUFFICIENT_PRIVILEGE)
            return
        if command == 0x44:  # get user access
            if len(data) != 2 or data[0] & 0x0F not in (LAN_CHANNEL, THIS_CHANNEL):
                session.send_ipmi_response(code=CC_INVALID_DATA)
                return
            user = self._user(data[1] & 0x3F)
            if user is None:
                session.send_ipmi_response(code=CC_INVALID_DATA)
                return
            enabled = sum(1 for u in self.users if u.enabled)
            status = 0b01 if user.enabled else 0b10
            access = ((0x40 if user.callback else 0) | (0x20 if user.link_auth else 0)
                      | (0x10 if user.ipmi_msg else 0) | user.privilege)
            session.send_ipmi_response(data=[self.max_users, status << 6 | enabled, 1, access])
        elif command == 0x46:  # get user name
            user = self._user(data[0] & 0x3F) if len(data) == 1 else None
            if user is None:
                session.send_ipmi_response(code=CC_INVALID_DATA)
                return
            session.send_ipmi_response(data=list(user.name.encode().ljust(16, b"\0")))
        elif command == 0x43:  # set user access
            if len(data) not in (3, 4) or data[0] & 0x0F not in (LAN_CHANNEL, THIS_CHANNEL):
                session.send_ipmi_response(code=CC_INVALID_DATA)
                return
            user = self._user(data[1] & 0x3F)
            privilege = data[2] & 0x0F
            if user is None or privilege not in PRIV_NAMES:
                session.send_ipmi_response(code=CC_INVALID_DATA)
                return
            if data[0] & 0x80:
                user.callback = bool(data[0] & 0x40)
                user.link_auth = bool(data[0] & 0x20)
                user.ipmi_msg = bool(data[0] & 0x10)
            user.privilege = privilege
            self._user_changed(session)
        elif command == 0x45:  # set user name
            uid = data[0] & 0x3F if data else 0
            user = self._user(uid)
            if len(data) != 17:
                session.send_ipmi_response(code=CC_REQUEST_LENGTH_INVALID)
                return
            if user is None or uid == 1:  # user 1's (null) name is fixed
                session.send_ipmi_response(code=CC_INVALID_DATA)
                return
            try:
                user.name = bytes(data[1:]).rstrip(b"\0").decode()
            except UnicodeDecodeError:
                session.send_ipmi_response(code=CC_INVALID_DATA)
                return
            self._user_changed(session)
        elif command == 0x47:  # set user password
            self._set_user_password(data, session)
        else:
            session.send_ipmi_response(code=CC_INVALID_COMMAND)

    def _set_user_password(self, data: bytes, session: Any) -> None:
        if len(data) < 2:
            session.send_ipmi_response(code=CC_REQUEST_LENGTH_INVALID)
            return
        user = self._user(data[0] & 0x3F)
        if user is None:
            session.send_ipmi_response(code=CC_INVALID_DATA)
            return
        operation, size = data[1] & 0x03, 20 if data[0] & 0x80 else 16
        if operation in (0, 1):  # disable / enable
            user.enabled = operation == 1
            self._user_changed(session)
            return
        if len(data) != 2 + size:
            session.send_ipmi_response(code=CC_REQUEST_LENGTH_INVALID)
            return
        try:
            password = bytes(data[2:]).rstrip(b"\0").decode()
        except UnicodeDecodeError:
            session.send_ipmi_response(code=CC_INVALID_DATA)
            return
        if operation == 2:  # set password
            user.password = password
            self._user_changed(session)
        elif len(user.password.encode()) > size:  # test a 16-byte guess of a 20-byte password
            session.send_ipmi_response(code=CC_PASSWORD_WRONG_SIZE)
        elif not hmac.compare_digest(user.password.encode(), password.encode()):
            session.send_ipmi_response(code=CC_PASSWORD_TEST_FAILED)
        else:
            session.send_ipmi_response()

    def _user_changed(self, session: Any) -> None:
        self.counts["users"] += 1
        self._sync_authdata()
        session.send_ipmi_response()

    def accounts(self) -> list[dict[str, Any]]:
        """The named or enabled user slots, for the control API: never a password."""
        return [
            {"uid": uid, "name": user.name, "enabled": user.enabled,
             "privilege": PRIV_NAMES.get(user.privilege, str(user.privilege)),
             "ipmi_msg": user.ipmi_msg}
            for uid, user in enumerate(self.users, start=1) if user.name or user.enabled
        ]

    # -- sessions ------------------------------------------------------------------

    def sessions_full(self, clientaddr: Any) -> bool:
        others = sum(1 for addr in self.sessions if addr != clientaddr)
        return others >= self.shard.max_sessions

    def drop_session(self, clientaddr: Any, session: SimSession) -> None:
        """Close ``session``; it lingers :data:`CLOSED_LINGER` seconds, answering only a
        retransmitted Close Session."""
        if self.sessions.get(clientaddr) is session:
            del self.sessions[clientaddr]
        session.closed = True
        self.closed[clientaddr] = (session, time.monotonic())

    def open_sessions(self) -> int:
        return sum(1 for s in self.sessions.values() if s.established)

    def expire_sessions(self, now: float) -> None:
        for addr, sess in list(self.sessions.items()):
            limit = self.shard.session_timeout if sess.established else PENDING_SESSION_TIMEOUT
            if now - sess.last_seen > limit:
                del self.sessions[addr]
        for addr, (_sess, closed_at) in list(self.closed.items()):
            if now - closed_at > CLOSED_LINGER:
                del self.closed[addr]

    def receive(self, data: bytes, addr: Any) -> None:
        """Route one datagram: sessionless, new session, handshake retransmit or session."""
        if self.fault == "no_answer":
            return
        if len(data) >= 12 and data[0] == 6 and data[3] == 6:
            self._asf_pong(data, addr)
            return
        if len(data) < 16 or data[0] != 6 or data[2:4] != b"\xff\x07":
            return
        if data[4] != 6:  # IPMI 1.5 framing: only sessionless requests are served
            if data[9:13] == b"\x00\x00\x00\x00":
                self.sessionless_data(data, addr)
            return
        ptype = data[5] & 0x3F
        session = self.sessions.get(addr)
        if session is None and ptype == 0 and addr in self.closed:
            session = self.closed[addr][0]  # a retransmitted Close Session, maybe
        if ptype in HANDSHAKE_TYPES and session is not None:
            cached = session.handshake_replies.get(data)
            if cached is not None:
                self.counts["retransmits"] += 1
                for packet in cached:
                    self.shard.send(self, packet, addr)
                return
        if ptype == 0x10:
            self.capture = []
            try:
                session = SimSession(self, addr, data[16:])
            finally:
                replies, self.capture = self.capture, None
            if not session.refused:
                session.handshake_replies[data] = replies
                self.sessions[addr] = session
            elif self.sessions.get(addr) is not None and not self.sessions[addr].established:
                del self.sessions[addr]
            return
        if ptype == 0 and data[6:10] == b"\x00\x00\x00\x00":
            self.sessionless_data(data, addr)
            return
        if session is None:
            return
        session.last_seen = time.monotonic()
        if ptype in HANDSHAKE_TYPES:
            self.capture = []
            try:
                session._handle_ipmi_packet(bytearray(data), sockaddr=addr)
            finally:
                replies, self.capture = self.capture, None
            if replies:
                session.handshake_replies[data] = replies
                if ptype == 0x14 and session.established:
                    session.handshake_replies = {data: replies}
            return
        session._handle_ipmi_packet(bytearray(data), sockaddr=addr)

    def _asf_pong(self, data: bytes, addr: Any) -> None:
        # RMCP/ASF presence ping (class 6, type 0x80) -> presence pong (0x40)
        if data[4:8] != b"\x00\x00\x11\xbe" or data[8] != 0x80:
            return
        tag = data[9]
        pong = (
            b"\x06\x00\xff\x06" + b"\x00\x00\x11\xbe" + bytes([0x40, tag, 0, 16])
            + b"\x00\x00\x11\xbe" + b"\x00\x00\x00\x00" + bytes([0x81, 0]) + bytes(6)
        )
        self.shard.send(self, pong, addr)

    # -- commands ------------------------------------------------------------------

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
        netfn, command, data = request["netfn"], request["command"], request["data"]
        try:
            if netfn == 6 and command == 1:  # get device id
                session.send_ipmi_response(data=[
                    self.deviceid, self.revision, self.firmwaremajor, self.firmwareminor,
                    0x02, self.additionaldevices,
                    *struct.pack("<I", self.mfgid)[:3], *struct.pack("<H", self.prodid),
                ])
            elif netfn == 6 and command == 0x37:  # get system guid
                session.send_ipmi_response(data=list(self.uuid.bytes_le))
            elif netfn == 0 and command == 1:  # get chassis status
                self.counts["query"] += 1
                session.send_ipmi_response(data=[1 if self.power == "on" else 0, 0, 0])
            elif netfn == 0 and command == 2:  # chassis control
                if session.clientpriv < PRIV_OPERATOR:
                    session.send_ipmi_response(code=CC_INSUFFICIENT_PRIVILEGE)
                    return
                session.send_ipmi_response(code=self._chassis_control(data[0] & 0x0F if data else 0xFF))
            elif netfn == 0 and command == 8:  # set system boot options
                if session.clientpriv < PRIV_OPERATOR:
                    session.send_ipmi_response(code=CC_INSUFFICIENT_PRIVILEGE)
                    return
                session.send_ipmi_response(code=self._set_boot_options(data))
            elif netfn == 0 and command == 9:  # get system boot options
                self._get_boot_options(data, session)
            elif netfn == 6 and 0x42 <= command <= 0x47 and hasattr(self, "users"):
                self._user_command(command, bytes(data), session)
            else:
                session.send_ipmi_response(code=CC_INVALID_COMMAND)
        except Exception:  # a peer bug must not kill the shard
            traceback.print_exc()
            session.send_ipmi_response(code=0xFF)

    def _boot_now(self) -> None:
        self.booted_from = self.boot or "disk"
        if not self.boot_persistent:
            self.boot, self.boot_efi = None, False

    def _chassis_control(self, directive: int) -> int:
        if directive == 0:
            self.counts["off"] += 1
            self.power = "off"
        elif directive == 1:
            self.counts["on"] += 1
            self.times["on"].append(time.time())
            if self.power == "off":
                self.power = "on"
                self._boot_now()
        elif directive in (2, 3):
            if self.power == "off":
                return CC_NOT_IN_PRESENT_STATE
            what = "cycle" if directive == 2 else "reset"
            self.counts[what] += 1
            self.times[what].append(time.time())
            self._boot_now()
        elif directive == 5:
            self.counts["soft_off"] += 1
            self.power = "off"
        elif directive == 4:
            pass  # diagnostic interrupt: accepted, nothing to simulate
        else:
            return CC_INVALID_DATA
        return 0

    def _set_boot_options(self, data: Any) -> int:
        if not data:
            return CC_INVALID_DATA
        param = data[0] & 0x7F
        if param in (0, 3, 4):  # set in progress, boot info ack, boot flags valid bits
            return 0
        if param != 5:
            return CC_PARAM_NOT_SUPPORTED
        if len(data) < 3:
            return CC_INVALID_DATA
        flags, selector = data[1], (data[2] >> 2) & 0x0F
        self.counts["boot"] += 1
        if not flags & 0x80 or selector == 0:
            self.boot, self.boot_efi, self.boot_persistent = None, False, False
            return 0
        device = BOOT_DEVICES.get(selector)
        if device is None:
            return CC_INVALID_DATA
        self.boot = device
        self.boot_efi = bool(flags & 0x20)
        self.boot_persistent = bool(flags & 0x40)
        return 0

    def _get_boot_options(self, data: Any, session: Any) -> None:
        if not data or data[0] & 0x7F != 5:
            session.send_ipmi_response(code=CC_PARAM_NOT_SUPPORTED)
            return
        if self.boot is None:
            session.send_ipmi_response(data=[1, 5, 0, 0, 0, 0, 0])
            return
        flags = 0x80 | (0x20 if self.boot_efi else 0) | (0x40 if self.boot_persistent else 0)
        session.send_ipmi_response(data=[1, 5, flags, BOOT_SELECTORS[self.boot] << 2, 0, 0, 0])

    def snapshot(self) -> dict[str, Any]:
        counts = dict(self.counts)
        counts["open_sessions"] = self.open_sessions()
        return {
            "power": self.power,
            "boot": self.boot,
            "boot_efi": self.boot_efi,
            "boot_persistent": self.boot_persistent,
            "booted_from": self.booted_from,
            "counts": counts,
            "power_on_times": list(self.times["on"]),
            "cycle_times": list(self.times["cycle"]),
            "reset_times": list(self.times["reset"]),
            "fault": self.fault,
            "latency": self.latency,
            "address": self.address,
            "port": self.port,
            "accounts": self.accounts(),
            "max_users": self.max_users,
        }


class Shard:
    """BMCs on one epoll loop (a few thousand fit), plus the control API backend.

    ``latency`` (seconds) delays every reply of every BMC, ``jitter`` (seconds) spreads
    it uniformly over ``latency ± jitter`` (never below zero); both default to 0. The
    ``slow`` fault adds its own latency on top. Delayed replies wait on a timer heap, so a
    BMC's latency never holds up another BMC's packets.
    """

    def __init__(self, nodes: Iterable[SimNode], *, max_sessions: int = 16,
                 session_timeout: float = 60.0, max_users: int = DEFAULT_MAX_USERS,
                 latency: float = 0.0, jitter: float = 0.0, seed: int | None = None) -> None:
        if latency < 0 or jitter < 0:
            raise ValueError("latency and jitter must not be negative")
        self.max_sessions = max_sessions
        self.session_timeout = session_timeout
        self.max_users = max_users
        self.latency = float(latency)
        self.jitter = float(jitter)
        self._random = random.Random(seed)
        self.lock = threading.Lock()
        self.epoll = select.epoll()
        self.bmcs: dict[str, SimBmc] = {}
        self.by_fd: dict[int, SimBmc] = {}
        self.timers: list[tuple[float, int, socket.socket, bytes, Any]] = []
        self._seq = 0
        for node in nodes:
            bmc = SimBmc(self, node)
            self.bmcs[node.name] = bmc
            self.by_fd[bmc.sock.fileno()] = bmc
            self.epoll.register(bmc.sock.fileno(), select.EPOLLIN)

    # -- wire ----------------------------------------------------------------------

    def reply_delay(self, bmc: SimBmc) -> float:
        """Seconds to hold a reply of ``bmc``: the fleet's latency with jitter, plus the
        ``slow`` fault's latency (1 s when the fault gave none)."""
        delay = self.latency
        if self.jitter:
            delay = max(0.0, delay + self._random.uniform(-self.jitter, self.jitter))
        if bmc.fault == "slow":
            delay += bmc.latency or 1.0
        return delay

    def send(self, bmc: SimBmc, packet: bytes, addr: Any) -> None:
        delay = self.reply_delay(bmc)
        if delay > 0:
            self._seq += 1
            heapq.heappush(self.timers, (time.monotonic() + delay, self._seq, bmc.sock, packet, addr))
            return
        self._sendto(bmc.sock, packet, addr)

    @staticmethod
    def _sendto(sock: socket.socket, packet: bytes, addr: Any) -> None:
        try:
            sock.sendto(packet, addr)
        except OSError:
            pass  # UDP: a lost reply is the client's to retry

    def run(self, *, stop_fd: int | None = None, parent_pid: int | None = None) -> None:
        """Serve until ``stop_fd`` reaches end of file or the parent process goes away."""
        if stop_fd is not None:
            self.epoll.register(stop_fd, select.EPOLLIN | select.EPOLLHUP)
        next_sweep = time.monotonic() + 1.0
        while True:
            now = time.monotonic()
            wait = next_sweep - now
            if self.timers:
                wait = min(wait, self.timers[0][0] - now)
            events = self.epoll.poll(max(wait, 0.0))
            with self.lock:
                for fd, _mask in events:
                    if fd == stop_fd:
                        if not os.read(fd, 4096):
                            return
                        continue
                    bmc = self.by_fd.get(fd)
                    if bmc is not None:
                        self._drain(bmc)
                now = time.monotonic()
                while self.timers and self.timers[0][0] <= now:
                    _, _, sock, packet, addr = heapq.heappop(self.timers)
                    self._sendto(sock, packet, addr)
                if now >= next_sweep:
                    next_sweep = now + 1.0
                    for bmc in self.bmcs.values():
                        if bmc.sessions or bmc.closed:
                            bmc.expire_sessions(now)
            if parent_pid is not None and os.getppid() != parent_pid:
                return

    def _drain(self, bmc: SimBmc, limit: int = 1) -> None:
        """Read up to ``limit`` datagrams of ``bmc``. One per readiness event is the
        cheapest: a BMC rarely has two queued, epoll (level-triggered) reports the socket
        again when it has, and reading until ``EAGAIN`` would cost a failing system call
        and an exception per packet."""
        for _ in range(limit):
            try:
                data, addr = bmc.sock.recvfrom(4096)
            except OSError:  # nothing queued (EAGAIN) or a stray ICMP error
                return
            try:
                bmc.receive(data, addr)
            except Exception:
                traceback.print_exc()

    def close(self) -> None:
        for bmc in self.bmcs.values():
            bmc.sock.close()
        self.epoll.close()

    # -- ControlBackend ------------------------------------------------------------

    def nodes(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {name: bmc.snapshot() for name, bmc in self.bmcs.items()}

    def set_fault(self, name: str, fault: str, latency: float) -> None:
        with self.lock:
            bmc = self.bmcs[name]
            bmc.fault = fault
            bmc.latency = float(latency)
            if fault in ("no_answer", "busy", "auth"):
                pass  # open sessions stay; busy / no_answer act on every packet

    def set_state(self, name: str, power: str) -> None:
        if power not in ("on", "off"):
            raise KeyError(f"power {power!r}")
        with self.lock:
            self.bmcs[name].power = power

    def reset_counts(self) -> None:
        with self.lock:
            for bmc in self.bmcs.values():
                bmc.counts = dict.fromkeys(COUNT_KEYS, 0)
                bmc.times = {key: [] for key in TIMED_KEYS}


# -- fleet launcher -----------------------------------------------------------------


def make_nodes(
    count: int,
    rack: str,
    first_address: str = "127.20.0.1",
    user: str = "admin",
    password: str = "ipmi-pass",
    *,
    port: int = 623,
    prefix: str = "ipmi",
    power: str = "off",
) -> list[SimNode]:
    """``count`` IPMI nodes of ``rack`` on consecutive loopback addresses.

    Addresses whose last octet is 0 or 255 are skipped; all must stay in 127.0.0.0/8.
    Node names are ``f"{prefix}-{rack}-{i:04d}"`` (i from 1).
    """
    address = ipaddress.IPv4Address(first_address)
    nodes = []
    for i in range(1, count + 1):
        while address.packed[3] in (0, 255):
            address += 1
        if address not in ipaddress.IPv4Network("127.0.0.0/8"):
            raise ValueError(f"ran out of loopback addresses at node {i}")
        nodes.append(SimNode(
            name=f"{prefix}-{rack}-{i:04d}",
            rack=rack,
            power_type="ipmi",
            power_parameters={
                "power_address": str(address),
                "power_port": port,
                "power_user": user,
                "power_pass": password,
            },
            power=power,
        ))
        address += 1
    return nodes


class _ShardProcess:
    def __init__(self, proc: subprocess.Popen[bytes], control: PeerControl, names: list[str],
                 log: Path) -> None:
        self.proc = proc
        self.control = control
        self.names = names
        self.log = log


class IpmiFleet:
    """A running simulated fleet: one subprocess per shard, one control API each."""

    def __init__(self, nodes: list[SimNode], shards: list[_ShardProcess]) -> None:
        self.sim_nodes = nodes
        self._shards = shards
        self._owner = {name: shard for shard in shards for name in shard.names}

    @property
    def control(self) -> list[PeerControl]:
        """The control API client of each shard."""
        return [shard.control for shard in self._shards]

    @property
    def control_urls(self) -> list[str]:
        """The control API of each shard."""
        return [shard.control.url for shard in self._shards]

    @property
    def pids(self) -> list[int]:
        """The shard processes' ids."""
        return [shard.proc.pid for shard in self._shards]

    def nodes(self) -> dict[str, dict[str, Any]]:
        """``GET /nodes`` of every shard, merged."""
        out: dict[str, dict[str, Any]] = {}
        for shard in self._shards:
            out.update(shard.control.nodes())
        return out

    def node(self, name: str) -> dict[str, Any]:
        return self._owner[name].control.node(name)

    def fault(self, name: str, fault: str, latency: float = 0.0) -> None:
        self._owner[name].control.fault(name, fault, latency)

    def set_state(self, name: str, power: str) -> None:
        self._owner[name].control.set_state(name, power)

    def reset(self) -> None:
        """Zero every count and clear the start times (state and faults stay)."""
        for shard in self._shards:
            shard.control.reset()

    def stop(self) -> None:
        """Stop every shard process; never leaves one running."""
        for shard in self._shards:
            if shard.proc.stdin is not None:
                try:
                    shard.proc.stdin.close()
                except OSError:
                    pass
            if shard.proc.poll() is None:
                shard.proc.terminate()
        for shard in self._shards:
            try:
                shard.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                shard.proc.kill()
                shard.proc.wait()
        self._shards = []

    def __enter__(self) -> IpmiFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_fleet(
    nodes: list[SimNode],
    workdir: Path,
    shard_size: int = 400,
    *,
    max_sessions: int = 16,
    session_timeout: float = 60.0,
    max_users: int = DEFAULT_MAX_USERS,
    ready_timeout: float = 30.0,
    latency: float = 0.0,
    jitter: float = 0.0,
    shards: int | None = None,
) -> IpmiFleet:
    """Start ``nodes`` as simulated BMCs, ``shard_size`` per subprocess (or split evenly
    over ``shards`` subprocesses), and wait until every shard answers its control API.
    Every reply waits ``latency`` ± ``jitter`` seconds (see :class:`Shard`). Shards exit
    when the calling process dies.

    Raises :class:`RuntimeError` (with the shard's log) if a shard fails to start, and
    :class:`ValueError` for a bad size, latency or jitter.
    """
    if latency < 0 or jitter < 0:
        raise ValueError("latency and jitter must not be negative")
    if shards is not None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        shard_size = max(1, -(-len(nodes) // shards))
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shards: list[_ShardProcess] = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    fleet = IpmiFleet(nodes, shards)
    try:
        for index in range(0, len(nodes), shard_size):
            chunk = nodes[index:index + shard_size]
            number = index // shard_size
            spec = workdir / f"ipmi-shard-{number}.json"
            spec.write_text(json.dumps({
                "nodes": [n.to_json() for n in chunk],
                "max_sessions": max_sessions,
                "session_timeout": session_timeout,
                "max_users": max_users,
                "latency": latency,
                "jitter": jitter,
            }))
            spec.chmod(0o600)
            port = free_port()
            log = workdir / f"ipmi-shard-{number}.log"
            with open(log, "wb") as logf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.peers.ipmi_bmc", "--spec", str(spec),
                     "--control-port", str(port), "--parent-pipe"],
                    stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                    cwd=str(REPO_ROOT), env=env,
                )
            shards.append(_ShardProcess(proc, PeerControl(f"http://127.0.0.1:{port}"),
                                        [n.name for n in chunk], log))
        deadline = time.monotonic() + ready_timeout
        for shard in shards:
            while True:
                if shard.proc.poll() is not None:
                    raise RuntimeError(f"IPMI shard exited: {shard.log.read_text()[-2000:]}")
                try:
                    shard.control._call("GET", "/ping")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"IPMI shard not ready: {shard.log.read_text()[-2000:]}") from None
                    time.sleep(0.05)
        fleet._owner = {name: shard for shard in shards for name in shard.names}
        return fleet
    except BaseException:
        fleet.stop()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve one shard of simulated IPMI BMCs.")
    parser.add_argument("--spec", required=True, type=Path,
                        help='JSON {"nodes": [SimNode...], "max_sessions": N, "session_timeout": s, '
                             '"latency": s, "jitter": s}')
    parser.add_argument("--control-port", type=int, default=0,
                        help="TCP port of the control API on 127.0.0.1 (0: any, printed)")
    parser.add_argument("--parent-pipe", action="store_true",
                        help="exit when standard input reaches end of file (the parent died)")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    nodes = [SimNode(**n) for n in spec["nodes"]]
    raise_open_files(len(nodes) + 256)
    shard = Shard(nodes, max_sessions=int(spec.get("max_sessions", 16)),
                  session_timeout=float(spec.get("session_timeout", 60.0)),
                  max_users=int(spec.get("max_users", DEFAULT_MAX_USERS)),
                  latency=float(spec.get("latency", 0.0)), jitter=float(spec.get("jitter", 0.0)))
    server, port = serve_control(shard, port=args.control_port)
    # Thousands of long-lived BMC objects: keep them out of the collector's way (a full
    # collection would walk all of them), so that only per-packet garbage is tracked.
    gc.collect()
    gc.freeze()
    print(f"ipmi shard: {len(nodes)} BMCs, latency {shard.latency:g} s ± {shard.jitter:g} s, "
          f"control on 127.0.0.1:{port}", flush=True)
    try:
        shard.run(stop_fd=sys.stdin.fileno() if args.parent_pipe else None,
                  parent_pid=os.getppid())
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        shard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
