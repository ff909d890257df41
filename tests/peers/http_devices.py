"""Simulated HTTP power devices: webhook service, Digital Loggers switch, OpenBMC BMC,
Intel RSD pod manager, Microsoft OCS chassis manager, Cisco UCS Manager.

No public simulator exists for these (see PEERS.md), so each speaks its documented wire
format itself, on :mod:`http.server` (one ``ThreadingHTTPServer`` per device, on
127.0.0.1 and a free port, in daemon threads of the test process). A :class:`HttpFleet`
holds the devices and is the control backend of :mod:`tests.peers.common` (nodes /
fault / state / reset, optionally served over HTTP with :meth:`HttpFleet.serve_control`).

Shared scaffolding: :class:`Device` (one server, the nodes behind it, auth helpers) and
the fault handling every device gets, applied to the node a request addresses (or, for a
request naming no node - a login, a page of all outlets - to the first faulted node of
the device):

- ``no_answer``: hold the request until the fault is cleared (at most 60 s), then drop
  the connection without acting or answering;
- ``slow``: answer after ``latency`` seconds;
- ``auth``: the vendor's refusal of credentials (:meth:`Device.auth_reply`);
- ``busy``: the vendor's busy / no-free-session reply (:meth:`Device.busy_reply`);
- ``garbage``: a malformed body; ``powering``: the vendor's transitional power state.

Counts per node: ``on``, ``off``, ``soft_off``, ``cycle``, ``reset``, ``boot``, ``query``,
``sessions`` (logins), ``open_sessions`` (currently open), ``auth_failures``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.peers.common import serve_control

COUNT_KEYS = ("on", "off", "soft_off", "cycle", "reset", "boot", "query", "sessions",
              "open_sessions", "auth_failures")
PASSWORD = "Http-Secret-9"
HOLD_LIMIT = 60.0


# -- scaffolding ---------------------------------------------------------------------


@dataclass
class Node:
    """One simulated machine (or outlet) behind a device."""

    name: str
    key: str
    """How the device addresses it: outlet number, blade id, UUID, node id, path."""
    power: str = "off"
    boot: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    fault: str = "none"
    latency: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    raw_query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def cookie(self, name: str) -> str | None:
        for part in self.header("cookie").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None


@dataclass
class Reply:
    status: int
    body: bytes | str = b""
    content_type: str = "text/plain"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_reply(status: int, doc: Any, headers: Iterable[tuple[str, str]] = ()) -> Reply:
    return Reply(status, json.dumps(doc), "application/json", list(headers))


def xml_reply(status: int, text: str) -> Reply:
    return Reply(status, text, "application/xml")


class Device:
    """One HTTP device: a server on its own port and the nodes behind it."""

    kind = "device"

    def __init__(self, nodes: list[Node], user: str = "admin", password: str = PASSWORD,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.nodes = {n.key: n for n in nodes}
        self.user = user
        self.password = password
        self.lock = threading.RLock()
        self.requests = 0
        device = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two writes: without this, Nagle's algorithm
                # and the client's delayed ACK add ~40 ms to every keep-alive reply.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _serve(self) -> None:
                device._dispatch(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"peer-{self.kind}", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        for node in self.nodes.values():
            node.fault = "none"
        self.server.shutdown()
        self.server.server_close()

    # -- what a vendor overrides --

    def node_for(self, req: Request) -> Node | None:
        """The node a request addresses, for faults (None: the device as a whole)."""
        return None

    def handle(self, req: Request) -> Reply:
        raise NotImplementedError

    def auth_reply(self, req: Request) -> Reply:
        return Reply(401, "Unauthorized", headers=[("WWW-Authenticate", 'Basic realm="device"')])

    def busy_reply(self, req: Request) -> Reply:
        return Reply(503, "Service Unavailable", headers=[("Retry-After", "1")])

    def garbage_reply(self, req: Request) -> Reply:
        return Reply(200, "<<<garbage", "application/json")

    # -- helpers --

    def count(self, node: Node, key: str) -> None:
        with self.lock:
            node.counts[key] += 1

    def basic_ok(self, req: Request) -> bool:
        header = req.header("authorization")
        if header[:6].lower() != "basic ":
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user == self.user and password == self.password

    def refused(self, node: Node | None) -> None:
        for target in [node] if node else list(self.nodes.values())[:1]:
            self.count(target, "auth_failures")

    def _fault(self, node: Node | None) -> tuple[str, float]:
        if node is not None:
            return node.fault, node.latency
        for other in self.nodes.values():
            if other.fault != "none":
                return other.fault, other.latency
        return "none", 0.0

    def _dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        req = Request(
            method=handler.command, path=parts.path, raw_query=parts.query,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in handler.headers.items()}, body=body,
        )
        with self.lock:
            self.requests += 1
        node = self.node_for(req)
        fault, latency = self._fault(node)
        if fault == "no_answer":
            deadline = time.monotonic() + HOLD_LIMIT
            while self._fault(node)[0] == "no_answer" and time.monotonic() < deadline:
                time.sleep(0.05)
            handler.close_connection = True
            return
        if fault == "slow" and latency > 0:
            time.sleep(latency)
        if fault == "auth":
            self.refused(node)
            reply = self.auth_reply(req)
        elif fault == "busy":
            reply = self.busy_reply(req)
        elif fault == "garbage":
            reply = self.garbage_reply(req)
        else:
            try:
                reply = self.handle(req)
            except (ValueError, KeyError, TypeError, AttributeError):
                reply = Reply(400, "Bad Request")
        data = reply.body.encode() if isinstance(reply.body, str) else reply.body
        try:
            handler.send_response(reply.status)
            handler.send_header("Content-Type", reply.content_type)
            handler.send_header("Content-Length", str(len(data)))
            for key, value in reply.headers:
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass


class HttpFleet:
    """Every simulated HTTP device of a test, and the control backend over their nodes."""

    def __init__(self) -> None:
        self.devices: list[Device] = []
        self.control_server: ThreadingHTTPServer | None = None

    def add(self, device: Device) -> Device:
        self.devices.append(device)
        return device

    def _nodes(self) -> dict[str, tuple[Device, Node]]:
        return {n.name: (d, n) for d in self.devices for n in d.nodes.values()}

    def node(self, name: str) -> dict[str, Any]:
        return self.nodes()[name]

    def nodes(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, (device, node) in self._nodes().items():
            with device.lock:
                out[name] = {"power": node.power, "boot": node.boot, "counts": dict(node.counts),
                             "fault": node.fault, "latency": node.latency, "kind": device.kind,
                             "address": device.url, "key": node.key, **node.extra}
        return out

    def set_fault(self, name: str, fault: str, latency: float = 0.0) -> None:
        _device, node = self._nodes()[name]
        node.fault, node.latency = fault, latency

    fault = set_fault

    def set_state(self, name: str, power: str) -> None:
        if power not in ("on", "off"):
            raise KeyError(power)
        device, node = self._nodes()[name]
        with device.lock:
            node.power = power

    def reset_counts(self) -> None:
        for device, node in self._nodes().values():
            with device.lock:
                open_sessions = node.counts["open_sessions"]
                node.counts = dict.fromkeys(COUNT_KEYS, 0)
                node.counts["open_sessions"] = open_sessions

    reset = reset_counts

    def serve_control(self) -> int:
        """Serve the control API of :mod:`tests.peers.common`; returns its port."""
        self.control_server, port = serve_control(self)
        return port

    def stop(self) -> None:
        for device in self.devices:
            device.stop()
        if self.control_server is not None:
            self.control_server.shutdown()
            self.control_server.server_close()

    def __enter__(self) -> HttpFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- webhook -------------------------------------------------------------------------


class WebhookDevice(Device):
    """A generic power webhook service (the kind MAAS's webhook driver calls, e.g.
    maaspower): ``POST /machines/<key>/on``, ``POST /machines/<key>/off``, ``GET
    /machines/<key>/status`` -> ``{"status": "running" | "stopped"}``. Bearer token when
    ``token`` is set, else basic auth. With ``trailing_slash`` the paths only exist with
    a final ``/``. Records the last ``System_Id`` header as ``system_id``."""

    kind = "webhook"

    def __init__(self, nodes: list[Node], token: str | None = None,
                 trailing_slash: bool = False, **kwargs: Any) -> None:
        self.token = token
        self.trailing_slash = trailing_slash
        super().__init__(nodes, **kwargs)

    def uris(self, node: Node) -> dict[str, str]:
        slash = "/" if self.trailing_slash else ""
        base = f"{self.url}/machines/{node.key}"
        return {"power_on_uri": f"{base}/on{slash}", "power_off_uri": f"{base}/off{slash}",
                "power_query_uri": f"{base}/status{slash}"}

    def _parts(self, req: Request) -> list[str]:
        return req.path.strip("/").split("/")

    def node_for(self, req: Request) -> Node | None:
        parts = self._parts(req)
        return self.nodes.get(parts[1]) if len(parts) == 3 and parts[0] == "machines" else None

    def auth_reply(self, req: Request) -> Reply:
        return json_reply(401, {"error": "unauthorized"},
                          [("WWW-Authenticate", "Bearer" if self.token else 'Basic realm="webhook"')])

    def busy_reply(self, req: Request) -> Reply:
        return json_reply(503, {"error": "busy, try later"}, [("Retry-After", "1")])

    def handle(self, req: Request) -> Reply:
        ok = (req.header("authorization") == f"Bearer {self.token}") if self.token else self.basic_ok(req)
        node = self.node_for(req)
        if not ok:
            self.refused(node)
            return self.auth_reply(req)
        if node is None or (self.trailing_slash and not req.path.endswith("/")):
            return json_reply(404, {"error": "no such machine"})
        if req.header("system_id"):
            node.extra["system_id"] = req.header("system_id")
        action = self._parts(req)[2]
        with self.lock:
            if action == "status" and req.method == "GET":
                node.counts["query"] += 1
                status = "running" if node.power == "on" else "stopped"
                if node.fault == "powering":
                    status = "starting"
                return json_reply(200, {"id": node.key, "status": status})
            if action in ("on", "off") and req.method == "POST":
                node.counts[action] += 1
                node.power = action
                return json_reply(200, {"id": node.key, "result": "ok"})
        return json_reply(405, {"error": "method not allowed"})


# -- Digital Loggers -----------------------------------------------------------------


class DliDevice(Device):
    """A Digital Loggers web power switch: ``GET /outlet?<n>=ON|OFF|CCL`` (answered with
    a redirect to the status page, as the switch does) and ``GET /index.htm`` carrying
    ``<!-- state=XX lock=00 -->``. HTTP basic auth, or digest (RFC 2617, qop=auth) when
    ``digest``."""

    kind = "dli"
    REALM = "DLI Web Power Switch"

    def __init__(self, nodes: list[Node], outlets: int = 8, digest: bool = False,
                 **kwargs: Any) -> None:
        self.outlets = outlets
        self.digest = digest
        self.nonce = secrets.token_hex(8)
        super().__init__(nodes, **kwargs)

    def node_for(self, req: Request) -> Node | None:
        if req.path == "/outlet" and req.query:
            return self.nodes.get(next(iter(req.query)))
        return None

    def auth_reply(self, req: Request) -> Reply:
        if self.digest:
            challenge = f'Digest realm="{self.REALM}", nonce="{self.nonce}", qop="auth", algorithm=MD5'
        else:
            challenge = f'Basic realm="{self.REALM}"'
        return Reply(401, "<html><body>401 Unauthorized</body></html>", "text/html",
                     [("WWW-Authenticate", challenge)])

    def _digest_ok(self, req: Request) -> bool:
        header = req.header("authorization")
        if not header.lower().startswith("digest "):
            return False
        fields = {}
        for item in header[7:].split(","):
            key, _, value = item.strip().partition("=")
            fields[key] = value.strip('"')
        if fields.get("username") != self.user or fields.get("nonce") != self.nonce:
            return False

        def md5(text: str) -> str:
            return hashlib.md5(text.encode()).hexdigest()  # noqa: S324 - the protocol's hash

        ha1 = md5(f"{self.user}:{self.REALM}:{self.password}")
        ha2 = md5(f"{req.method}:{fields.get('uri', '')}")
        want = md5(f"{ha1}:{self.nonce}:{fields.get('nc')}:{fields.get('cnonce')}:auth:{ha2}")
        return fields.get("response") == want

    def _page(self) -> Reply:
        bits = 0
        for node in self.nodes.values():
            if node.power == "on":
                bits |= 1 << (int(node.key) - 1)
            node.counts["query"] += 1
        width = max(2, (self.outlets + 3) // 4)
        rows = "".join(
            f"<tr><td>{i}</td><td>Outlet {i}</td><td>{'ON' if bits >> (i - 1) & 1 else 'OFF'}</td></tr>"
            for i in range(1, self.outlets + 1)
        )
        page = (
            "<html><head><title>Outlet Control</title></head>\n"
            f"<!-- state={bits:0{width}x} lock=00 -->\n"
            f"<body><table>{rows}</table></body></html>"
        )
        return Reply(200, page, "text/html")

    def handle(self, req: Request) -> Reply:
        ok = self._digest_ok(req) if self.digest else self.basic_ok(req)
        if not ok:
            self.refused(self.node_for(req))
            return self.auth_reply(req)
        with self.lock:
            if req.path in ("/", "/index.htm"):
                return self._page()
            if req.path == "/outlet" and len(req.query) == 1:
                (outlet, command), = req.query.items()
                if not outlet.isdigit() or not 1 <= int(outlet) <= self.outlets:
                    return Reply(404, "<html><body>No such outlet</body></html>", "text/html")
                node = self.nodes.get(outlet)
                if node is not None:
                    if command == "ON":
                        node.counts["on"] += 1
                        node.power = "on"
                    elif command == "OFF":
                        node.counts["off"] += 1
                        node.power = "off"
                    elif command == "CCL":
                        node.counts["cycle"] += 1
                        node.power = "on"
                    else:
                        return Reply(400, "bad command")
                return Reply(302, "", "text/html", [("Location", "/index.htm")])
        return Reply(404, "<html><body>Not Found</body></html>", "text/html")


# -- OpenBMC -------------------------------------------------------------------------


def _obmc(status: int, data: Any, message: str | None = None,
          headers: Iterable[tuple[str, str]] = ()) -> Reply:
    ok = status < 400
    text = message or {200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized",
                       404: "404 Not Found", 503: "503 Service Unavailable"}.get(status, str(status))
    return json_reply(status, {"data": data, "message": text, "status": "ok" if ok else "error"},
                      headers)


class OpenBmcDevice(Device):
    """An OpenBMC BMC's REST API (one node). Login ``POST /login`` ``{"data": [user,
    password]}`` -> ``SESSION`` and ``XSRF-TOKEN`` cookies (writes must echo the latter
    as ``X-XSRF-TOKEN``); ``POST /logout``; host / chassis state and transitions; boot
    source objects. At most ``max_sessions`` sessions, then 503."""

    kind = "openbmc"
    HOST = "/xyz/openbmc_project/state/host0/attr/"
    CHASSIS = "/xyz/openbmc_project/state/chassis0/attr/"
    BOOT = "/xyz/openbmc_project/control/host0/boot/"

    def __init__(self, nodes: list[Node], max_sessions: int = 4, **kwargs: Any) -> None:
        assert len(nodes) == 1, "one host per OpenBMC"
        self.max_sessions = max_sessions
        self.sessions: dict[str, str] = {}
        self.boot_objects: dict[str, Any] = {}
        super().__init__(nodes, **kwargs)

    @property
    def host_node(self) -> Node:
        return next(iter(self.nodes.values()))

    def node_for(self, req: Request) -> Node | None:
        return self.host_node

    def auth_reply(self, req: Request) -> Reply:
        return _obmc(401, {"description": "Login required"})

    def busy_reply(self, req: Request) -> Reply:
        return _obmc(503, {"description": "Service temporarily unavailable"}, headers=[("Retry-After", "1")])

    def _login(self, req: Request) -> Reply:
        node = self.host_node
        data = req.json().get("data")
        if not (isinstance(data, list) and data == [self.user, self.password]):
            self.refused(node)
            return _obmc(401, {"description": "Invalid username or password"})
        if len(self.sessions) >= self.max_sessions:
            return self.busy_reply(req)
        token, xsrf = secrets.token_hex(16), secrets.token_hex(8)
        self.sessions[token] = xsrf
        node.counts["sessions"] += 1
        node.counts["open_sessions"] = len(self.sessions)
        return _obmc(200, f"User '{self.user}' logged in", headers=[
            ("Set-Cookie", f"SESSION={token}; Path=/; HttpOnly"),
            ("Set-Cookie", f"XSRF-TOKEN={xsrf}; Path=/"),
        ])

    def handle(self, req: Request) -> Reply:
        node = self.host_node
        with self.lock:
            if req.path == "/login" and req.method == "POST":
                return self._login(req)
            token = req.cookie("SESSION")
            if token not in self.sessions:
                return self.auth_reply(req)
            if req.method != "GET" and req.header("x-xsrf-token") != self.sessions[token]:
                return self.auth_reply(req)
            if req.path == "/logout" and req.method == "POST":
                del self.sessions[token]
                node.counts["open_sessions"] = len(self.sessions)
                return _obmc(200, "User logged out")
            path = req.path.replace("//", "/")
            if req.method == "GET" and path == self.HOST + "CurrentHostState":
                node.counts["query"] += 1
                state = "Running" if node.power == "on" else "Off"
                if node.fault == "powering":
                    state = "TransitioningToRunning"
                return _obmc(200, f"xyz.openbmc_project.State.Host.HostState.{state}")
            if req.method == "GET" and path == self.CHASSIS + "CurrentPowerState":
                return _obmc(200, "xyz.openbmc_project.State.Chassis.PowerState."
                             + ("On" if node.power == "on" else "Off"))
            if req.method == "PUT":
                return self._put(node, path, req.json().get("data"))
        return _obmc(404, {"description": f"org.freedesktop.DBus.Error.FileNotFound: path or object not found: {req.path}"})

    def _put(self, node: Node, path: str, value: Any) -> Reply:
        if path == self.HOST + "RequestedHostTransition":
            action = str(value).rsplit(".", 1)[-1]
            if action == "On":
                node.counts["on"] += 1
                node.power = "on"
            elif action == "Off":
                node.counts["soft_off"] += 1
                node.power = "off"
            elif action == "Reboot":
                node.counts["cycle"] += 1
                node.power = "on"
            else:
                return _obmc(400, {"description": "invalid transition"})
            return _obmc(200, None)
        if path == self.CHASSIS + "RequestedPowerTransition":
            action = str(value).rsplit(".", 1)[-1]
            if action not in ("On", "Off"):
                return _obmc(400, {"description": "invalid transition"})
            node.counts["on" if action == "On" else "off"] += 1
            node.power = action.lower()
            return _obmc(200, None)
        if path.startswith(self.BOOT) and "/attr/" in path:
            self.boot_objects[path[len(self.BOOT):]] = value
            if path.endswith("attr/BootSource"):
                node.counts["boot"] += 1
            source = str(self.boot_objects.get("one_time/attr/BootSource")
                         or self.boot_objects.get("attr/BootSource") or "").rsplit(".", 1)[-1]
            node.boot = {"Network": "pxe", "Disk": "disk", "ExternalMedia": "cdrom"}.get(source)
            node.extra["boot_once"] = self.boot_objects.get("one_time/attr/Enabled")
            node.extra["boot_type"] = str(self.boot_objects.get("one_time/attr/BootType", "")).rsplit(".", 1)[-1] or None
            return _obmc(200, None)
        return _obmc(404, {"description": "path or object not found"})


# -- Microsoft OCS chassis manager ---------------------------------------------------

OCS_NS = "http://schemas.datacontract.org/2004/07/Microsoft.GFS.WCS.Contracts"


def _ocs(root: str, code: str, inner: str = "", description: str = "") -> Reply:
    return xml_reply(200, (
        f'<{root} xmlns="{OCS_NS}" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">'
        f"<completionCode>{code}</completionCode><apiVersion>1</apiVersion>"
        f"<statusDescription>{description}</statusDescription>{inner}</{root}>"
    ))


class MsftOcsDevice(Device):
    """An Open CloudServer chassis manager: ``GET /<Command>?bladeid=N`` with basic auth,
    XML replies with a ``completionCode``. ``blades`` slots; a slot without a node is
    empty (``CommandNotValidForBlade``); beyond them ``ParameterOutOfRange``. The busy
    reply is ``SerialSessionActive`` (a serial console session holds the blade)."""

    kind = "msftocs"

    def __init__(self, nodes: list[Node], blades: int = 24, **kwargs: Any) -> None:
        self.blades = blades
        super().__init__(nodes, **kwargs)

    def node_for(self, req: Request) -> Node | None:
        return self.nodes.get(req.query.get("bladeid", ""))

    def busy_reply(self, req: Request) -> Reply:
        return _ocs("BladeResponse", "SerialSessionActive", description="A serial session is active")

    def garbage_reply(self, req: Request) -> Reply:
        return xml_reply(200, "<BladeStateResponse><completionCode>Succ")

    def _mac(self, node: Node) -> str:
        return f"00:15:5d:00:{int(node.key):02x}:01"

    def handle(self, req: Request) -> Reply:
        if not self.basic_ok(req):
            self.refused(self.node_for(req))
            return self.auth_reply(req)
        command = req.path.strip("/")
        with self.lock:
            if command == "GetChassisInfo":
                infos = "".join(
                    f"<BladeInfo><completionCode>Success</completionCode><bladeNumber>{n.key}</bladeNumber>"
                    f"<bladeGuid>{hashlib.md5(n.name.encode()).hexdigest()}</bladeGuid>"  # noqa: S324
                    f"<bladeName>BLADE{n.key}</bladeName><powerState>{n.power.upper()}</powerState>"
                    f"<bladeMacAddress><NicInfo><deviceId>1</deviceId><macAddress>{self._mac(n)}</macAddress>"
                    "</NicInfo></bladeMacAddress></BladeInfo>"
                    for n in sorted(self.nodes.values(), key=lambda n: int(n.key))
                )
                return _ocs("ChassisInfoResponse", "Success", f"<bladeCollections>{infos}</bladeCollections>")
            blade = req.query.get("bladeid", "")
            if not blade.isdigit() or not 1 <= int(blade) <= self.blades:
                return _ocs("BladeResponse", "ParameterOutOfRange", description="bladeid out of range")
            node = self.nodes.get(blade)
            if node is None:
                return _ocs("BladeResponse", "CommandNotValidForBlade", description="blade slot is empty")
            inner = f"<bladeNumber>{blade}</bladeNumber>"
            if command == "GetBladeState":
                node.counts["query"] += 1
                return _ocs("BladeStateResponse", "Success", inner + f"<bladeState>{node.power.upper()}</bladeState>")
            if command in ("SetBladeOn", "SetBladeOff", "SetBladeActivePowerCycle"):
                key = {"SetBladeOn": "on", "SetBladeOff": "off", "SetBladeActivePowerCycle": "cycle"}[command]
                node.counts[key] += 1
                node.power = "off" if key == "off" else "on"
                return _ocs("BladeResponse", "Success", inner)
            if command == "SetNextBoot":
                boot = {"2": "pxe", "3": "disk", "5": "bios"}.get(req.query.get("bootType", ""))
                if boot is None:
                    return _ocs("BootResponse", "ParameterOutOfRange", inner, "bad bootType")
                node.counts["boot"] += 1
                node.boot = boot
                node.extra["boot_persistent"] = req.query.get("persistent")
                node.extra["boot_uefi"] = req.query.get("uefi")
                return _ocs("BootResponse", "Success", inner + f"<nextBoot>{boot}</nextBoot>")
        return Reply(404, "Not Found")


# -- Intel RSD pod manager -----------------------------------------------------------


def _rf_error(status: int, code: str, message: str,
              headers: Iterable[tuple[str, str]] = ()) -> Reply:
    return json_reply(status, {"error": {"code": code, "message": message, "@Message.ExtendedInfo": [
        {"MessageId": code, "Message": message}]}}, headers)


class RsdDevice(Device):
    """An RSD pod manager: ``/redfish/v1/Nodes`` and its composed nodes, basic auth,
    Redfish error bodies. A node created with ``extra={"composed": "Allocated"}`` must be
    assembled (``ComposedNode.Assemble``, counted as ``assemble``) before it powers on."""

    kind = "rsd"
    NODES = "/redfish/v1/Nodes"
    RESETS = ["On", "ForceOff", "GracefulShutdown", "ForceRestart", "PowerCycle"]

    def __init__(self, nodes: list[Node], **kwargs: Any) -> None:
        for node in nodes:
            node.extra.setdefault("composed", "Assembled")
            node.extra.setdefault("assemble", 0)
        super().__init__(nodes, **kwargs)

    def node_for(self, req: Request) -> Node | None:
        rest = req.path[len(self.NODES) + 1:] if req.path.startswith(self.NODES + "/") else ""
        return self.nodes.get(rest.split("/", 1)[0]) if rest else None

    def auth_reply(self, req: Request) -> Reply:
        return _rf_error(401, "Base.1.0.InsufficientPrivilege", "authentication required",
                         [("WWW-Authenticate", 'Basic realm="PODM"')])

    def busy_reply(self, req: Request) -> Reply:
        return _rf_error(503, "Base.1.0.ServiceTemporarilyUnavailable", "the pod manager is busy",
                         [("Retry-After", "1")])

    def _doc(self, node: Node) -> dict[str, Any]:
        path = f"{self.NODES}/{node.key}"
        power = "On" if node.power == "on" else "Off"
        if node.fault == "powering":
            power = "PoweringOn"
        boot = {"Pxe": "pxe", "Hdd": "disk", "Cd": "cdrom", "BiosSetup": "bios"}
        return {
            "@odata.id": path, "@odata.type": "#ComposedNode.v1_1_0.ComposedNode", "Id": node.key,
            "Name": f"Composed Node {node.key}", "UUID": f"00000000-0000-4000-8000-{int(node.key):012d}",
            "PowerState": power, "ComposedNodeState": node.extra["composed"],
            "Boot": {"BootSourceOverrideEnabled": node.extra.get("boot_enabled", "Disabled"),
                     "BootSourceOverrideTarget": next((k for k, v in boot.items() if v == node.boot), "None"),
                     "BootSourceOverrideTarget@Redfish.AllowableValues": ["None", "Pxe", "Hdd"],
                     "BootSourceOverrideMode": node.extra.get("boot_mode", "Legacy")},
            "Actions": {"#ComposedNode.Reset": {"target": f"{path}/Actions/ComposedNode.Reset",
                                               "ResetType@Redfish.AllowableValues": self.RESETS},
                        "#ComposedNode.Assemble": {"target": f"{path}/Actions/ComposedNode.Assemble"}},
        }

    def handle(self, req: Request) -> Reply:
        node = self.node_for(req)
        if not self.basic_ok(req):
            self.refused(node)
            return self.auth_reply(req)
        with self.lock:
            if req.path.rstrip("/") == self.NODES and req.method == "GET":
                members = [{"@odata.id": f"{self.NODES}/{n.key}"} for n in self.nodes.values()]
                return json_reply(200, {"@odata.id": self.NODES, "Members@odata.count": len(members),
                                        "Members": members})
            if node is None:
                return _rf_error(404, "Base.1.0.ResourceMissingAtURI", f"{req.path} not found")
            sub = req.path[len(f"{self.NODES}/{node.key}"):].strip("/")
            if not sub and req.method == "GET":
                node.counts["query"] += 1
                return json_reply(200, self._doc(node))
            if not sub and req.method == "PATCH":
                boot = req.json().get("Boot") or {}
                target = boot.get("BootSourceOverrideTarget")
                if target not in ("None", "Pxe", "Hdd"):
                    return _rf_error(400, "Base.1.0.PropertyValueNotInList", "bad boot target")
                node.counts["boot"] += 1
                node.boot = {"Pxe": "pxe", "Hdd": "disk"}.get(target)
                node.extra["boot_enabled"] = boot.get("BootSourceOverrideEnabled")
                node.extra["boot_mode"] = boot.get("BootSourceOverrideMode", "Legacy")
                return Reply(204)
            if sub == "Actions/ComposedNode.Assemble" and req.method == "POST":
                if node.extra["composed"] != "Allocated":
                    return _rf_error(400, "Base.1.0.ActionNotSupported", "node is not Allocated")
                node.extra["assemble"] += 1
                node.extra["composed"] = "Assembled"
                return Reply(204)
            if sub == "Actions/ComposedNode.Reset" and req.method == "POST":
                if node.extra["composed"] != "Assembled":
                    return _rf_error(409, "Base.1.0.ResourceInUse", "node is not assembled")
                reset = req.json().get("ResetType")
                key = {"On": "on", "ForceOff": "off", "GracefulShutdown": "soft_off",
                       "ForceRestart": "reset", "PowerCycle": "cycle"}.get(reset)
                if key is None:
                    return _rf_error(400, "Base.1.0.ActionParameterValueNotInList", "bad ResetType")
                node.counts[key] += 1
                node.power = "off" if key in ("off", "soft_off") else "on"
                return Reply(204)
        return _rf_error(405, "Base.1.0.OperationNotAllowed", "method not allowed")


# -- Cisco UCS Manager ---------------------------------------------------------------


class UcsmDevice(Device):
    """A UCS Manager's XML API: every call is one XML document POSTed to ``/nuova``.
    Nodes are servers keyed by UUID: blades (``computeBlade``) or, with
    ``extra={"rack": True}``, rack units; each with a service profile (``assignedToDn``;
    ``extra={"profile": ""}`` for none) holding an ``lsPower``, and one adaptor with one
    host NIC. Login cookies are manager-wide: ``sessions`` / ``open_sessions`` are
    counted on every node. Errors as UCS gives them: 551 authentication failed, 552
    authorization required (unknown cookie), 572 maximum session limit (the busy reply,
    also given when ``max_sessions`` cookies are open)."""

    kind = "ucsm"
    POWER_COUNTS = {"admin-up": "on", "admin-down": "off", "soft-shut-down": "soft_off",
                    "cycle-immediate": "cycle", "hard-reset-immediate": "reset"}

    def __init__(self, nodes: list[Node], max_sessions: int = 4, **kwargs: Any) -> None:
        self.max_sessions = max_sessions
        self.cookies: set[str] = set()
        for i, node in enumerate(nodes, 1):
            rack = node.extra.get("rack", False)
            node.extra.setdefault("dn", f"sys/rack-unit-{i}" if rack else f"sys/chassis-1/blade-{i}")
            node.extra.setdefault("profile", f"org-root/ls-{node.name}")
            node.extra.setdefault("mac", f"00:25:b5:00:00:{i:02x}")
        super().__init__(nodes, **kwargs)

    @staticmethod
    def _parse(req: Request) -> Any:
        from xml.etree import ElementTree

        return ElementTree.fromstring(req.body)

    def node_for(self, req: Request) -> Node | None:
        try:
            doc = self._parse(req)
        except Exception:  # noqa: BLE001 - not XML: no node
            return None
        values = {doc.get("dn", ""), doc.get("inDn", "")} | {e.get("value", "") for e in doc.iter("eq")}
        for node in self.nodes.values():
            if node.key in values or any(v and (v.startswith(node.extra["dn"]) or (
                    node.extra["profile"] and v.startswith(node.extra["profile"]))) for v in values):
                return node
        return None

    @staticmethod
    def _error(method: str, code: str, descr: str) -> Reply:
        return xml_reply(200, f'<{method} cookie="" response="yes" errorCode="{code}" '
                              f'invocationResult="unidentified-fail" errorDescr="{descr}"/>')

    def auth_reply(self, req: Request) -> Reply:
        return self._error("aaaLogin", "551", "Authentication failed")

    def busy_reply(self, req: Request) -> Reply:
        return self._error("aaaLogin", "572", "User reached maximum session limit")

    def garbage_reply(self, req: Request) -> Reply:
        return xml_reply(200, "<aaaLogin response=")

    def _sessions_changed(self, login: bool) -> None:
        for node in self.nodes.values():
            node.counts["sessions"] += int(login)
            node.counts["open_sessions"] = len(self.cookies)

    def _server(self, node: Node) -> str:
        tag = "computeRackUnit" if node.extra.get("rack") else "computeBlade"
        power = "unknown" if node.fault == "powering" else node.power
        return (f'<{tag} dn="{node.extra["dn"]}" uuid="{node.key}" operPower="{power}" '
                f'assignedToDn="{node.extra["profile"]}" association="associated" '
                f'model="UCSB-B200-M5" serial="FCH{abs(hash(node.key)) % 10**7:07d}"/>')

    def handle(self, req: Request) -> Reply:
        if req.path != "/nuova" or req.method != "POST":
            return Reply(404, "Not Found")
        doc = self._parse(req)
        method = doc.tag
        with self.lock:
            if method == "aaaLogin":
                if doc.get("inName") != self.user or doc.get("inPassword") != self.password:
                    self.refused(None)
                    return self.auth_reply(req)
                if len(self.cookies) >= self.max_sessions:
                    return self.busy_reply(req)
                cookie = f"{int(time.time())}/{secrets.token_hex(16)}"
                self.cookies.add(cookie)
                self._sessions_changed(True)
                return xml_reply(200, f'<aaaLogin cookie="" response="yes" outCookie="{cookie}" '
                                      f'outRefreshPeriod="600" outPriv="admin" outVersion="4.2(1d)" '
                                      f'outName="{self.user}"/>')
            if method == "aaaLogout":
                self.cookies.discard(doc.get("inCookie", ""))
                self._sessions_changed(False)
                return xml_reply(200, '<aaaLogout cookie="" response="yes" outStatus="success"/>')
            cookie = doc.get("cookie", "")
            if cookie not in self.cookies:
                return self._error(method, "552", "Authorization required")
            head = f'<{method} cookie="{cookie}" response="yes"'
            if method == "configResolveClass" and doc.get("classId") == "computeItem":
                wanted = {e.get("value", "").lower() for e in doc.iter("eq")}
                found = [n for n in self.nodes.values() if not wanted or n.key.lower() in wanted]
                for node in found:
                    node.counts["query"] += 1
                body = "".join(self._server(n) for n in found)
                return xml_reply(200, f'{head} classId="computeItem"><outConfigs>{body}</outConfigs></{method}>')
            if method == "configResolveChildren":
                return self._children(head, method, doc.get("inDn", ""), doc.get("classId", ""))
            if method == "configConfMo":
                return self._conf(head, method, doc)
            return self._error(method, "103", "unsupported method")

    def _children(self, head: str, method: str, dn: str, class_id: str) -> Reply:
        out = ""
        for node in self.nodes.values():
            profile, server = node.extra["profile"], node.extra["dn"]
            if class_id == "lsPower" and profile and dn == profile:
                state = "up" if node.power == "on" else "down"
                out = f'<lsPower dn="{profile}/power" state="{state}"/>'
            elif class_id == "adaptorUnit" and dn == server:
                out = f'<adaptorUnit dn="{server}/adaptor-1" model="UCSB-MLOM-40G-04"/>'
            elif class_id == "adaptorHostEthIf" and dn == f"{server}/adaptor-1":
                out = f'<adaptorHostEthIf dn="{server}/adaptor-1/host-eth-1" mac="{node.extra["mac"].upper()}"/>'
        return xml_reply(200, f'{head} classId="{class_id}"><outConfigs>{out}</outConfigs></{method}>')

    def _conf(self, head: str, method: str, doc: Any) -> Reply:
        dn = doc.get("dn", "")
        power = doc.find("inConfig/lsPower")
        node = next((n for n in self.nodes.values()
                     if n.extra["profile"] and dn == f'{n.extra["profile"]}/power'), None)
        if power is None or node is None:
            return self._error(method, "103", f"no object {dn}")
        key = self.POWER_COUNTS.get(power.get("state", ""))
        if key is None:
            return self._error(method, "103", "unsupported lsPower state")
        node.counts[key] += 1
        node.power = "off" if key in ("off", "soft_off") else "on"
        return xml_reply(200, f'{head} dn="{dn}"><outConfig><lsPower dn="{dn}" '
                              f'state="{power.get("state")}" status="modified"/></outConfig></{method}>')
