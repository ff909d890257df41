"""IPMI chassis peers: an HP Moonshot iLO Chassis Manager (bridged requests to cartridge
nodes) and a SeaMicro 15000 chassis (the OEM raw power command per server).

Built on :mod:`tests.peers.ipmi_bmc` (pyghmi's BMC server with the fixes listed
there), by subclassing, never editing it:

- :class:`ChassisBmc` is one :class:`~tests.peers.ipmi_bmc.SimBmc` per chassis address:
  the RMCP+ sessions, privileges, faults and retransmit handling are that class'.
- :class:`Target` is one node behind the chassis: a ``SimBmc`` without a socket, whose
  power / boot / count logic (``handle_raw_request``) is reused as it is, answering
  through a :class:`_BridgedReply` instead of the session.

pyghmi's server (``pyghmi.ipmi.bmc`` / ``private.serversession``, 1.6.19) has no
bridging: Send Message (netfn App, command 0x34) falls through to "invalid command".
The minimal bridged-request handling written here (IPMI 2.0 section 6.12 / figure
14-11): Send Message with "track request" carries an IPMB request for the slave address
on the given channel; one or two Send Message layers (single or double bridge) name the
path. The chassis answers each layer's Send Message with completion code 0 and then
forwards the target's IPMB response (rsAddr 0x81, the response netfn, the target's
address as requester, the request's sequence and command) over the LAN session. A path
with no node behind it is answered with completion code 0x83 (NAK on write) on the
outermost Send Message, and nothing more.

SeaMicro: ``netfn 0x2E command 0x01 data 00 7d ab <op> 00 <server>`` (op 1 = power on,
6 = power off) acts on server ``<server>``; the reply echoes the IANA bytes. An unknown
server answers 0xCC (invalid data field), a session below OPERATOR 0xD4.

Faults set on a node through the control API act on its chassis (``auth``,
``no_answer``, ``busy``, ``slow``: IPMI faults are per BMC; the chassis takes the first
node fault that is not ``none``). Counts are per node, plus the chassis' ``sessions`` /
``open_sessions``.

The shard runs in a thread of the calling process (:func:`start`), so that a REST peer
of the same SeaMicro chassis (:mod:`tests.peers.http_soap`) can share its node state.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from tests.peers import ipmi_bmc
from tests.peers.common import SimNode, serve_control

SEND_MESSAGE = 0x34
CC_NAK_ON_WRITE = 0x83
SEAMICRO_IANA = (0x00, 0x7D, 0xAB)
SEAMICRO_OPS = {1: "on", 6: "off"}


def parse_hwaddress(text: str) -> tuple[tuple[int, int], ...]:
    """The bridge path of an ipmitool-style ``-B c -T a -b c -t a`` string (peer side)."""
    tokens = text.split()
    values = {flag[1]: int(value, 0) for flag, value in zip(tokens[0::2], tokens[1::2], strict=True)}
    target = (values.get("b", 0), values["t"])
    if "T" in values:
        return ((values.get("B", 0), values["T"]), target)
    return (target,)


class Target(ipmi_bmc.SimBmc):
    """One node behind a chassis: SimBmc's power and boot logic, no socket of its own."""

    def __init__(self, chassis: ChassisBmc, node: SimNode) -> None:  # noqa: D107
        self.chassis = chassis
        self.shard = chassis.shard
        self.name = node.name
        self.node = node
        self.address = chassis.address
        self.port = chassis.port
        self.revision = 0
        self.deviceid = 0x20
        self.firmwaremajor = 1
        self.firmwareminor = 0
        self.ipmiversion = 2
        self.additionaldevices = 0x80
        self.mfgid = 0
        self.prodid = 0
        self.uuid = uuid.uuid5(uuid.NAMESPACE_DNS, f"{node.name}.variant.powerq.test")
        self.sessions = {}
        self.power = "on" if node.power == "on" else "off"
        self.boot = None
        self.boot_efi = False
        self.boot_persistent = False
        self.booted_from = None
        self.fault = "none"
        self.latency = 0.0
        self.counts = dict.fromkeys(ipmi_bmc.COUNT_KEYS, 0)
        self.times: dict[str, list[float]] = {key: [] for key in ipmi_bmc.TIMED_KEYS}

    def snapshot(self) -> dict[str, Any]:
        counts = dict(self.counts)
        counts["sessions"] = self.chassis.counts["sessions"]
        counts["open_sessions"] = self.chassis.open_sessions()
        return {
            "power": self.power,
            "boot": self.boot,
            "boot_efi": self.boot_efi,
            "boot_persistent": self.boot_persistent,
            "booted_from": self.booted_from,
            "counts": counts,
            "fault": self.fault,
            "latency": self.latency,
            "address": self.address,
            "port": self.port,
        }


class _BridgedReply:
    """What a Target answers through: sends its reply as the forwarded IPMB response."""

    def __init__(self, session: Any, netfn: int, command: int, seqlun: int, rqlun: int,
                 responder: int) -> None:
        self.session = session
        self.clientpriv = session.clientpriv
        self.netfn, self.command = netfn, command
        self.seqlun, self.rqlun, self.responder = seqlun, rqlun, responder

    def send_ipmi_response(self, data: Any = (), code: int = 0) -> None:
        s = self.session
        saved = (s.seqlun, s.rqlun, s.clientaddr, s.rqaddr)
        s.seqlun, s.rqlun, s.clientaddr, s.rqaddr = self.seqlun, self.rqlun, 0x81, self.responder
        try:
            s._send_ipmi_net_payload(netfn=self.netfn + 1, command=self.command,
                                     data=list(data), code=code)
        finally:
            s.seqlun, s.rqlun, s.clientaddr, s.rqaddr = saved


def _unwrap(data: bytes) -> tuple[int, dict[str, Any]]:
    """Send Message request data -> (channel, the carried IPMB request)."""
    channel = data[0] & 0x0F
    msg = data[1:]
    if len(msg) < 7:
        raise ValueError("short bridged message")
    return channel, {
        "rsaddr": msg[0], "netfn": msg[1] >> 2, "rslun": msg[1] & 3, "rqaddr": msg[3],
        "seq": msg[4] >> 2, "rqlun": msg[4] & 3, "command": msg[5], "data": bytes(msg[6:-1]),
    }


class ChassisBmc(ipmi_bmc.SimBmc):
    """One chassis controller (Moonshot Chassis Manager or SeaMicro) and its nodes."""

    def __init__(self, shard: ipmi_bmc.Shard, nodes: list[SimNode]) -> None:
        super().__init__(shard, nodes[0])
        self.name = f"chassis@{self.address}"
        self.by_path: dict[tuple[tuple[int, int], ...], Target] = {}
        self.by_server: dict[int, Target] = {}
        self.targets: dict[str, Target] = {}
        for node in nodes:
            target = Target(self, node)
            self.targets[node.name] = target
            params = node.power_parameters
            if node.power_type == "moonshot":
                self.by_path[parse_hwaddress(str(params["power_hwaddress"]))] = target
            else:
                self.by_server[int(str(params["system_id"]).split("/")[0])] = target

    def refresh_fault(self) -> None:
        faulty = [t for t in self.targets.values() if t.fault != "none"]
        self.fault = faulty[0].fault if faulty else "none"
        self.latency = faulty[0].latency if faulty else 0.0

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
        netfn, command, data = request["netfn"], request["command"], bytes(request["data"])
        if netfn == 6 and command == SEND_MESSAGE:
            self._bridged(data, session)
        elif netfn == 0x2E and command == 0x01 and tuple(data[:3]) == SEAMICRO_IANA:
            self._seamicro(data, session)
        else:
            super().handle_raw_request(request, session)

    def _bridged(self, data: bytes, session: Any) -> None:
        path: list[tuple[int, int]] = []
        try:
            channel, inner = _unwrap(data)
            path.append((channel, inner["rsaddr"]))
            while inner["netfn"] == 6 and inner["command"] == SEND_MESSAGE and len(path) < 2:
                channel, inner = _unwrap(inner["data"])
                path.append((channel, inner["rsaddr"]))
        except (ValueError, IndexError):
            session.send_ipmi_response(code=ipmi_bmc.CC_INVALID_DATA)
            return
        target = self.by_path.get(tuple(path))
        if target is None:
            session.send_ipmi_response(code=CC_NAK_ON_WRITE)
            return
        session.send_ipmi_response()  # the Send Message itself: delivered
        if len(path) == 2:  # the transit controller's Send Message, forwarded
            _BridgedReply(session, 6, SEND_MESSAGE, inner["seq"], inner["rqlun"],
                          path[0][1]).send_ipmi_response()
        reply = _BridgedReply(session, inner["netfn"], inner["command"], inner["seq"],
                              inner["rqlun"], path[-1][1])
        target.handle_raw_request(
            {"netfn": inner["netfn"], "command": inner["command"], "data": inner["data"]}, reply)

    def _seamicro(self, data: bytes, session: Any) -> None:
        if session.clientpriv < ipmi_bmc.PRIV_OPERATOR:
            session.send_ipmi_response(code=ipmi_bmc.CC_INSUFFICIENT_PRIVILEGE)
            return
        if len(data) < 6 or data[3] not in SEAMICRO_OPS:
            session.send_ipmi_response(code=ipmi_bmc.CC_INVALID_DATA)
            return
        target = self.by_server.get(data[5])
        if target is None:
            session.send_ipmi_response(code=ipmi_bmc.CC_INVALID_DATA)
            return
        op = SEAMICRO_OPS[data[3]]
        target.counts[op] += 1
        if op == "on" and target.power == "off":
            target.power = "on"
            target._boot_now()
        elif op == "off":
            target.power = "off"
        session.send_ipmi_response(data=list(SEAMICRO_IANA))


class ChassisShard(ipmi_bmc.Shard):
    """ipmi_bmc's shard with one :class:`ChassisBmc` per chassis address and the control
    API per node behind them."""

    def __init__(self, nodes: Iterable[SimNode], *, max_sessions: int = 16,
                 session_timeout: float = 60.0) -> None:
        super().__init__((), max_sessions=max_sessions, session_timeout=session_timeout)
        groups: dict[tuple[str, int], list[SimNode]] = defaultdict(list)
        for node in nodes:
            params = node.power_parameters
            groups[(str(params["power_address"]), int(params.get("power_port", 623)))].append(node)
        self.targets: dict[str, Target] = {}
        import select

        for group in groups.values():
            chassis = ChassisBmc(self, group)
            self.bmcs[chassis.name] = chassis
            self.by_fd[chassis.sock.fileno()] = chassis
            self.epoll.register(chassis.sock.fileno(), select.EPOLLIN)
            self.targets.update(chassis.targets)

    def nodes(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {name: t.snapshot() for name, t in self.targets.items()}

    def set_fault(self, name: str, fault: str, latency: float) -> None:
        with self.lock:
            target = self.targets[name]
            target.fault, target.latency = fault, float(latency)
            target.chassis.refresh_fault()

    def set_state(self, name: str, power: str) -> None:
        if power not in ("on", "off"):
            raise KeyError(f"power {power!r}")
        with self.lock:
            self.targets[name].power = power

    def reset_counts(self) -> None:
        with self.lock:
            for target in self.targets.values():
                target.counts = dict.fromkeys(ipmi_bmc.COUNT_KEYS, 0)
                target.times = {key: [] for key in ipmi_bmc.TIMED_KEYS}
            for bmc in self.bmcs.values():
                bmc.counts = dict.fromkeys(ipmi_bmc.COUNT_KEYS, 0)
                bmc.times = {key: [] for key in ipmi_bmc.TIMED_KEYS}


class ChassisPeer:
    """A running :class:`ChassisShard` in a thread of this process, with its control API."""

    def __init__(self, nodes: list[SimNode], *, max_sessions: int = 16) -> None:
        self.sim_nodes = list(nodes)
        self.shard = ChassisShard(nodes, max_sessions=max_sessions)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self.shard.run, kwargs={"stop_fd": self._stop_r},
                                        name="ipmi-chassis", daemon=True)
        self._thread.start()
        self._server, self.control_port = serve_control(self.shard)

    @property
    def lock(self) -> threading.Lock:
        return self.shard.lock

    def nodes(self) -> dict[str, dict[str, Any]]:
        return self.shard.nodes()

    def node(self, name: str) -> dict[str, Any]:
        return self.shard.nodes()[name]

    def fault(self, name: str, fault: str, latency: float = 0.0) -> None:
        self.shard.set_fault(name, fault, latency)

    def set_state(self, name: str, power: str) -> None:
        self.shard.set_state(name, power)

    def reset(self) -> None:
        self.shard.reset_counts()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        os.close(self._stop_w)
        self._thread.join(5)
        os.close(self._stop_r)
        self.shard.close()

    def __enter__(self) -> ChassisPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def moonshot_nodes(rack: str, address: str, cartridges: int = 2, nodes_per_cartridge: int = 2,
                   *, user: str = "admin", password: str = "moonshot-Pass1", port: int = 623,
                   double: bool = True) -> list[SimNode]:
    """Cartridge nodes behind one Chassis Manager: cartridge ``c`` (1..) is the transit
    controller at 0x82 + 2(c-1) on channel 0, its node ``n`` (1..) at 0x72 + 2(n-1) on
    channel 7 (the Moonshot layout); with ``double=False`` single-bridged on channel 7."""
    nodes = []
    for c in range(1, cartridges + 1):
        for n in range(1, nodes_per_cartridge + 1):
            if double:
                hw = f"-B 0 -T 0x{0x82 + 2 * (c - 1):02x} -b 7 -t 0x{0x72 + 2 * (n - 1):02x}"
            else:
                hw = f"-b 7 -t 0x{0x72 + 2 * ((c - 1) * nodes_per_cartridge + n - 1):02x}"
            nodes.append(SimNode(
                name=f"ms-{rack}-c{c}n{n}", rack=rack, power_type="moonshot",
                power_parameters={"power_address": address, "power_port": port,
                                  "power_user": user, "power_pass": password,
                                  "power_hwaddress": hw},
            ))
    return nodes


def sm15k_nodes(rack: str, address: str, servers: int = 3, *, user: str = "admin",
                password: str = "seamicro-Pass1", power_control: str = "ipmi",
                port: int = 623, rest_port: int | None = None) -> list[SimNode]:
    """SeaMicro servers 0..``servers``-1 behind one chassis."""
    nodes = []
    for server in range(servers):
        params: dict[str, Any] = {"power_address": address, "power_user": user,
                                  "power_pass": password, "system_id": str(server),
                                  "power_control": power_control, "power_port": port}
        if rest_port is not None:
            params["rest_port"] = rest_port
        nodes.append(SimNode(name=f"sm-{rack}-s{server}", rack=rack, power_type="sm15k",
                             power_parameters=params))
    return nodes
