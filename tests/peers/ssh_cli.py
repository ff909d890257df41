"""Simulated SSH / telnet command-line devices: Wedge OpenBMC, Moonshot chassis manager
(MSCM), IBM HMC and a Sentry Switched CDU, each on its own 127.0.0.1 port.

The SSH side is asyncssh's server (password authentication, a host key generated at
start); the CDU also answers telnet (a minimal RFC 854 server written here: it asks the
client for ECHO / SGA / NAWS and records the replies, then shows the Sentry ``Username:`` /
``Password:`` prompts and the ``Switched CDU:`` prompt). One event loop thread serves every
device; :func:`serve_control` of :mod:`tests.peers.common` serves the control API.

Per device: at most ``max_sessions`` logins at once (then SSH disconnect "Too many
sessions", code 12, or the telnet line "All sessions are in use"). Per node: counts
(:data:`COUNT_KEYS`; ``sessions`` and ``open_sessions`` are the logins of the node's
device) and faults:

- ``auth`` / ``busy``: the node's device refuses every password / every login;
- ``no_answer``: commands naming the node are never answered (until the fault is cleared);
- ``slow``: commands naming the node are answered after ``latency`` seconds;
- ``garbage``: commands naming the node get a reply the driver cannot read.
"""

from __future__ import annotations

import asyncio
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from tests.peers.common import SimNode, free_port, serve_control

COUNT_KEYS = ("on", "off", "soft_off", "cycle", "reset", "boot", "query", "sessions", "open_sessions")
KINDS = ("wedge", "mscm", "hmc", "fence_cdu")
CDU_PROMPT = "Switched CDU: "
WEDGE_SCRIPT = "/usr/local/bin/wedge_power.sh"
IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
ECHO, SGA, NAWS = 1, 3, 31


@dataclass
class CliNode:
    name: str
    key: str
    """How the device names it: "" (wedge), cXnY (mscm), SERVER/LPAR (hmc), .A1 (CDU)."""
    power: str = "off"
    boot: str | None = None
    fault: str = "none"
    latency: float = 0.0
    macs: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))


@dataclass
class Device:
    kind: str
    name: str
    user: str
    password: str
    nodes: dict[str, CliNode]
    max_sessions: int = 4
    ssh_port: int = 0
    telnet_port: int = 0
    open_sessions: int = 0
    host_key: Any = None
    telnet_replies: list[bytes] = field(default_factory=list)
    """The telnet option replies clients sent (IAC verb option), for tests."""

    def fault(self, which: str) -> bool:
        return any(n.fault == which for n in self.nodes.values())

    def login(self) -> None:
        self.open_sessions += 1
        for node in self.nodes.values():
            node.counts["sessions"] += 1

    def logout(self) -> None:
        self.open_sessions = max(0, self.open_sessions - 1)

    def full(self) -> bool:
        return self.fault("busy") or self.open_sessions >= self.max_sessions


class CliPeer:
    """Every simulated device, served from one event loop thread."""

    def __init__(self, devices: list[Device], workdir: Path) -> None:
        self.devices = devices
        self.workdir = workdir
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._servers: list[Any] = []
        self.known_hosts = workdir / "known_hosts"
        self.control_server: Any = None
        self.control_port = 0

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> CliPeer:
        threading.Thread(target=self.loop.run_forever, name="ssh-cli-peer", daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        lines = []
        for dev in self.devices:
            key = dev.host_key.export_public_key("openssh").decode().split()
            lines.append(f"[127.0.0.1]:{dev.ssh_port} {key[0]} {key[1]}\n")
        self.known_hosts.write_text("".join(lines))
        self.control_server, self.control_port = serve_control(self)
        return self

    async def _start(self) -> None:
        for dev in self.devices:
            dev.host_key = asyncssh.generate_private_key("ssh-ed25519")
            dev.ssh_port = dev.ssh_port or free_port()
            self._servers.append(await asyncssh.listen(
                "127.0.0.1", dev.ssh_port, server_host_keys=[dev.host_key],
                server_factory=lambda d=dev: _SshServer(self, d),
                process_factory=lambda proc, d=dev: self._ssh_process(d, proc),
                encoding="utf-8", keepalive_interval=0, line_editor=False,
            ))
            if dev.kind == "fence_cdu":
                dev.telnet_port = dev.telnet_port or free_port()
                self._servers.append(await asyncio.start_server(
                    lambda r, w, d=dev: self._telnet(d, r, w), "127.0.0.1", dev.telnet_port))

    def stop(self) -> None:
        async def shut() -> None:
            for server in self._servers:
                server.close()

        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self.control_server is not None:
                self.control_server.shutdown()

    # -- control API ----------------------------------------------------------------

    def _node(self, name: str) -> tuple[Device, CliNode]:
        for dev in self.devices:
            for node in dev.nodes.values():
                if node.name == name:
                    return dev, node
        raise KeyError(name)

    def nodes(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            out = {}
            for dev in self.devices:
                for node in dev.nodes.values():
                    counts = dict(node.counts, open_sessions=dev.open_sessions)
                    out[node.name] = {"power": node.power, "boot": node.boot, "counts": counts,
                                      "fault": node.fault, "latency": node.latency}
            return out

    def set_fault(self, name: str, fault: str, latency: float = 0.0) -> None:
        with self.lock:
            node = self._node(name)[1]
            node.fault, node.latency = fault, latency

    fault = set_fault

    def set_state(self, name: str, power: str) -> None:
        with self.lock:
            self._node(name)[1].power = power

    def reset_counts(self) -> None:
        with self.lock:
            for dev in self.devices:
                for node in dev.nodes.values():
                    node.counts = dict.fromkeys(COUNT_KEYS, 0)

    reset = reset_counts

    def device_of(self, name: str) -> Device:
        return self._node(name)[0]

    # -- one command ------------------------------------------------------------------

    async def _gate(self, node: CliNode | None) -> str | None:
        """Apply a node's command faults: wait out ``no_answer`` / ``slow``; "garbage"
        when the reply must be unreadable."""
        if node is None:
            return None
        while node.fault == "no_answer":
            await asyncio.sleep(0.05)
        if node.fault == "slow":
            await asyncio.sleep(node.latency or 1.0)
        return "#@!garbage!@#\r\n" if node.fault == "garbage" else None

    async def command(self, dev: Device, line: str) -> tuple[str, int]:
        """The device's reply to one command line, and an exit status."""
        handler: Callable[[Device, list[str]], tuple[CliNode | None, Callable[[], tuple[str, int]]]]
        handler = {"wedge": _wedge, "mscm": _mscm, "hmc": _hmc, "fence_cdu": _cdu}[dev.kind]
        try:
            words = shlex.split(line)
        except ValueError:
            return "Error: unbalanced quotes\r\n", 1
        with self.lock:
            node, act = handler(dev, words)
        garbage = await self._gate(node)
        if garbage:
            return garbage, 0
        with self.lock:
            return act()

    # -- SSH ----------------------------------------------------------------------------

    async def _ssh_process(self, dev: Device, proc: Any) -> None:
        try:
            if proc.command is not None:  # exec: one command
                if dev.kind == "fence_cdu":
                    proc.stdout.write("Invalid command\r\n")
                    proc.exit(1)
                    return
                out, status = await self.command(dev, proc.command)
                proc.stdout.write(out)
                proc.exit(status)
                return
            if dev.kind != "fence_cdu":
                proc.stdout.write("Interactive shell not available.\r\n")
                proc.exit(1)
                return
            # an interactive shell: the CDU's CLI, echoing what is typed like a terminal
            proc.stdout.write("\r\nSentry Switched CDU Version 7.1c\r\n\r\n" + CDU_PROMPT)
            while True:
                try:
                    line = await proc.stdin.readline()
                except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged):
                    continue
                if not line:
                    break
                line = line.strip()
                proc.stdout.write(line + "\r\n")
                if line.lower() in ("logout", "exit", "quit"):
                    break
                if line:
                    out, _ = await self.command(dev, line)
                    proc.stdout.write(out)
                proc.stdout.write(CDU_PROMPT)
            proc.exit(0)
        except (asyncssh.Error, OSError, asyncio.CancelledError):
            pass

    # -- telnet (the CDU) ----------------------------------------------------------------

    async def _telnet(self, dev: Device, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        logged_in = False
        stream = _TelnetLines(reader, dev)
        try:
            writer.write(bytes((IAC, WILL, ECHO, IAC, WILL, SGA, IAC, DO, NAWS)))
            writer.write(b"\r\nSentry Switched CDU Version 7.1c\r\n\r\n")
            with self.lock:
                if dev.full():
                    writer.write(b"All sessions are in use. Try again later.\r\n")
                    await writer.drain()
                    return
                dev.login()
                logged_in = True
            for _attempt in range(3):
                writer.write(b"Username: ")
                user = await stream.readline(writer, echo=True)
                writer.write(b"Password: ")
                password = await stream.readline(writer, echo=False)
                if user is None or password is None:
                    return
                if user == dev.user and password == dev.password and not dev.fault("auth"):
                    break
                writer.write(b"\r\nAccess denied\r\n\r\n")
            else:
                return
            writer.write(("\r\n\r\n" + CDU_PROMPT).encode())
            while True:
                line = await stream.readline(writer, echo=True)
                if line is None or line.lower() in ("logout", "exit", "quit"):
                    return
                if line:
                    out, _ = await self.command(dev, line)
                    writer.write(out.encode())
                writer.write(CDU_PROMPT.encode())
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if logged_in:
                with self.lock:
                    dev.logout()
            writer.close()


class _TelnetLines:
    """Lines typed by a telnet client, with IAC sequences removed (and recorded)."""

    def __init__(self, reader: asyncio.StreamReader, dev: Device) -> None:
        self.reader = reader
        self.dev = dev
        self.buf = bytearray()

    async def readline(self, writer: asyncio.StreamWriter, echo: bool) -> str | None:
        while True:
            for end in (b"\r\n", b"\r\x00", b"\n", b"\r"):
                i = self.buf.find(end)
                if i >= 0 and (end != b"\r" or i + 1 < len(self.buf)):
                    line = bytes(self.buf[:i]).decode("utf-8", "replace")
                    del self.buf[: i + len(end)]
                    if echo:
                        writer.write(line.encode() + b"\r\n")
                    return line.strip()
            data = await self.reader.read(1024)
            if not data:
                return None
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            b = data[i]
            if b == IAC and i + 1 < len(data):
                verb = data[i + 1]
                if verb in (DO, DONT, WILL, WONT) and i + 2 < len(data):
                    self.dev.telnet_replies.append(bytes(data[i:i + 3]))
                    i += 3
                    continue
                if verb == IAC:
                    self.buf.append(IAC)
                i += 2
                continue
            self.buf.append(b)
            i += 1


class _SshServer(asyncssh.SSHServer):
    def __init__(self, peer: CliPeer, dev: Device) -> None:
        self.peer = peer
        self.dev = dev
        self.logged_in = False

    def connection_made(self, conn: Any) -> None:
        self.conn = conn

    def begin_auth(self, username: str) -> bool:
        with self.peer.lock:
            if self.dev.full():
                raise asyncssh.DisconnectError(asyncssh.DISC_TOO_MANY_CONNECTIONS, "Too many sessions")
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        with self.peer.lock:
            if self.dev.fault("auth"):
                return False
            return username == self.dev.user and password == self.dev.password

    def auth_completed(self) -> None:
        with self.peer.lock:
            if self.dev.full():
                raise asyncssh.DisconnectError(asyncssh.DISC_TOO_MANY_CONNECTIONS, "Too many sessions")
            self.dev.login()
            self.logged_in = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.logged_in:
            with self.peer.lock:
                self.dev.logout()


# -- the vendors' CLIs: (node named, action run under the lock) ------------------------

Act = Callable[[], tuple[str, int]]


def _wedge(dev: Device, words: list[str]) -> tuple[CliNode | None, Act]:
    node = dev.nodes[""]
    if not words or words[0] not in (WEDGE_SCRIPT, "wedge_power.sh"):
        return None, lambda: (f"-sh: {words[0] if words else ''}: not found\n", 127)
    verb = words[1] if len(words) > 1 else ""

    def act() -> tuple[str, int]:
        if verb == "status":
            node.counts["query"] += 1
            return f"Microserver power is {node.power}\n", 0
        if verb == "on":
            node.counts["on"] += 1
            if node.power == "on":
                return "Already on. Skip!\n", 0
            node.power = "on"
            return "Power on microserver ... Done\n", 0
        if verb == "off":
            node.counts["off"] += 1
            node.power = "off"
            return "Power off microserver ... Done\n", 0
        return (f"Usage: {WEDGE_SCRIPT} <command> [command options]\n\nCommands:\n"
                "  status: Get the current microserver power status\n  on: Power on microserver\n"
                "  off: Power off microserver\n"), -1 & 0xFF

    return node, act


def _mscm(dev: Device, words: list[str]) -> tuple[CliNode | None, Act]:
    w = [x.lower() for x in words]
    node_id = w[-1] if w else ""

    def missing() -> tuple[str, int]:
        return f"\r\nError: Node {node_id} is not present.\r\n", 0

    def header(node_id: str) -> str:
        c, n = node_id[1:].split("n")
        return f"\r\nCartridge #{c}\r\n  Node #{n}\r\n"

    if w == ["show", "node", "list"]:
        def listing() -> tuple[str, int]:
            rows = ["\r\nSlot ID    Proc Manufacturer      Architecture         Memory Power Health",
                    "---- ----- ---------------------- -------------------- ------ ----- ------"]
            for key in sorted(dev.nodes, key=lambda k: tuple(int(x) for x in k[1:].split("n"))):
                node = dev.nodes[key]
                slot = int(key[1:].split("n")[0])
                rows.append(f" {slot:02d}  {key:<5} Intel Corporation      x86 Architecture     "
                            f"32 GB  {node.power.capitalize():<5} OK ")
            return "\r\n".join(rows) + "\r\n\r\n", 0
        return None, listing
    node = dev.nodes.get(node_id)
    if len(w) < 4 or w[1] != "node":
        return None, lambda: ("\r\nError: Invalid command.\r\n", 0)
    if node is None:
        return None, missing
    n = node

    def power_query() -> tuple[str, int]:
        n.counts["query"] += 1
        return header(node_id) + f"    Power State: {n.power.capitalize()}\r\n", 0

    def set_power(state: str, count: str) -> Act:
        def act() -> tuple[str, int]:
            n.counts[count] += 1
            n.power = state
            return header(node_id) + f"    Power {state.capitalize()}\r\n", 0
        return act

    def bootonce() -> tuple[str, int]:
        n.counts["boot"] += 1
        n.boot = "pxe"
        return header(node_id) + "    Boot Once: PXE\r\n", 0

    def macs() -> tuple[str, int]:
        slot = int(node_id[1:].split("n")[0])
        return ("\r\nSlot ID    NIC 1 (Switch A)  NIC 2 (Switch B)\r\n"
                "---- ----- ----------------- -----------------\r\n"
                f"  {slot}  {node_id}  {'  '.join(n.macs)}\r\n\r\n"), 0

    table: dict[tuple[str, ...], Act] = {
        ("show", "node", "power"): power_query,
        ("set", "node", "power", "on"): set_power("on", "on"),
        ("set", "node", "power", "off", "force"): set_power("off", "off"),
        ("set", "node", "power", "off"): set_power("off", "soft_off"),
        ("set", "node", "bootonce", "pxe"): bootonce,
        ("show", "node", "macaddr"): macs,
    }
    act = table.get(tuple(w[:-1]))
    if act is None:
        return None, lambda: ("\r\nError: Invalid command.\r\n", 0)
    return node, act


def _option(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words and words.index(flag) + 1 < len(words) else None


def _hmc(dev: Device, words: list[str]) -> tuple[CliNode | None, Act]:
    server = _option(words, "-m")
    servers = {k.split("/")[0] for k in dev.nodes}
    if not words or words[0] not in ("lssyscfg", "chsysstate"):
        return None, lambda: (f"rbash: {words[0] if words else ''}: command not found\n", 127)
    if server not in servers:
        return None, lambda: (f"HSCL8012 The managed system {server} cannot be found.\n", 1)
    if words[0] == "lssyscfg":
        filt = _option(words, "--filter") or ""
        lpar = filt.split("=", 1)[1] if filt.startswith("lpar_names=") else ""
        node = dev.nodes.get(f"{server}/{lpar}")
        if node is None or _option(words, "-F") != "state":
            return None, lambda: ("No results were found.\n", 0)
        n = node

        def state() -> tuple[str, int]:
            n.counts["query"] += 1
            return ("Running" if n.power == "on" else "Not Activated") + "\n", 0
        return node, state
    lpar = _option(words, "-n") or ""
    node = dev.nodes.get(f"{server}/{lpar}")
    if node is None:
        return None, lambda: (f"HSCL0B0A The partition named {lpar} cannot be found.\n", 1)
    n2, op = node, _option(words, "-o")

    def change() -> tuple[str, int]:
        if op == "on":
            if n2.power == "on":
                return "HSCL0DB4 The partition is already activated.\n", 1
            n2.counts["on"] += 1
            n2.power = "on"
            n2.boot = _option(words, "--bootstring") or "default"
            return "", 0
        if op in ("shutdown", "osshutdown"):
            n2.counts["off" if op == "shutdown" and "--immed" in words else "soft_off"] += 1
            n2.power = "off"
            return "", 0
        return f"HSCL0001 The operation {op} is not valid.\n", 1
    return node, change


def _cdu(dev: Device, words: list[str]) -> tuple[CliNode | None, Act]:
    if len(words) != 2 or words[0].lower() not in ("on", "off", "reboot", "status"):
        return None, lambda: ("\r\n   Invalid command\r\n\r\n", 0)
    verb, outlet = words[0].lower(), words[1].upper()
    node = dev.nodes.get(outlet)
    if node is None:
        return None, lambda: ("\r\n   Outlet not found\r\n\r\n", 0)
    n = node

    def act() -> tuple[str, int]:
        if verb == "status":
            n.counts["query"] += 1
            state = n.power.capitalize()
            return ("\r\n   Outlet   Outlet                   Outlet     Control\r\n"
                    "   ID       Name                     Status     State\r\n\r\n"
                    f"   {outlet:<8} {'Tower' + outlet[1] + '_Outlet' + outlet[2:]:<24} {state:<10} {state}\r\n"
                    "\r\n   Command successful\r\n\r\n"), 0
        if verb == "reboot":
            n.counts["cycle"] += 1
            n.power = "on"
        else:
            n.counts[verb] += 1
            n.power = verb
        return "\r\n   Command successful\r\n\r\n", 0
    return node, act


# -- fleets ------------------------------------------------------------------------------

USER = "admin"
PASSWORD = "cli-Secret-9"


def make_fleet(prefix: str = "cli", rack: str = "fp") -> list[Device]:
    """Two wedges (one node each), an MSCM chassis (c1n1, c2n1, c3n1), an HMC (two LPARs) and a
    CDU (.A1, .A2)."""
    def nodes(keys: list[str], kind: str) -> dict[str, CliNode]:
        out = {}
        for i, key in enumerate(keys):
            macs = (f"a0:1d:48:00:{i:02x}:01", f"a0:1d:48:00:{i:02x}:02") if kind == "mscm" else ()
            suffix = key.replace("/", "-").replace(".", "").lower() or "0"
            out[key] = CliNode(name=f"{prefix}-{kind.replace('_', '')}-{suffix}", key=key, macs=macs)
        return out

    return [
        Device("wedge", f"{prefix}-wedge", "root", PASSWORD, nodes([""], "wedge")),
        Device("wedge", f"{prefix}-wedge2", "root", PASSWORD,
               {"": CliNode(name=f"{prefix}-wedge-1", key="")}),
        Device("mscm", f"{prefix}-mscm", USER, PASSWORD, nodes(["c1n1", "c2n1", "c3n1"], "mscm")),
        Device("hmc", f"{prefix}-hmc", "hscroot", PASSWORD, nodes(["p8srv/lpar1", "p8srv/lpar2"], "hmc")),
        Device("fence_cdu", f"{prefix}-cdu", USER, PASSWORD, nodes([".A1", ".A2"], "fence_cdu"),
               max_sessions=2),
    ]


def sim_nodes(peer: CliPeer, rack: str = "fp", protocol: str = "ssh") -> dict[str, list[SimNode]]:
    """Inventory nodes by power type, with strict host-key checking against the peer's
    known_hosts file. ``protocol`` is the CDU's (ssh or telnet)."""
    out: dict[str, list[SimNode]] = {k: [] for k in KINDS}
    for dev in peer.devices:
        port = dev.telnet_port if dev.kind == "fence_cdu" and protocol == "telnet" else dev.ssh_port
        base = {"power_address": "127.0.0.1", "power_port": port, "power_user": dev.user,
                "power_pass": dev.password, "host_key_policy": "reject",
                "known_hosts": str(peer.known_hosts)}
        for node in dev.nodes.values():
            params = dict(base)
            if dev.kind == "mscm":
                params["node_id"] = node.key
            elif dev.kind == "hmc":
                params["server_name"], params["lpar"] = node.key.split("/")
            elif dev.kind == "fence_cdu":
                params["power_id"] = node.key
                params["power_protocol"] = protocol
            out[dev.kind].append(SimNode(node.name, rack, dev.kind, params, node.power))
    return out


def start_peer(workdir: Path, devices: list[Device] | None = None) -> CliPeer:
    return CliPeer(devices if devices is not None else make_fleet(), workdir).start()
