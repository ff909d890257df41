"""A lean asyncio IPMI 2.0 / RMCP+ client for reading and driving many BMCs at once.

The fleet hot path of the ``ipmi`` power type (issue 4): pyghmi spends ~3.5 ms of CPU per
new session and repeats Get Device ID on every read; this client keeps one session per
:class:`Target`, so that a warm read is exactly one round trip (Get Chassis Status) and
a cold one is Open Session, RAKP 1/2, RAKP 3/4 and the command. pyghmi
(:mod:`drivers.ipmi`) stays for bridging, OEM raw commands and user management. The wire
format is in :mod:`drivers.rmcpsession`.

How it behaves:

- **Sessions** are kept per :class:`Target` and reused; at most ``max_sessions``, the
  least recently used evicted with a Close Session. A session idle for more than
  ``idle_timeout`` is closed and logged in again on its next use (no keep-alive
  traffic: poll more often than ``idle_timeout`` to stay warm). Get Channel
  Authentication Capabilities is never sent (ipmitool and FreeIPMI send it first; RMCP+
  does not need it). A session starts at USER privilege (what the BMC grants after RAKP
  4); Set Session Privilege Level (to the target's level) is sent once, only before the
  first command that needs OPERATOR, so a cold read is four round trips.
- **Cipher suite**: ``Target.cipher_suite`` None proposes 17 and falls back to 3 when the
  BMC refuses 17 (RMCP+ status 0x11 or another "algorithm" status, or a reply naming
  other algorithms); the suite that worked is remembered per BMC address.
- **One request in flight per session**, at most ``max_in_flight`` calls in flight
  overall (an asyncio semaphore), so replies come back inside the retransmit timeout at
  scale.
- **Retransmission**: every packet is sent again after ``timeout`` seconds, at most
  ``retries`` times; a whole call (login included) is bounded by
  ``timeout * (retries + 1)``. A handshake packet is resent byte for byte; an IPMI
  request is resent with the same rqSeq and data but the next session sequence number,
  so a BMC that drops duplicate sequence numbers (replay window) still answers.
- **Lost sessions**: when an established session gets no answer for half the retries,
  the client logs in again once, transparently (counted as ``relogins``).
- **Sockets**: ``sockets`` UDP sockets shared by all sessions (large receive buffers,
  ``SO_RCVBUFFORCE`` when allowed), read with ``loop.add_reader`` draining every queued
  datagram per wake-up; replies are matched by remote address and session id. Anything
  that is not a genuine reply to a pending request is dropped and counted (``ignored``).

Errors (:mod:`drivers.errors`; messages name the BMC address, never a secret): wrong
password or unknown user -> :class:`AuthError` at once (no retries); no answer to the
login -> :class:`UnreachableError`; a session that was established in this call and then
got no answer -> :class:`CallTimeoutError`; RMCP+ status 0x01 or completion code 0xC0 ->
:class:`BusyError`; 0xD4 -> :class:`AuthError`; 0xC1 -> :class:`UnsupportedError`; 0xD5
-> :class:`DeviceError`; suite 17 alone refused -> :class:`UnsupportedError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from . import rmcpsession as wire
from .errors import (
    AuthError,
    CallTimeoutError,
    DeviceError,
    PowerError,
    SettingsError,
    UnreachableError,
    UnsupportedError,
)
from .rmcpsession import BOOT_DEVICES, CHASSIS_ACTIONS, Target

T = TypeVar("T")

__all__ = ["BOOT_DEVICES", "CHASSIS_ACTIONS", "BlockingLanplus", "LanplusClient", "Target"]

RCVBUF = 8 << 20


class _NoAnswer(Exception):
    """No reply within the retransmissions allowed (internal)."""


class LanplusClient:
    """Asyncio RMCP+ client; one per worker process, shared by all jobs.

    Open it from the event loop that uses it (sockets are opened on first use).
    """

    def __init__(self, *, max_sessions: int = 20000, max_in_flight: int = 512,
                 timeout: float = 2.0, retries: int = 3, idle_timeout: float = 50.0,
                 sockets: int = 4, keepalive: float | None = 20.0,
                 linger: float | None = None) -> None:
        if max_sessions < 1 or max_in_flight < 1 or sockets < 1 or retries < 0 or timeout <= 0:
            raise SettingsError("ipmi: invalid client limits")
        self.max_sessions = max_sessions
        self.max_in_flight = max_in_flight
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.idle_timeout = float(idle_timeout)
        self.socket_count = sockets
        self.keepalive = keepalive if keepalive and keepalive > 0 else None
        """Seconds a session may sit unused before a keep-alive (Get Device ID, as ipmitool
        sends) is sent in it, so polls further apart than the BMC's session timeout (often
        60 s) still find it open; None: no keep-alive (an idle session is replaced)."""
        self.linger = linger if linger and linger > 0 else None
        """Seconds a session is kept without a call before it is logged out (Close Session),
        so a worker holds a BMC's session only while it polls or drives it; None: kept
        until evicted or the client closes."""
        self._keeper: asyncio.Task[None] | None = None
        self._sessions: OrderedDict[Target, wire.SessionState] = OrderedDict()
        self._by_sid: dict[bytes, wire.SessionState] = {}
        self._per_host: dict[tuple[str, int], set[int]] = {}
        self._suites: dict[tuple[str, int], int] = {}
        self._socks: dict[int, list[socket.socket]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = wire.Slots(max_in_flight)
        self._closed = False
        self._stats = dict.fromkeys(
            ("logins", "requests", "round_trips", "retransmits", "timeouts", "relogins",
             "ignored", "evictions", "login_failures", "keepalives", "lingered"), 0)

    def __repr__(self) -> str:
        return f"LanplusClient(sessions={len(self._sessions)}, max_in_flight={self.max_in_flight})"

    # -- public API ----------------------------------------------------------------------

    async def query(self, target: Target) -> str:
        """``"on"`` or ``"off"`` (Get Chassis Status). Raises a :class:`PowerError`."""
        data = await self._call(target, 0x00, 0x01, b"", wire.PRIV_USER, "get chassis status")
        if not data:
            raise DeviceError(f"ipmi {target.host}:{target.port}: get chassis status: empty reply")
        return "on" if data[0] & 0x01 else "off"

    async def query_many(self, targets: Sequence[Target]) -> list[str | PowerError]:
        """:meth:`query` of every target at once; errors returned in place, never raised."""
        return list(await asyncio.gather(*(self.query_or_error(t) for t in targets)))

    async def chassis_control(self, target: Target, action: str) -> None:
        """Chassis Control: ``on``, ``off``, ``cycle``, ``reset``, ``soft`` (or ``diag``)."""
        directive = CHASSIS_ACTIONS.get(action)
        if directive is None:
            raise SettingsError(f"ipmi {target.host}:{target.port}: unknown chassis action {action!r}")
        await self._call(target, 0x00, 0x02, bytes([directive]), wire.PRIV_OPERATOR,
                         f"chassis control {action}")

    async def set_boot_device(self, target: Target, device: str, *, efi: bool = False,
                              persistent: bool = False) -> None:
        """Set System Boot Options: keep the boot flags past the 60 s timeout (parameter
        3), then the boot device (parameter 5), as ``ipmitool chassis bootdev`` sets it."""
        selector = BOOT_DEVICES.get(device)
        if selector is None:
            raise SettingsError(f"ipmi {target.host}:{target.port}: unknown boot device {device!r}")
        flags = (0x80 | (0x40 if persistent else 0) | (0x20 if efi else 0)) if selector else 0
        await self._call(target, 0x00, 0x08, b"\x03\x08", wire.PRIV_OPERATOR, "set boot options")
        await self._call(target, 0x00, 0x08, bytes([5, flags, selector << 2, 0, 0, 0]),
                         wire.PRIV_OPERATOR, "set boot device")

    async def logout(self, target: Target) -> None:
        """Close the target's session (Close Session), if one is open; never raises."""
        sess = self._sessions.pop(target, None)
        if sess is not None:
            async with sess.lock:
                if self._loop is not None and sess.crypto is not None:
                    await self._slots.acquire(self._loop)
                    try:
                        await self._close_session(sess)
                    finally:
                        self._slots.release()
                else:
                    await self._close_session(sess)

    async def close(self) -> None:
        """Close every open session, then the sockets. The client cannot be used after."""
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
        await asyncio.gather(*(self.logout(t) for t in list(self._sessions)))
        loop = self._loop
        for socks in self._socks.values():
            for sock in socks:
                if loop is not None:
                    loop.remove_reader(sock.fileno())
                sock.close()
        self._socks.clear()

    def stats(self) -> dict[str, int]:
        """Counts since start: ``logins``, ``sessions_open``, ``requests`` (calls),
        ``round_trips`` (packets that got their reply), ``retransmits``, ``timeouts``
        (exchanges given up), ``relogins``, ``ignored`` (datagrams that were not a
        reply), ``evictions``, ``login_failures``."""
        out = dict(self._stats)
        out["sessions_open"] = sum(1 for s in self._sessions.values() if s.crypto is not None)
        return out

    # -- calls -----------------------------------------------------------------------------

    async def query_or_error(self, target: Target) -> str | PowerError:
        """:meth:`query`, its error returned instead of raised (a bug too, as a DeviceError)."""
        try:
            return await self.query(target)
        except PowerError as exc:
            return exc
        except Exception as exc:  # a bug must not take the other targets down
            return DeviceError(f"ipmi {target.host}:{target.port}: internal error ({type(exc).__name__})")

    def _open(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("LanplusClient used from two event loops")
        if self._closed:
            raise RuntimeError("LanplusClient is closed")
        if (self.keepalive is not None or self.linger is not None) and self._keeper is None:
            self._keeper = loop.create_task(self._keep_alive())
        return loop

    async def _keep_alive(self) -> None:
        """Every ``keepalive / 4`` s, a Get Device ID in each established session unused
        for ``keepalive`` s (and not in use now), so it never reaches the idle timeout of
        either side. A session whose keep-alive gets no answer is dropped (the next call
        logs in again); one without a call for ``linger`` s is logged out instead. Nothing
        here ever raises."""
        period = max(0.05, min(x for x in (self.keepalive, self.linger) if x is not None) / 4)
        while not self._closed:
            await asyncio.sleep(period)
            loop = self._loop
            if loop is None:
                continue
            now = loop.time()
            for sess in list(self._sessions.values()):
                if sess.crypto is None or sess.lock.locked():
                    continue
                if self.linger is not None and now - sess.last_call >= self.linger:
                    self._stats["lingered"] += 1
                    loop.create_task(self.logout(sess.target))
                elif self.keepalive is not None and now - sess.last_used >= self.keepalive:
                    loop.create_task(self._ping(sess))

    async def _ping(self, sess: wire.SessionState) -> None:
        if sess.lock.locked() or self._closed:
            return
        async with sess.lock:
            if sess.crypto is None or self._sessions.get(sess.target) is not sess:
                return
            loop = self._loop
            assert loop is not None
            await self._slots.acquire(loop)
            try:
                await self._request(sess, 0x06, 0x01, b"", loop.time() + self.timeout * 2,
                                    False, "keep-alive")
                sess.last_used = loop.time()
                self._stats["keepalives"] += 1
            except _NoAnswer:
                self._forget(sess)
            except Exception:  # noqa: S110 - a refused keep-alive: the next call will tell
                pass
            finally:
                self._slots.release()

    def _sockets(self, family: int) -> list[socket.socket]:
        socks = self._socks.get(family)
        if socks is None:
            loop = self._loop
            assert loop is not None
            socks = []
            for _ in range(self.socket_count):
                sock = socket.socket(family, socket.SOCK_DGRAM)
                for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
                    try:
                        if opt is not None:
                            sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
                            break
                    except OSError:
                        continue
                sock.setblocking(False)
                sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
                loop.add_reader(sock.fileno(), self._readable, sock)
                socks.append(sock)
            self._socks[family] = socks
        return socks

    def _session(self, target: Target) -> wire.SessionState:
        sess = self._sessions.get(target)
        if sess is not None:
            self._sessions.move_to_end(target)
            return sess
        sess = self._sessions[target] = wire.SessionState(target)
        used = self._per_host.setdefault((target.host, target.port), set())
        sess.slot = next(i for i in range(len(used) + 1) if i not in used)
        used.add(sess.slot)
        if len(self._sessions) > self.max_sessions:
            for old_target, old in list(self._sessions.items()):
                if len(self._sessions) <= self.max_sessions:
                    break
                if old is not sess and not old.lock.locked():
                    del self._sessions[old_target]
                    self._stats["evictions"] += 1
                    self._close_now(old)
        return sess

    async def _call(self, target: Target, netfn: int, cmd: int, data: bytes, need: int,
                    action: str) -> bytes:
        loop = self._open()
        self._stats["requests"] += 1
        while True:
            sess = self._session(target)
            async with sess.lock:
                if self._sessions.get(target) is not sess:
                    continue  # logged out or evicted while this call waited for it
                await self._slots.acquire(loop)
                try:
                    return await self._call_locked(sess, netfn, cmd, data, need, action)
                finally:
                    self._slots.release()

    async def _call_locked(self, sess: wire.SessionState, netfn: int, cmd: int, data: bytes, need: int,
                           action: str) -> bytes:
        loop = self._loop
        assert loop is not None
        target = sess.target
        deadline = loop.time() + self.timeout * (self.retries + 1)
        if sess.crypto is not None and loop.time() - sess.last_used > self.idle_timeout:
            self._stats["relogins"] += 1
            self._close_now(sess)
        relogged = False
        while True:
            fresh = sess.crypto is None
            if fresh:
                await self._login(sess, deadline)
            try:
                if sess.priv < need <= wire.PRIVILEGES[target.privilege]:
                    level = wire.PRIVILEGES[target.privilege]
                    await self._request(sess, 0x06, 0x3B, bytes([level]), deadline, fresh,
                                        "set session privilege")
                    sess.priv = level
                reply = await self._request(sess, netfn, cmd, data, deadline, fresh, action)
                sess.last_call = loop.time()
            except _NoAnswer:
                if fresh or relogged:
                    self._forget(sess)
                    raise CallTimeoutError(f"{sess.where}: {action}: no answer from the BMC "
                                           "within the session") from None
                relogged = True
                self._stats["relogins"] += 1
                self._forget(sess)
                continue
            return reply

    async def _request(self, sess: wire.SessionState, netfn: int, cmd: int, data: bytes, deadline: float,
                       fresh: bool, action: str) -> bytes:
        """One IPMI request in the session; raises the completion code's error."""
        crypto = sess.crypto
        assert crypto is not None
        sess.rqseq = (sess.rqseq + 1) & 0x3F or 1
        message = wire.ipmi_request(netfn, cmd, sess.rqseq, data)

        def rebuild() -> bytes:
            sess.seq = (sess.seq + 1) & 0xFFFFFFFF or 1
            return crypto.seal(sess.seq, message)

        attempts = self.retries + 1 if fresh else max(1, (self.retries + 1) // 2)
        pending = self._pending(sess, wire.PT_IPMI, rebuild(), attempts, deadline)
        pending.rebuild = rebuild
        pending.netfn, pending.rqseq, pending.cmd = netfn, sess.rqseq, cmd
        code, reply = await self._exchange(sess, pending)
        sess.last_used = self._loop.time() if self._loop is not None else 0.0
        if code:
            raise wire.completion_code_error(code, f"{sess.where}: {action}")
        return bytes(reply)

    async def _login(self, sess: wire.SessionState, deadline: float) -> None:
        where = f"{sess.where}: login"
        try:
            await self._login_steps(sess, deadline, where)
        except _NoAnswer:
            self._forget(sess)
            self._stats["login_failures"] += 1
            raise UnreachableError(f"{where}: no answer from the BMC") from None
        except BaseException:
            self._forget(sess)
            self._stats["login_failures"] += 1
            raise
        self._stats["logins"] += 1
        sess.priv = wire.PRIV_USER

    async def _login_steps(self, sess: wire.SessionState, deadline: float, where: str) -> None:
        target = sess.target
        if not sess.addr:
            await self._resolve(sess)
        key = (target.host, target.port)
        suites = [target.cipher_suite or self._suites.get(key) or 17]
        if suites[0] == 17 and target.cipher_suite is None:
            suites.append(3)
        privilege = wire.PRIVILEGES[target.privilege]
        for number, suite_id in enumerate(suites):
            suite = wire.SUITES[suite_id]
            self._register(sess)
            tag = sess.tag = (sess.tag + 1) & 0xFF
            packet = wire.handshake_packet(
                wire.PT_OPEN_REQUEST, wire.open_session_request(tag, privilege, sess.console_sid, suite))
            reply = await self._handshake(sess, wire.PT_OPEN_RESPONSE, packet, tag, deadline)
            opened = wire.parse_open_session_response(reply)
            if opened is None:
                raise DeviceError(f"{where}: malformed open session response")
            last = number == len(suites) - 1
            if opened.status in wire.SUITE_REFUSED and not last:
                continue
            if opened.status:
                raise wire.rmcp_status_error(opened.status, f"{where}: open session (suite {suite_id})")
            if opened.algorithms != (suite.auth, suite.integrity, suite.confidentiality):
                if not last:
                    continue
                raise UnsupportedError(f"{where}: the BMC answered cipher suite {suite_id} "
                                       f"with other algorithms {opened.algorithms}")
            break
        assert opened is not None
        self._suites[key] = suite_id
        login = wire.Login(suite, sess.console_sid, opened.bmc_sid, target.username.encode(),
                           target.password.encode(), target.kg.encode() if target.kg else None,
                           privilege)
        tag = sess.tag = (tag + 1) & 0xFF
        reply = await self._handshake(sess, wire.PT_RAKP2, wire.handshake_packet(
            wire.PT_RAKP1, login.rakp1(tag)), tag, deadline)
        status = login.check_rakp2(reply)
        if status:
            if status == -1:  # tell the BMC, so it can free the session at once
                self._send(sess, wire.handshake_packet(wire.PT_RAKP3, login.rakp3(tag, 0x0F)))
                raise AuthError(f"{where}: the BMC refused the credentials (RAKP 2 code mismatch: "
                                "wrong password)")
            if status == -2:
                raise DeviceError(f"{where}: malformed RAKP 2")
            if status in wire.RAKP2_AUTH_STATUS:
                raise AuthError(f"{where}: the BMC refused the user (RAKP 2 status 0x{status:02x})",
                                rmcp_status=status)
            raise wire.rmcp_status_error(status, f"{where}: RAKP 2")
        tag = sess.tag = (tag + 1) & 0xFF
        reply = await self._handshake(sess, wire.PT_RAKP4, wire.handshake_packet(
            wire.PT_RAKP3, login.rakp3(tag)), tag, deadline)
        status = login.check_rakp4(reply)
        if status == -1:
            raise AuthError(f"{where}: RAKP 4 integrity check failed (wrong K_g)")
        if status == -2:
            raise DeviceError(f"{where}: malformed RAKP 4")
        if status:
            raise wire.rmcp_status_error(status, f"{where}: RAKP 4")
        sess.crypto = login.session()
        sess.seq = 0

    async def _resolve(self, sess: wire.SessionState) -> None:
        host, port = sess.target.host, sess.target.port
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            addr: tuple[Any, ...] = (str(ip), port)
        except ValueError:
            loop = self._loop
            assert loop is not None
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError:
                raise UnreachableError(f"{sess.where}: cannot resolve the BMC's name") from None
            family, addr = infos[0][0], infos[0][4]
        socks = self._sockets(family)
        sess.addr = (addr[0], addr[1])
        sess.sock = socks[(hash((host, port)) + sess.slot) % len(socks)]

    # -- exchanges -----------------------------------------------------------------------

    async def _handshake(self, sess: wire.SessionState, ptype: int, packet: bytes, tag: int,
                         deadline: float) -> bytes:
        pending = self._pending(sess, ptype, packet, self.retries + 1, deadline)
        pending.tag = tag
        reply: bytes = await self._exchange(sess, pending)
        return reply

    def _pending(self, sess: wire.SessionState, ptype: int, packet: bytes, limit: int,
                 deadline: float) -> wire.Pending:
        loop = self._loop
        assert loop is not None
        return wire.Pending(loop.create_future(), ptype, packet, limit, deadline)

    async def _exchange(self, sess: wire.SessionState, pending: wire.Pending) -> Any:
        loop = self._loop
        assert loop is not None
        sess.pending = pending
        self._send(sess, pending.packet)
        pending.handle = loop.call_at(min(loop.time() + self.timeout, pending.deadline),
                                      self._expire, sess, pending)
        try:
            return await pending.fut
        finally:
            if pending.handle is not None:
                pending.handle.cancel()
            if sess.pending is pending:
                sess.pending = None

    def _expire(self, sess: wire.SessionState, pending: wire.Pending) -> None:
        if pending.fut.done():
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if pending.sends >= pending.limit or now >= pending.deadline - 0.001:
            self._stats["timeouts"] += 1
            pending.fut.set_exception(_NoAnswer())
            return
        packet = pending.rebuild() if pending.rebuild is not None else pending.packet
        self._stats["retransmits"] += 1
        pending.sends += 1
        self._send(sess, packet)
        pending.handle = loop.call_at(min(now + self.timeout, pending.deadline), self._expire,
                                      sess, pending)

    def _send(self, sess: wire.SessionState, packet: bytes) -> None:
        assert sess.sock is not None
        try:
            sess.sock.sendto(packet, sess.addr)
        except OSError:
            pass  # a full buffer or no route: the retransmit timer covers it

    def _readable(self, sock: socket.socket) -> None:
        recv = sock.recvfrom
        for _ in range(512):
            try:
                data, addr = recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                if not self._receive(data, addr):
                    self._stats["ignored"] += 1
            except Exception:  # never let a packet break the receive path
                self._stats["ignored"] += 1

    def _receive(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        """Hand one datagram to its pending exchange; False if it is not a reply."""
        if len(data) < 24 or data[0] != 6 or data[3] != 7 or data[4] != 6:
            return False
        ptype = data[5] & 0x3F
        sess = self._by_sid.get(data[6:10] if ptype == wire.PT_IPMI else data[20:24])
        if sess is None or addr[0] != sess.addr[0] or addr[1] != sess.addr[1]:
            return False
        pending = sess.pending
        if pending is None or pending.fut.done() or pending.ptype != ptype:
            return False
        if ptype == wire.PT_IPMI:
            crypto = sess.crypto
            clear = crypto.open(data) if crypto is not None else None
            parsed = wire.ipmi_response(clear) if clear is not None else None
            if parsed is None:
                return False
            netfn, rqseq, cmd, code, body = parsed
            if netfn != pending.netfn + 1 or rqseq != pending.rqseq or cmd != pending.cmd:
                return False
            pending.fut.set_result((code, body))
        else:
            found = wire.handshake_payload(data)
            if found is None or not found[1] or found[1][0] != pending.tag:
                return False
            pending.fut.set_result(found[1])
        self._stats["round_trips"] += 1
        return True

    # -- session table ---------------------------------------------------------------------

    def _register(self, sess: wire.SessionState) -> None:
        self._unregister(sess)
        while True:
            sid = os.urandom(4)
            if sid != b"\0\0\0\0" and sid not in self._by_sid:
                break
        sess.console_sid = sid
        self._by_sid[sid] = sess

    def _unregister(self, sess: wire.SessionState) -> None:
        if sess.console_sid and self._by_sid.get(sess.console_sid) is sess:
            del self._by_sid[sess.console_sid]
        sess.console_sid = b""

    def _forget(self, sess: wire.SessionState) -> None:
        """Drop the session's keys (a new login follows), without telling the BMC."""
        self._unregister(sess)
        sess.crypto = None
        sess.priv = wire.PRIV_USER

    def _close_message(self, sess: wire.SessionState) -> bytes:
        crypto = sess.crypto
        assert crypto is not None
        sess.rqseq = (sess.rqseq + 1) & 0x3F or 1
        sess.seq = (sess.seq + 1) & 0xFFFFFFFF or 1
        return wire.ipmi_request(0x06, 0x3C, sess.rqseq, crypto.bmc_sid)

    def _close_now(self, sess: wire.SessionState) -> None:
        """Close Session, sent once without waiting, then forget the session."""
        if sess.crypto is not None:
            message = self._close_message(sess)
            self._send(sess, sess.crypto.seal(sess.seq, message))
        self._forget(sess)
        self._release_slot(sess)

    async def _close_session(self, sess: wire.SessionState) -> None:
        crypto = sess.crypto
        if crypto is not None and self._loop is not None:
            message = self._close_message(sess)

            def rebuild() -> bytes:
                sess.seq = (sess.seq + 1) & 0xFFFFFFFF or 1
                return crypto.seal(sess.seq, message)

            deadline = self._loop.time() + self.timeout * (self.retries + 1)
            pending = self._pending(sess, wire.PT_IPMI, crypto.seal(sess.seq, message),
                                    self.retries + 1, deadline)
            pending.rebuild = rebuild
            pending.netfn, pending.rqseq, pending.cmd = 0x06, sess.rqseq, 0x3C
            try:
                await self._exchange(sess, pending)
            except _NoAnswer:
                pass  # the BMC will expire it
        self._forget(sess)
        self._release_slot(sess)

    def _release_slot(self, sess: wire.SessionState) -> None:
        """Free the session's socket slot (kept apart from other logins to the same BMC:
        some BMCs, pyghmi's among them, key sessions by the client's address)."""
        if sess.target not in self._sessions:
            key = (sess.target.host, sess.target.port)
            used = self._per_host.get(key)
            if used is not None:
                used.discard(sess.slot)
                if not used:
                    del self._per_host[key]


class BlockingLanplus:
    """A :class:`LanplusClient` on its own event-loop thread, for threaded callers."""

    def __init__(self, **client_kwargs: Any) -> None:
        self.client = LanplusClient(**client_kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lanplus", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"BlockingLanplus({self.client!r})"

    def __enter__(self) -> BlockingLanplus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, coro_factory: Callable[[LanplusClient], Awaitable[T]],
             timeout: float | None = None) -> T:
        """Run ``coro_factory(client)`` on the client's loop and wait for its result.

        Raises what the coroutine raises; :class:`CallTimeoutError` after ``timeout`` s.
        """
        future = self.submit(coro_factory)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise CallTimeoutError(f"ipmi: call did not finish within {timeout} s") from None

    def submit(self, coro_factory: Callable[[LanplusClient], Awaitable[T]]
               ) -> concurrent.futures.Future[T]:
        """Start ``coro_factory(client)`` on the client's loop; its future, to wait on
        while doing other work (a chunk writes results while its batch runs)."""
        if self._loop.is_closed():
            raise RuntimeError("BlockingLanplus is closed")

        async def run() -> T:
            return await coro_factory(self.client)

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def query_many(self, targets: Sequence[Target]) -> list[str | PowerError]:
        """Power state of every target (``"on"`` / ``"off"``) or its :class:`PowerError`,
        in order; concurrent, bounded by ``max_in_flight``; never raises a PowerError."""
        return self.call(lambda client: client.query_many(targets))

    def stats(self) -> dict[str, int]:
        """:meth:`LanplusClient.stats`, read on the client's own loop thread."""

        async def read(client: LanplusClient) -> dict[str, int]:
            return client.stats()

        return self.call(read)

    def close(self) -> None:
        """Close every session and stop the loop thread."""
        if self._loop.is_closed():
            return
        try:
            self.call(lambda client: client.close(), timeout=self.client.timeout * (self.client.retries + 1) + 5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
