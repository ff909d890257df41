"""HTTP peers written from the vendors' published wire formats (no simulator exists):

- :class:`SeaMicroPeer`: a SeaMicro 15000 chassis' REST API, v0.9 (JSON-RPC envelopes,
  order-dependent query parameters) and v2.0 (JSON, ``authtoken``), with ONE login at a
  time: a second login while a token is live is refused as busy (v2.0: HTTP 503; v0.9:
  JSON-RPC code 503); wrong credentials: HTTP 401 (v2.0) / JSON-RPC 401 (v0.9).
- :class:`AmtPeer`: one Intel AMT firmware's WS-Management service (SOAP 1.2 at ``/wsman``,
  HTTP digest auth), one machine per peer; :func:`amt_fleet` groups several behind one
  control API (:class:`PeerGroup`). Busy: HTTP 500 with the fault ``wsa:EndpointUnavailable``.
- :class:`NovaPeer`: Keystone v3 (``/identity/v3/auth/tokens``) and Nova's compute API
  (``/compute/v2.1``) for the instances of one project; busy: HTTP 503, and Nova's 409
  Conflict for a task under way (:meth:`NovaPeer.set_task`).

Each serves on ``http.server`` (a real HTTP server) in a thread of the test process and
counts per node what it receives (control API of :mod:`tests.peers.common`: ``on``,
``off``, ``soft_off``, ``cycle``, ``reset``, ``boot``, ``query``, ``sessions``,
``open_sessions``). Faults: ``auth`` (refuse credentials), ``busy`` (the vendor's busy
reply), ``no_answer`` (accept the connection, never answer until the fault is cleared),
``slow`` (answer after ``latency`` s), ``garbage`` (a malformed body).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.peers.common import SimNode, serve_control

COUNT_KEYS = ("on", "off", "soft_off", "cycle", "reset", "boot", "query", "sessions",
              "open_sessions", "auth_failures")


@dataclass
class NodeState:
    """One simulated node's state (the attributes the IPMI chassis' Target also has)."""

    name: str
    power: str = "off"
    boot: str | None = None
    fault: str = "none"
    latency: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))

    def snapshot(self) -> dict[str, Any]:
        return {"power": self.power, "boot": self.boot, "counts": dict(self.counts),
                "fault": self.fault, "latency": self.latency}


class HttpPeer:
    """Base: nodes, a lock, the control API, an HTTP server whose handler calls
    :meth:`handle` (``method, path, query, headers, body`` -> ``status, headers, body``)."""

    def __init__(self, nodes: list[SimNode], *, host: str = "127.0.0.1", port: int = 0,
                 states: dict[str, Any] | None = None, lock: Any = None,
                 control: bool = True) -> None:
        self.sim_nodes = list(nodes)
        self.lock = lock or threading.RLock()
        self.states: dict[str, Any] = states if states is not None else {
            n.name: NodeState(n.name, power=n.power) for n in nodes}
        self.sessions_open = 0
        self.fault_cleared = threading.Event()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                fault, latency = peer.fault_for(parts.path, body)
                if fault == "no_answer":
                    peer.fault_cleared.wait(30)
                    self.close_connection = True
                    return
                if fault == "slow":
                    time.sleep(latency or 1.0)
                try:
                    status, headers, reply = peer.handle(self.command, parts.path, parts.query,
                                                         self.headers, body, fault)
                except Exception as exc:  # a peer bug answers 500, never kills the server
                    status, headers, reply = 500, {"Content-Type": "text/plain"}, repr(exc).encode()
                if fault == "garbage" and status < 300:
                    reply = b"\x00<not-what-you-expect"
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name=type(self).__name__,
                         daemon=True).start()
        self._control = serve_control(self) if control else None
        self.control_port = self._control[1] if self._control else None

    # -- what subclasses provide ---------------------------------------------------

    def fault_for(self, path: str, body: bytes) -> tuple[str, float]:
        """The fault acting on a request (default: the first faulty node's)."""
        with self.lock:
            for state in self.states.values():
                if state.fault != "none":
                    return state.fault, state.latency
        return "none", 0.0

    def handle(self, method: str, path: str, query: str, headers: Any, body: bytes,
               fault: str) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    # -- control API backend -------------------------------------------------------

    def nodes(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            out = {}
            for name, state in self.states.items():
                snap = state.snapshot()
                snap["counts"]["open_sessions"] = self.sessions_open
                out[name] = snap
            return out

    def node(self, name: str) -> dict[str, Any]:
        return self.nodes()[name]

    def set_fault(self, name: str, fault: str, latency: float = 0.0) -> None:
        with self.lock:
            self.states[name].fault, self.states[name].latency = fault, float(latency)
            if all(s.fault != "no_answer" for s in self.states.values()):
                self.fault_cleared.set()
            else:
                self.fault_cleared.clear()

    fault = set_fault

    def set_state(self, name: str, power: str) -> None:
        if power not in ("on", "off"):
            raise KeyError(power)
        with self.lock:
            self.states[name].power = power

    def reset_counts(self) -> None:
        with self.lock:
            for state in self.states.values():
                for key in state.counts:
                    state.counts[key] = 0

    reset = reset_counts

    def stop(self) -> None:
        self.fault_cleared.set()
        self.server.shutdown()
        self.server.server_close()
        if self._control:
            self._control[0].shutdown()
            self._control[0].server_close()

    def __enter__(self) -> HttpPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def json_reply(status: int, body: Any, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


def bump(state: Any, key: str) -> None:
    """Count one ``key`` on a node (states shared with other peers may lack the key)."""
    state.counts[key] = state.counts.get(key, 0) + 1


def power_on(state: Any) -> None:
    bump(state, "on")
    if state.power == "off":
        state.power = "on"
        if hasattr(state, "_boot_now"):
            state._boot_now()


# -- SeaMicro REST ----------------------------------------------------------------------


class SeaMicroPeer(HttpPeer):
    """A SeaMicro 15000 chassis' REST API (v0.9 and v2.0), one login at a time.

    ``nodes`` carry ``system_id``; ``states`` / ``lock`` may be shared with the chassis'
    IPMI peer (:class:`tests.peers.ipmi_variants.ChassisPeer`), so that both wires act
    on the same servers. A token expires after ``token_ttl`` s idle.
    """

    def __init__(self, nodes: list[SimNode], user: str, password: str, *, token_ttl: float = 60.0,
                 **kwargs: Any) -> None:
        self.user, self.password, self.token_ttl = user, password, token_ttl
        self.by_sid = {str(n.power_parameters["system_id"]).split("/")[0]: n.name for n in nodes}
        self.token: str | None = None
        self.token_used = 0.0
        super().__init__(nodes, **kwargs)

    def _live_token(self) -> str | None:
        if self.token and time.monotonic() - self.token_used > self.token_ttl:
            self.token = None
            self.sessions_open = 0
        return self.token

    def _login(self, user: str, password: str, fault: str) -> tuple[str, str | None]:
        """-> ("ok" | "auth" | "busy", token)."""
        for state in self.states.values():
            bump(state, "sessions")
        if fault == "auth" or (user, password) != (self.user, self.password):
            for state in self.states.values():
                bump(state, "auth_failures")
            return "auth", None
        if fault == "busy" or self._live_token():
            return "busy", None
        self.token = f"OpaqueRef:{secrets.token_hex(8)}"
        self.token_used = time.monotonic()
        self.sessions_open = 1
        return "ok", self.token

    def _check(self, token: str | None) -> bool:
        if token and token == self._live_token():
            self.token_used = time.monotonic()
            return True
        return False

    def _logout(self, token: str | None) -> None:
        if self._check(token):
            self.token = None
            self.sessions_open = 0

    def _act(self, sid: str, action: str, pxe: bool, force: bool) -> bool:
        name = self.by_sid.get(sid)
        if name is None:
            return False
        state = self.states[name]
        if action == "on":
            if pxe:
                state.boot = "pxe"
            power_on(state)
        elif action == "off":
            bump(state, "off" if force else "soft_off")
            state.power = "off"
        elif action == "reset":
            bump(state, "reset")
            if pxe:
                state.boot = "pxe"
            state.power = "on"
        return True

    def _row(self, sid: str) -> dict[str, Any]:
        state = self.states[self.by_sid[sid]]
        return {"active": state.power == "on",
                "nic": {str(n): {"macAddr": f"00:22:99:{int(sid):02x}:00:{n:02x}"} for n in range(2)}}

    def handle(self, method: str, path: str, query: str, headers: Any, body: bytes,
               fault: str) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            if path.startswith("/v0.9/"):
                return self._v09(method, path[len("/v0.9/"):], query, fault)
            if path.startswith("/v2.0/"):
                return self._v2(method, path[len("/v2.0/"):], query, body, fault)
        return self.json_reply(404, {"error": "not found"})

    # v0.9: every reply is HTTP 200 with a JSON-RPC envelope
    @staticmethod
    def _rpc(code: int, result: Any = None, message: str = "") -> tuple[int, dict[str, str], bytes]:
        return HttpPeer.json_reply(200, {"error": {"code": code, "message": message}, "result": result})

    def _v09(self, method: str, path: str, query: str, fault: str) -> tuple[int, dict[str, str], bytes]:
        args = [unquote(a) for a in query.split("&") if a] if query else []
        named = dict(a.split("=", 1) for a in args if "=" in a)
        plain = [a for a in args if "=" not in a]
        if path == "login" and method == "GET":
            user = named.get("username", plain[0] if plain else "")
            password = named.get("password", plain[1] if len(plain) > 1 else "")
            outcome, token = self._login(user, password, fault)
            if outcome == "auth":
                return self._rpc(401, message="Invalid username or password")
            if outcome == "busy":
                return self._rpc(503, message="Another user is logged in")
            return self._rpc(200, token)
        token = plain[-1] if plain else None
        if not self._check(token):
            return self._rpc(401, message="Unauthorized: log in first")
        if path == "logout":
            self._logout(token)
            return self._rpc(200, "ok")
        if path in ("servers", "servers/all") and method == "GET":
            rows: dict[str, Any] = {}
            for index, sid in enumerate(sorted(self.by_sid, key=int)):
                state = self.states[self.by_sid[sid]]
                bump(state, "query")
                for nic in range(2):
                    rows[str(index * 2 + nic)] = {
                        "serverId": f"{sid}/0", "serverNIC": str(nic),
                        "serverMacAddr": f"00:22:99:{int(sid):02x}:00:{nic:02x}",
                        "serverActive": state.power == "on"}
            if path == "servers":
                return self._rpc(200, {"serverId": {k: v["serverId"] for k, v in rows.items()}})
            return self._rpc(200, rows)
        if path.startswith("servers/") and method == "PUT":
            index = path.split("/", 1)[1]
            sids = sorted(self.by_sid, key=int)
            try:
                sid = sids[int(index) // 2]
            except (ValueError, IndexError):
                return self._rpc(404, message="No such server")
            action = {"Power-On": "on", "Power-Off": "off", "Reset": "reset"}.get(named.get("action", ""))
            if action is None:
                return self._rpc(400, message="Invalid action")
            self._act(sid, action, named.get("using-pxe") == "true", named.get("force") == "true")
            return self._rpc(200, True)
        return self._rpc(404, message="Unknown resource")

    def _v2(self, method: str, path: str, query: str, body: bytes, fault: str
            ) -> tuple[int, dict[str, str], bytes]:
        params = dict(parse_qsl(query))
        data: dict[str, Any] = {}
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                return self.json_reply(400, {"error": "malformed JSON"})
        if path == "login" and method == "POST":
            outcome, token = self._login(str(data.get("username", "")), str(data.get("password", "")), fault)
            if outcome == "auth":
                return self.json_reply(401, {"error": "Invalid username or password"})
            if outcome == "busy":
                return self.json_reply(503, {"error": "Another user is logged in"})
            return self.json_reply(200, token)
        token = params.get("authtoken") if method in ("GET", "DELETE") else data.get("authtoken")
        if not self._check(token):
            return self.json_reply(401, {"error": "Unauthorized"})
        if path == "logout":
            self._logout(token)
            return self.json_reply(200, "ok")
        if path == "servers" and method == "GET":
            out = {}
            for sid in sorted(self.by_sid, key=int):
                bump(self.states[self.by_sid[sid]], "query")
                out[f"{sid}/0"] = self._row(sid)
            return self.json_reply(200, out)
        if path.startswith("servers/"):
            sid, _, nic = path[len("servers/"):].partition("/")
            if sid not in self.by_sid or nic != "0":
                return self.json_reply(404, {"error": f"Server {sid}/{nic} not found"})
            if method == "GET":
                bump(self.states[self.by_sid[sid]], "query")
                return self.json_reply(200, self._row(sid))
            if method == "PUT":
                action = {"power-on": "on", "power-off": "off", "reset": "reset"}.get(str(data.get("action")))
                if action is None:
                    return self.json_reply(400, {"error": "Invalid action"})
                self._act(sid, action, bool(data.get("using-pxe")), bool(data.get("force")))
                return self.json_reply(200, {})
        return self.json_reply(404, {"error": "Unknown resource"})



# -- groups of peers ----------------------------------------------------------------------


class PeerGroup:
    """Several peers (e.g. one AMT per machine) behind one control API."""

    def __init__(self, peers: list[HttpPeer]) -> None:
        self.peers = list(peers)
        self.sim_nodes = [n for p in self.peers for n in p.sim_nodes]
        self._owner = {name: p for p in self.peers for name in p.states}
        self._control = serve_control(self)
        self.control_port = self._control[1]

    def nodes(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for peer in self.peers:
            out.update(peer.nodes())
        return out

    def node(self, name: str) -> dict[str, Any]:
        return self._owner[name].node(name)

    def set_fault(self, name: str, fault: str, latency: float = 0.0) -> None:
        self._owner[name].set_fault(name, fault, latency)

    fault = set_fault

    def set_state(self, name: str, power: str) -> None:
        self._owner[name].set_state(name, power)

    def reset_counts(self) -> None:
        for peer in self.peers:
            peer.reset_counts()

    reset = reset_counts

    def stop(self) -> None:
        self._control[0].shutdown()
        self._control[0].server_close()
        for peer in self.peers:
            peer.stop()

    def __enter__(self) -> PeerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- Intel AMT WS-Management ----------------------------------------------------------------

SOAP = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
WSMAN = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
CIM = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/"
AMT_NS = "http://intel.com/wbem/wscim/1/amt-schema/1/"
AMT_SOURCES = {"Intel(r) AMT: Force PXE Boot": "pxe", "Intel(r) AMT: Force Hard-drive Boot": "disk",
               "Intel(r) AMT: Force CD/DVD Boot": "cdrom"}
BOOT_DATA_FIELDS = ("BIOSPause", "BIOSSetup", "BootMediaIndex", "ConfigurationDataReset",
                    "ElementName", "FirmwareVerbosity", "ForcedProgressEvents", "IDERBootDevice",
                    "InstanceID", "LockKeyboard", "LockPowerButton", "LockResetButton",
                    "LockSleepButton", "ReflashBIOS", "UseIDER", "UseSOL", "UseSafeMode",
                    "UserPasswordBypass")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _find(elem: Any, name: str) -> Any:
    for child in elem.iter():
        if _local(child.tag) == name:
            return child
    return None


class AmtPeer(HttpPeer):
    """One Intel AMT firmware's WS-Management service (``/wsman``, HTTP digest auth), for
    one machine. Faults: ``auth`` -> 401 always; ``busy`` -> HTTP 500 with the SOAP fault
    ``wsa:EndpointUnavailable`` (AMT's answer while its connection slots or its firmware
    are taken); ``no_answer``, ``slow``, ``garbage`` from :class:`HttpPeer`.

    ``RequestPowerStateChange``: 2 on (ReturnValue 2 when already on, as AMT refuses it),
    8 off hard, 12 off soft, 10 master bus reset (ReturnValue 2 when off). Next boot: a
    ``ChangeBootOrder`` source then ``SetBootConfigRole`` role 1 sets ``boot``; the
    ``AMT_BootSettingData`` instance is kept and readable / writable.
    """

    realm = "Digest:4A1B0000000000000000000000000000"

    def __init__(self, node: SimNode, user: str, password: str, **kwargs: Any) -> None:
        self.user, self.password = user, password
        self.nonces: set[str] = set()
        self.pending_source: str | None = None
        self.boot_data = {f: "false" for f in BOOT_DATA_FIELDS}
        self.boot_data.update(BootMediaIndex="0", FirmwareVerbosity="0", IDERBootDevice="0",
                              ElementName="Intel(r) AMT Boot Configuration Settings",
                              InstanceID="Intel(r) AMT:BootSettingData 0")
        self.last_put: dict[str, str] = {}
        super().__init__([node], **kwargs)
        self.name = node.name

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # digest authentication (RFC 2617, qop=auth, MD5)
    def _challenge(self) -> tuple[int, dict[str, str], bytes]:
        nonce = secrets.token_hex(16)
        self.nonces.add(nonce)
        header = f'Digest realm="{self.realm}", nonce="{nonce}", stale="false", qop="auth"'
        return 401, {"WWW-Authenticate": header, "Content-Type": "text/html"}, \
            b"<html><head><title>401 Unauthorized</title></head><body>Unauthorized</body></html>"

    def _authorized(self, method: str, header: str) -> bool:
        import hashlib
        import re

        if not header.startswith("Digest "):
            return False
        fields = dict(re.findall(r'(\w+)="?([^",]*)"?', header[7:]))
        if fields.get("nonce") not in self.nonces or fields.get("username") != self.user:
            return False

        def md5(text: str) -> str:
            return hashlib.md5(text.encode()).hexdigest()  # noqa: S324 - the protocol's hash

        ha1 = md5(f"{self.user}:{self.realm}:{self.password}")
        ha2 = md5(f"{method}:{fields.get('uri', '')}")
        want = md5(f"{ha1}:{fields['nonce']}:{fields.get('nc', '')}:{fields.get('cnonce', '')}:"
                   f"{fields.get('qop', '')}:{ha2}")
        return secrets.compare_digest(want, fields.get("response", ""))

    @staticmethod
    def _envelope(action: str, resource: str, body: str) -> bytes:
        return (f'<?xml version="1.0" encoding="UTF-8"?><a:Envelope xmlns:a="{SOAP}" xmlns:b="{WSA}" '
                f'xmlns:c="{WSMAN}"><a:Header><b:To>{WSA}/role/anonymous</b:To>'
                f'<b:Action a:mustUnderstand="true">{action}</b:Action>'
                f'<b:MessageID>uuid:00000000-8086-8086-8086-{secrets.token_hex(6)}</b:MessageID>'
                f'<c:ResourceURI>{resource}</c:ResourceURI></a:Header><a:Body>{body}</a:Body>'
                f'</a:Envelope>').encode()

    def _fault(self, status: int, code: str, subcode: str, reason: str) -> tuple[int, dict[str, str], bytes]:
        body = (f'<a:Fault><a:Code><a:Value>a:{code}</a:Value><a:Subcode><a:Value>{subcode}</a:Value>'
                f'</a:Subcode></a:Code><a:Reason><a:Text xml:lang="en-US">{reason}</a:Text></a:Reason>'
                f'</a:Fault>')
        return status, {"Content-Type": "application/soap+xml;charset=UTF-8"}, \
            self._envelope(f"{WSA}/fault", "", body)

    def _ok(self, action: str, resource: str, body: str) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/soap+xml;charset=UTF-8"}, \
            self._envelope(action + "Response", resource, body)

    def _return(self, action: str, resource: str, method: str, value: int) -> tuple[int, dict[str, str], bytes]:
        return self._ok(action, resource, f'<g:{method}_OUTPUT xmlns:g="{resource}">'
                                          f'<g:ReturnValue>{value}</g:ReturnValue></g:{method}_OUTPUT>')

    def handle(self, method: str, path: str, query: str, headers: Any, body: bytes,
               fault: str) -> tuple[int, dict[str, str], bytes]:
        from xml.etree import ElementTree

        with self.lock:
            state = self.states[self.name]
            if path != "/wsman" or method != "POST":
                return 404, {"Content-Type": "text/html"}, b"<html>Not Found</html>"
            auth = headers.get("Authorization") or ""
            if fault == "auth" or not self._authorized(method, auth):
                bump(state, "auth_failures" if auth else "sessions")  # a challenge: a new nonce
                return self._challenge()
            if fault == "busy":
                return self._fault(500, "Receiver", "b:EndpointUnavailable",
                                   "The specified endpoint is currently unavailable.")
            try:
                doc = ElementTree.fromstring(body)
            except ElementTree.ParseError:
                return self._fault(400, "Sender", "c:SchemaValidationError", "Malformed request")
            action = (_find(doc, "Action").text or "").strip() if _find(doc, "Action") is not None else ""
            resource = (_find(doc, "ResourceURI").text or "").strip() if _find(doc, "ResourceURI") is not None else ""
            header = _find(doc, "Header")
            selectors = {s.get("Name"): (s.text or "") for s in header.iter() if _local(s.tag) == "Selector"
                         and s.get("Name")} if header is not None else {}
            body_elem = _find(doc, "Body")
            payload = next(iter(body_elem), None) if body_elem is not None else None
            return self._dispatch(state, action, resource, selectors, payload)

    def _dispatch(self, state: NodeState, action: str, resource: str, selectors: dict[str, str],
                  payload: Any) -> tuple[int, dict[str, str], bytes]:
        get = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Get"
        put = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Put"
        if action == get and resource == CIM + "CIM_AssociatedPowerManagementService":
            bump(state, "query")
            power = 2 if state.power == "on" else 8
            r = resource
            return self._ok(action, r, (
                f'<g:CIM_AssociatedPowerManagementService xmlns:g="{r}">'
                f'<g:AvailableRequestedPowerStates>{"8</g:AvailableRequestedPowerStates><g:AvailableRequestedPowerStates>10" if power == 2 else "2"}'
                f'</g:AvailableRequestedPowerStates><g:PowerState>{power}</g:PowerState>'
                f'<g:ServiceProvided><b:Address>default</b:Address></g:ServiceProvided>'
                f'</g:CIM_AssociatedPowerManagementService>'))
        if resource == AMT_NS + "AMT_BootSettingData" and action in (get, put):
            if selectors.get("InstanceID") != self.boot_data["InstanceID"]:
                return self._fault(400, "Sender", "c:InvalidSelectors", "The selectors are invalid")
            if action == put and payload is not None:
                for child in payload:
                    if _local(child.tag) in self.boot_data and _local(child.tag) != "InstanceID":
                        self.boot_data[_local(child.tag)] = (child.text or "").strip()
                self.last_put = dict(self.boot_data)
            fields = "".join(f"<g:{k}>{v}</g:{k}>" for k, v in sorted(self.boot_data.items()))
            return self._ok(action, resource, f'<g:AMT_BootSettingData xmlns:g="{resource}">{fields}'
                                              f'</g:AMT_BootSettingData>')
        if action == CIM + "CIM_PowerManagementService/RequestPowerStateChange":
            if selectors.get("Name") != "Intel(r) AMT Power Management Service":
                return self._fault(400, "Sender", "c:InvalidSelectors", "The selectors are invalid")
            text = _find(payload, "PowerState") if payload is not None else None
            wanted = int((text.text or "0").strip()) if text is not None else 0
            return self._return(action, resource, "RequestPowerStateChange", self._power(state, wanted))
        if action == CIM + "CIM_BootConfigSetting/ChangeBootOrder":
            source = _find(payload, "Selector") if payload is not None else None
            name = (source.text or "").strip() if source is not None else ""
            if name and name not in AMT_SOURCES:
                return self._return(action, resource, "ChangeBootOrder", 4)  # invalid reference
            self.pending_source = AMT_SOURCES.get(name)
            return self._return(action, resource, "ChangeBootOrder", 0)
        if action == CIM + "CIM_BootService/SetBootConfigRole":
            role = _find(payload, "Role") if payload is not None else None
            if role is None or (role.text or "").strip() not in ("1", "32768"):
                return self._return(action, resource, "SetBootConfigRole", 5)  # invalid parameter
            if role.text.strip() == "1":
                bump(state, "boot")
                state.boot = self.pending_source
            return self._return(action, resource, "SetBootConfigRole", 0)
        return self._fault(400, "Sender", "b:ActionNotSupported",
                           "The action is not supported by the service.")

    @staticmethod
    def _power(state: NodeState, wanted: int) -> int:
        """Apply one RequestPowerStateChange; its ReturnValue."""
        if wanted == 2:
            bump(state, "on")
            if state.power == "on":
                return 2
            state.power = "on"
        elif wanted in (8, 12):
            bump(state, "off" if wanted == 8 else "soft_off")
            if state.power == "off":
                return 2
            state.power = "off"
        elif wanted == 10:
            bump(state, "reset")
            if state.power == "off":
                return 2
        else:
            return 1  # not supported by this machine
        return 0


def amt_fleet(count: int, rack: str, password: str, *, user: str = "admin", prefix: str = "amt",
              first_host: int = 1) -> PeerGroup:
    """``count`` AMT machines, each its own peer on 127.0.0.1 and a free port."""
    peers: list[HttpPeer] = []
    for i in range(count):
        node = SimNode(f"{prefix}{i + first_host}", rack, "amt")
        peer = AmtPeer(node, user, password, control=False)
        node.power_parameters = {"power_address": peer.address, "power_user": user, "power_pass": password}
        peers.append(peer)
    return PeerGroup(peers)


# -- OpenStack Keystone v3 + Nova -----------------------------------------------------------

NOVA_POWER = {"on": (1, "active"), "off": (4, "stopped")}


@dataclass
class NovaState(NodeState):
    """A Nova instance: ``power`` plus the task under way (``task_state``) and a
    ``vm_state`` override (e.g. ``suspended``)."""

    server_id: str = ""
    task_state: str | None = None
    vm_state: str | None = None


class NovaPeer(HttpPeer):
    """Keystone v3 (``/identity/v3/auth/tokens``) and Nova's compute API
    (``/compute/v2.1``) on one port, for the instances of one project.

    Faults (per instance, acting on requests naming it; ``auth`` acts on every login):
    ``auth`` -> Keystone 401; ``busy`` -> HTTP 503 from nova-api; ``no_answer``, ``slow``,
    ``garbage`` from :class:`HttpPeer`. Nova's own 409 Conflict (``Cannot 'os-start'
    instance ... while it is in vm_state active``) is answered for an action the instance's
    state refuses; :meth:`set_task` sets a task under way (409 ``task_state``).
    Counts: ``sessions`` = tokens issued (on every instance), ``query`` = GETs, ``on`` =
    os-start, ``off`` = os-stop, ``cycle`` = hard reboot.
    """

    def __init__(self, nodes: list[SimNode], *, user: str, password: str, project: str,
                 user_domain: str = "Default", project_domain: str = "Default", **kwargs: Any) -> None:
        self.user, self.password, self.project = user, password, project
        self.user_domain, self.project_domain = user_domain, project_domain
        self.tokens: set[str] = set()
        self.by_id = {str(n.power_parameters["nova_id"]): n.name for n in nodes}
        states = {n.name: NovaState(n.name, power=n.power, server_id=str(n.power_parameters["nova_id"]))
                  for n in nodes}
        super().__init__(nodes, states=states, **kwargs)

    @property
    def auth_url(self) -> str:
        return f"http://{self.host}:{self.port}/identity/v3"

    def set_task(self, name: str, task: str | None) -> None:
        with self.lock:
            self.states[name].task_state = task

    def set_vm_state(self, name: str, vm_state: str | None) -> None:
        with self.lock:
            self.states[name].vm_state = vm_state

    def fault_for(self, path: str, body: bytes) -> tuple[str, float]:
        with self.lock:
            if path.startswith("/identity/"):
                for state in self.states.values():
                    if state.fault == "auth":
                        return "auth", 0.0
                return "none", 0.0
            parts = path.split("/")
            name = self.by_id.get(parts[4]) if len(parts) > 4 and parts[3] == "servers" else None
            if name is None:
                return "none", 0.0
            state = self.states[name]
            return state.fault, state.latency

    def handle(self, method: str, path: str, query: str, headers: Any, body: bytes,
               fault: str) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            if path == "/identity/v3/auth/tokens" and method == "POST":
                return self._login(body, fault)
            if not path.startswith("/compute/v2.1/"):
                return self.json_reply(404, {"error": {"code": 404, "title": "Not Found",
                                                       "message": "The resource could not be found."}})
            if headers.get("X-Auth-Token") not in self.tokens:
                return self.json_reply(401, {"error": {"code": 401, "title": "Unauthorized",
                                                       "message": "The request you have made requires authentication."}},
                                       {"WWW-Authenticate": f"Keystone uri=\"{self.auth_url}\""})
            if fault == "busy":
                return 503, {"Content-Type": "application/json"}, json.dumps({
                    "message": "The server is currently unavailable. Please try again at a later time.",
                    "code": "503 Service Unavailable", "title": "Service Unavailable"}).encode()
            parts = path[len("/compute/v2.1/"):].split("/")
            if len(parts) < 2 or parts[0] != "servers":
                return self.json_reply(404, {"itemNotFound": {"code": 404, "message": "Not found"}})
            name = self.by_id.get(parts[1])
            if name is None:
                return self.json_reply(404, {"itemNotFound": {
                    "code": 404, "message": f"Instance {parts[1]} could not be found."}})
            state = self.states[name]
            if len(parts) == 2 and method == "GET":
                bump(state, "query")
                return self.json_reply(200, {"server": self._server(state)})
            if parts[2:] == ["action"] and method == "POST":
                return self._action(state, body)
            return self.json_reply(405, {"error": "method not allowed"})

    def _login(self, body: bytes, fault: str) -> tuple[int, dict[str, str], bytes]:
        for state in self.states.values():
            bump(state, "sessions")
        try:
            auth = json.loads(body)["auth"]
            user = auth["identity"]["password"]["user"]
            scope = auth["scope"]["project"]
        except (ValueError, KeyError, TypeError):
            return self.json_reply(400, {"error": {"code": 400, "title": "Bad Request",
                                                   "message": "Expecting to find auth in request body."}})
        good = (user.get("name") == self.user and user.get("password") == self.password
                and (user.get("domain") or {}).get("name") == self.user_domain)
        if fault == "auth" or not good:
            for state in self.states.values():
                bump(state, "auth_failures")
            return self.json_reply(401, {"error": {"code": 401, "title": "Unauthorized",
                                                   "message": "The request you have made requires authentication."}})
        if scope.get("name") != self.project or (scope.get("domain") or {}).get("name") != self.project_domain:
            return self.json_reply(401, {"error": {"code": 401, "title": "Unauthorized",
                                                   "message": "The request you have made requires authentication."}})
        token = "gAAAAA" + secrets.token_urlsafe(24)
        self.tokens.add(token)
        base = f"http://{self.host}:{self.port}"
        catalog = [
            {"type": "identity", "name": "keystone", "endpoints": [
                {"interface": "public", "region": "RegionOne", "url": f"{base}/identity"}]},
            {"type": "compute", "name": "nova", "endpoints": [
                {"interface": "admin", "region": "RegionOne", "url": "http://192.0.2.1:8774/v2.1"},
                {"interface": "internal", "region": "RegionOne", "url": "http://192.0.2.1:8774/v2.1"},
                {"interface": "public", "region": "RegionOne", "url": f"{base}/compute/v2.1"}]},
        ]
        return self.json_reply(201, {"token": {"methods": ["password"], "catalog": catalog,
                                               "project": {"name": self.project},
                                               "expires_at": "2099-01-01T00:00:00.000000Z"}},
                               {"X-Subject-Token": token})

    @staticmethod
    def _server(state: NovaState) -> dict[str, Any]:
        power, vm_state = NOVA_POWER[state.power]
        if state.vm_state == "suspended":
            power = 7
        return {"id": state.server_id, "name": state.name,
                "status": {"active": "ACTIVE", "stopped": "SHUTOFF"}.get(state.vm_state or vm_state, "SUSPENDED"),
                "OS-EXT-STS:power_state": power, "OS-EXT-STS:vm_state": state.vm_state or vm_state,
                "OS-EXT-STS:task_state": state.task_state}

    def _action(self, state: NovaState, body: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            data = json.loads(body)
            (name, value), = data.items()
        except (ValueError, TypeError):
            return self.json_reply(400, {"badRequest": {"code": 400, "message": "Malformed request body"}})
        vm_state = state.vm_state or NOVA_POWER[state.power][1]

        def conflict(what: str) -> tuple[int, dict[str, str], bytes]:
            return self.json_reply(409, {"conflictingRequest": {"code": 409, "message":
                                   f"Cannot '{name}' instance {state.server_id} while it is in {what}"}})

        if name not in ("os-start", "os-stop", "reboot"):
            return self.json_reply(400, {"badRequest": {"code": 400, "message": f"Invalid action {name}"}})
        if state.task_state:
            return conflict(f"task_state {state.task_state}")
        if name == "os-start":
            bump(state, "on")
            if vm_state != "stopped":
                return conflict(f"vm_state {vm_state}")
            state.power = "on"
        elif name == "os-stop":
            bump(state, "off")
            if vm_state not in ("active", "error"):
                return conflict(f"vm_state {vm_state}")
            state.power = "off"
        else:
            if (value or {}).get("type") != "HARD":
                return self.json_reply(400, {"badRequest": {"code": 400, "message": "Invalid reboot type"}})
            bump(state, "cycle")
            if vm_state not in ("active", "stopped", "error"):
                return conflict(f"vm_state {vm_state}")
            state.power = "on"
        return 202, {"Content-Type": "application/json"}, b""

    def set_state(self, name: str, power: str) -> None:
        super().set_state(name, power)
        with self.lock:
            self.states[name].vm_state = None
            self.states[name].task_state = None


def nova_cloud(count: int, rack: str, password: str, *, user: str = "maas", project: str = "maas",
               prefix: str = "nova") -> NovaPeer:
    """A Keystone + Nova peer with ``count`` instances, and their inventory parameters."""
    nodes = [SimNode(f"{prefix}{i + 1}", rack, "nova",
                     {"nova_id": f"9a0c5e1e-0000-4000-8000-{i + 1:012x}"}) for i in range(count)]
    peer = NovaPeer(nodes, user=user, password=password, project=project)
    for node in nodes:
        node.power_parameters.update(os_authurl=peer.auth_url, os_tenantname=project, os_username=user,
                                     os_password=password)
    return peer
