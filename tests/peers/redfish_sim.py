"""A simulated Redfish fleet: sushy-tools' emulator (the real peer), one BMC per address.

The emulator's Flask app runs in this process over libvirt's in-process test driver
(``test:///default``, which applies power changes at once, unlike the emulator's fake
backend and its random 1-11 s delay). Every node is one libvirt test domain and one BMC:
its own loopback address (127.x.y.z) and port, serving only its own system. A WSGI
middleware in front of the emulator, per BMC:

- enforces HTTP basic auth or a session token with the BMC's own user and password;
- serves a minimal SessionService (``POST /redfish/v1/SessionService/Sessions`` ->
  ``X-Auth-Token`` + ``Location``; ``DELETE`` of that location; at most
  :data:`MAX_SESSIONS` open, then 503) and links it from the service root;
- counts what it receives (:data:`COUNT_KEYS`) and injects faults (``no_answer``: hang
  until the fault is cleared; ``slow``: latency; ``auth``: 401; ``busy``: 503;
  ``garbage``: a malformed JSON body; ``powering``: ``PowerState`` reads ``PoweringOn``).

It serves the control API of :mod:`tests.peers.common` on 127.0.0.1. Start it with
:func:`start_fleet` (a subprocess that exits when its parent dies), or by hand::

    python -m tests.peers.redfish_sim --spec fleet.json --control-port 9100

where ``fleet.json`` is ``{"nodes": [SimNode.to_json(), ...]}`` (see :func:`make_nodes`).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import ipaddress
import json
import logging
import os
import secrets
import selectors
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.peers import common
from tests.peers.common import PeerControl, SimNode, free_port, serve_control

COUNT_KEYS = ("on", "off", "soft_off", "cycle", "reset", "boot", "query", "sessions", "open_sessions",
              "auth_failures")
"""The control API's count keys, plus ``auth_failures``: requests refused for bad credentials."""
EXTRA_FAULTS = ("garbage", "powering")
"""Faults this peer adds to :data:`tests.peers.common.FAULTS`."""
MAX_SESSIONS = 8
"""Open sessions per BMC before a login is refused with 503 (like many real BMCs)."""
DEFAULT_PASSWORD = "redfish-Secret-1"
SYSTEM_NAMESPACE = uuid.UUID("7c1e4d2a-9b7f-4c43-8d0e-1f5a0e6b2c11")

_RESET_COUNTS = {
    "On": "on",
    "ForceOn": "on",
    "ForceOff": "off",
    "GracefulShutdown": "soft_off",
    "PowerCycle": "cycle",
    "ForceRestart": "reset",
    "GracefulRestart": "reset",
}
_BOOT_NAMES = {"Pxe": "pxe", "Hdd": "disk", "Cd": "cdrom", "BiosSetup": "bios"}
_ROOT = "/redfish/v1"
_SESSIONS = f"{_ROOT}/SessionService/Sessions"
_REPO = Path(__file__).resolve().parents[2]


def system_uuid(name: str) -> str:
    """The UUID the simulated system ``name`` gets (stable across runs)."""
    return str(uuid.uuid5(SYSTEM_NAMESPACE, name))


def _mac(system: str) -> str:
    raw = uuid.UUID(system).bytes
    return "52:54:00:" + ":".join(f"{b:02x}" for b in raw[:3])


def make_nodes(
    count: int,
    rack: str,
    first_address: str = "127.40.0.1",
    port: int = 8000,
    user: str = "admin",
    password: str = DEFAULT_PASSWORD,
) -> list[SimNode]:
    """``count`` Redfish nodes of ``rack``, one BMC each on consecutive loopback addresses
    from ``first_address`` (skipping .0 and .255), all on ``port``."""
    nodes = []
    address = ipaddress.IPv4Address(first_address)
    for i in range(count):
        while address.packed[-1] in (0, 255):
            address += 1
        if address not in ipaddress.IPv4Network("127.0.0.0/8"):
            raise ValueError("ran out of loopback addresses")
        name = f"{rack}-rf{i + 1:04d}"
        nodes.append(
            SimNode(
                name=name,
                rack=rack,
                power_type="redfish",
                power_parameters={
                    "power_address": f"http://{address}:{port}",
                    "power_user": user,
                    "power_pass": password,
                    "node_id": name,
                },
            )
        )
        address += 1
    return nodes


# -- the parent's side -------------------------------------------------------------


class RedfishFleet:
    """A running simulator process and its control API."""

    def __init__(self, proc: subprocess.Popen[bytes], control_url: str, nodes: list[SimNode],
                 log_path: Path) -> None:
        self.proc = proc
        self.control_url = control_url
        self.sim_nodes = list(nodes)
        self.log_path = log_path
        self.control = PeerControl(control_url)

    def nodes(self) -> dict[str, dict[str, Any]]:
        """What the peer saw, per node: power, boot, counts, fault, latency (see common)."""
        return self.control.nodes()

    def node(self, name: str) -> dict[str, Any]:
        return self.control.node(name)

    def fault(self, name: str, fault: str, latency: float = 0) -> None:
        self.control.fault(name, fault, latency)

    def set_state(self, name: str, power: str) -> None:
        self.control.set_state(name, power)

    def reset(self) -> None:
        """Zero every count (open sessions stay open and counted)."""
        self.control.reset()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def __enter__(self) -> RedfishFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_fleet(nodes: list[SimNode], workdir: Path, timeout: float = 30.0) -> RedfishFleet:
    """Start the simulator for ``nodes`` as a subprocess (it exits when this process dies)
    and wait until every BMC and the control API answer. Raises ``RuntimeError``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "redfish-fleet.json"
    spec.write_text(json.dumps({"nodes": [n.to_json() for n in nodes]}, indent=1))
    port = free_port()
    log_path = workdir / "redfish-sim.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.peers.redfish_sim", "--spec", str(spec),
             "--control-port", str(port), "--parent-pid", str(os.getpid())],
            cwd=_REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
    fleet = RedfishFleet(proc, f"http://127.0.0.1:{port}", nodes, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"redfish simulator exited with {proc.returncode}: "
                + log_path.read_text(errors="replace")[-2000:]
            )
        try:
            fleet.control.nodes()
            return fleet
        except OSError:
            if time.monotonic() > deadline:
                fleet.stop()
                raise RuntimeError("redfish simulator did not start in time") from None
            time.sleep(0.1)


# -- the simulator process ---------------------------------------------------------


@dataclass
class Bmc:
    """One simulated BMC and the system behind it."""

    name: str
    uuid: str
    host: str
    port: int
    user: str
    password: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    sessions: dict[str, str] = field(default_factory=dict)
    """Open sessions: token -> session id."""
    fault: str = "none"
    latency: float = 0.0
    boot_request: dict[str, Any] = field(default_factory=dict)
    """The last Boot object PATCHed (the emulator keeps no "Once")."""


def _json_reply(start_response: Callable[..., Any], status: str, body: Any,
                headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    data = b"" if body is None else json.dumps(body).encode()
    hdrs = [("Content-Length", str(len(data)))]
    if data:
        hdrs.append(("Content-Type", "application/json"))
    start_response(status, hdrs + list(headers))
    return [data]


def _error(start_response: Callable[..., Any], status: str, code: str, message: str,
           headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    body = {"error": {"code": code, "message": message,
                      "@Message.ExtendedInfo": [{"MessageId": code, "Message": message,
                                                 "Severity": "Critical"}]}}
    return _json_reply(start_response, status, body, headers)


def _call(app: Callable[..., Any], environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured["status"], captured["headers"] = status, headers
        return lambda _data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return captured["status"], captured["headers"], body


class Simulator:
    """The emulator, the libvirt test hypervisor and the BMCs; the control backend."""

    def __init__(self, nodes: list[SimNode]) -> None:
        import libvirt
        from sushy_tools.emulator import main as emulator

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.libvirt = libvirt
        # Held for the process' life: the test driver's state lives while a connection does.
        self.conn = libvirt.open("test:///default")
        self.app = emulator.app
        self.app.config.update(
            SUSHY_EMULATOR_LIBVIRT_URI="test:///default",
            SUSHY_EMULATOR_FEATURE_SET="full",
        )
        self.lock = threading.Lock()
        self.bmcs: dict[str, Bmc] = {}
        for node in nodes:
            params = node.power_parameters
            url = urlsplit(params["power_address"])
            bmc = Bmc(
                name=node.name, uuid=system_uuid(node.name), host=url.hostname or "127.0.0.1",
                port=url.port or 80, user=params.get("power_user", "admin"),
                password=params.get("power_pass", DEFAULT_PASSWORD),
            )
            self.bmcs[node.name] = bmc
            domain = self.conn.defineXML(
                f"<domain type='test'><name>{bmc.name}</name><uuid>{bmc.uuid}</uuid>"
                "<memory unit='MiB'>1024</memory><vcpu>2</vcpu>"
                "<os><type arch='x86_64'>hvm</type><boot dev='hd'/></os><devices>"
                "<disk type='file' device='disk'><source file='/guest/disk.img'/>"
                "<target dev='vda' bus='virtio'/></disk>"
                "<disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>"
                f"<interface type='network'><mac address='{_mac(bmc.uuid)}'/>"
                "<source network='default'/></interface></devices></domain>"
            )
            if node.power == "on":
                domain.create()

    # -- control backend --

    def _domain(self, name: str) -> Any:
        if name not in self.bmcs:
            raise KeyError(name)
        return self.conn.lookupByName(name)

    def nodes(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, bmc in self.bmcs.items():
            try:
                boot = self.app.systems.get_boot_device(bmc.uuid)
            except Exception:  # noqa: BLE001 - report what can be read
                boot = None
            with self.lock:
                counts = dict(bmc.counts, open_sessions=len(bmc.sessions))
                boot_request = dict(bmc.boot_request)
            out[name] = {
                "power": "on" if self._domain(name).isActive() else "off",
                "boot": _BOOT_NAMES.get(boot or "", boot),
                "boot_enabled": boot_request.get("BootSourceOverrideEnabled"),
                "boot_mode": boot_request.get("BootSourceOverrideMode"),
                "counts": counts,
                "fault": bmc.fault,
                "latency": bmc.latency,
                "address": f"{bmc.host}:{bmc.port}",
                "uuid": bmc.uuid,
            }
        return out

    def set_fault(self, name: str, fault: str, latency: float) -> None:
        bmc = self.bmcs[name]
        bmc.fault, bmc.latency = fault, latency

    def set_state(self, name: str, power: str) -> None:
        domain = self._domain(name)
        if power == "on" and not domain.isActive():
            domain.create()
        elif power == "off" and domain.isActive():
            domain.destroy()
        elif power not in ("on", "off"):
            raise KeyError(power)

    def reset_counts(self) -> None:
        with self.lock:
            for bmc in self.bmcs.values():
                bmc.counts = dict.fromkeys(COUNT_KEYS, 0)

    # -- serving --

    def wsgi_for(self, bmc: Bmc) -> Callable[..., Any]:
        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            return self.handle(bmc, environ, start_response)

        return app

    def _count(self, bmc: Bmc, key: str) -> None:
        with self.lock:
            bmc.counts[key] += 1

    def _authorized(self, bmc: Bmc, environ: dict[str, Any]) -> bool:
        token = environ.get("HTTP_X_AUTH_TOKEN")
        if token:
            with self.lock:
                return token in bmc.sessions
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header[:6].lower() == "basic ":
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return user == bmc.user and password == bmc.password
        return False

    def handle(self, bmc: Bmc, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = "/" + environ.get("PATH_INFO", "").strip("/")
        fault = bmc.fault
        if fault == "no_answer":
            deadline = time.monotonic() + 300
            while bmc.fault == "no_answer" and time.monotonic() < deadline:
                time.sleep(0.05)
            fault = bmc.fault
        if fault == "slow" and bmc.latency > 0:
            time.sleep(bmc.latency)
        if fault == "auth":
            return _error(start_response, "401 Unauthorized", "Base.1.0.InsufficientPrivilege",
                          "authentication required", [("WWW-Authenticate", 'Basic realm="BMC"')])
        if fault == "busy":
            return _error(start_response, "503 Service Unavailable", "Base.1.0.ServiceTemporarilyUnavailable",
                          "the service is busy", [("Retry-After", "1")])
        if fault == "garbage":
            data = b'{"@odata.id": "/redfish/v1/", "Id": <<garbage>> '
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(data)))])
            return [data]

        if path in ("/redfish", _ROOT):
            return self._root(environ, start_response)
        if path.startswith(f"{_ROOT}/SessionService"):
            return self._session_service(bmc, method, path, environ, start_response)
        if not self._authorized(bmc, environ):
            self._count(bmc, "auth_failures")
            return _error(start_response, "401 Unauthorized", "Base.1.0.NoValidSession",
                          "authentication required", [("WWW-Authenticate", 'Basic realm="BMC"')])
        if path == f"{_ROOT}/Systems":
            members = [{"@odata.id": f"{_ROOT}/Systems/{bmc.uuid}"}]
            return _json_reply(start_response, "200 OK", {
                "@odata.type": "#ComputerSystemCollection.ComputerSystemCollection",
                "@odata.id": f"{_ROOT}/Systems", "Name": "Computer System Collection",
                "Members@odata.count": 1, "Members": members})
        if path.startswith(f"{_ROOT}/Systems/"):
            ident, _, sub = path[len(f"{_ROOT}/Systems/"):].partition("/")
            if ident not in (bmc.name, bmc.uuid):
                return _error(start_response, "404 Not Found", "Base.1.0.ResourceMissingAtURI",
                              "no such system")
            # Real BMCs do not redirect a name to the UUID as the emulator does.
            environ["PATH_INFO"] = f"{_ROOT}/Systems/{bmc.uuid}" + (f"/{sub}" if sub else "")
            return self._system(bmc, method, sub, environ, start_response)
        return self.app(environ, start_response)

    def _read_body(self, environ: dict[str, Any]) -> bytes:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return body

    def _root(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["PATH_INFO"] = f"{_ROOT}/"
        status, headers, body = _call(self.app, environ)
        doc = json.loads(body)
        doc["SessionService"] = {"@odata.id": f"{_ROOT}/SessionService"}
        doc.setdefault("Links", {})["Sessions"] = {"@odata.id": _SESSIONS}
        return _json_reply(start_response, status, doc)

    def _system(self, bmc: Bmc, method: str, sub: str, environ: dict[str, Any],
                start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not sub and method == "GET":
            self._count(bmc, "query")
            if bmc.fault == "powering":
                status, _headers, body = _call(self.app, environ)
                doc = json.loads(body)
                doc["PowerState"] = "PoweringOn"
                return _json_reply(start_response, status, doc)
        elif not sub and method == "PATCH":
            try:
                boot = json.loads(self._read_body(environ) or b"{}").get("Boot")
            except (ValueError, AttributeError):
                boot = None
            if boot:
                self._count(bmc, "boot")
                with self.lock:
                    bmc.boot_request = dict(boot)
        elif sub == "Actions/ComputerSystem.Reset" and method == "POST":
            try:
                reset_type = json.loads(self._read_body(environ) or b"{}").get("ResetType")
            except (ValueError, AttributeError):
                reset_type = None
            key = _RESET_COUNTS.get(reset_type or "")
            if key:
                self._count(bmc, key)
        return self.app(environ, start_response)

    def _session_service(self, bmc: Bmc, method: str, path: str, environ: dict[str, Any],
                         start_response: Callable[..., Any]) -> Iterable[bytes]:
        if path == _SESSIONS and method == "POST":
            try:
                creds = json.loads(self._read_body(environ) or b"{}")
            except ValueError:
                creds = None
            if not isinstance(creds, dict):
                return _error(start_response, "400 Bad Request", "Base.1.0.MalformedJSON",
                              "the request body is not JSON")
            if creds.get("UserName") != bmc.user or creds.get("Password") != bmc.password:
                self._count(bmc, "auth_failures")
                return _error(start_response, "401 Unauthorized", "Base.1.0.NoValidSession",
                              "invalid credentials")
            with self.lock:
                if len(bmc.sessions) >= MAX_SESSIONS:
                    full = True
                else:
                    full = False
                    token, sid = secrets.token_hex(16), secrets.token_hex(6)
                    bmc.sessions[token] = sid
                    bmc.counts["sessions"] += 1
            if full:
                return _error(start_response, "503 Service Unavailable",
                              "Base.1.0.SessionLimitExceeded", "no free session")
            location = f"{_SESSIONS}/{sid}"
            return _json_reply(start_response, "201 Created", self._session_doc(bmc, sid),
                               [("X-Auth-Token", token), ("Location", location)])
        if not self._authorized(bmc, environ):
            self._count(bmc, "auth_failures")
            return _error(start_response, "401 Unauthorized", "Base.1.0.NoValidSession",
                          "authentication required")
        if path == f"{_ROOT}/SessionService" and method == "GET":
            return _json_reply(start_response, "200 OK", {
                "@odata.type": "#SessionService.v1_1_8.SessionService",
                "@odata.id": f"{_ROOT}/SessionService", "Id": "SessionService",
                "Name": "Session Service", "ServiceEnabled": True, "SessionTimeout": 600,
                "Sessions": {"@odata.id": _SESSIONS}})
        if path == _SESSIONS and method == "GET":
            with self.lock:
                sids = sorted(bmc.sessions.values())
            return _json_reply(start_response, "200 OK", {
                "@odata.type": "#SessionCollection.SessionCollection",
                "@odata.id": _SESSIONS, "Name": "Sessions", "Members@odata.count": len(sids),
                "Members": [{"@odata.id": f"{_SESSIONS}/{s}"} for s in sids]})
        if path.startswith(_SESSIONS + "/"):
            sid = path[len(_SESSIONS) + 1:]
            with self.lock:
                found = next((t for t, s in bmc.sessions.items() if s == sid), None)
                if found is not None and method == "DELETE":
                    del bmc.sessions[found]
            if found is None:
                return _error(start_response, "404 Not Found", "Base.1.0.ResourceMissingAtURI",
                              "no such session")
            if method == "DELETE":
                return _json_reply(start_response, "204 No Content", None)
            if method == "GET":
                return _json_reply(start_response, "200 OK", self._session_doc(bmc, sid))
        return _error(start_response, "405 Method Not Allowed", "Base.1.0.OperationNotAllowed",
                      "method not allowed")

    @staticmethod
    def _session_doc(bmc: Bmc, sid: str) -> dict[str, Any]:
        return {"@odata.type": "#Session.v1_0_0.Session", "@odata.id": f"{_SESSIONS}/{sid}",
                "Id": sid, "Name": "User Session", "UserName": bmc.user}


def serve_bmcs(sim: Simulator) -> None:
    """Bind every BMC's address and serve them all from one accept loop (requests are
    handled in threads)."""
    import socketserver

    from werkzeug.serving import ThreadedWSGIServer

    class Server(ThreadedWSGIServer):
        def server_bind(self) -> None:
            # http.server's server_bind resolves the address' FQDN: ~90 ms per BMC.
            socketserver.TCPServer.server_bind(self)
            host, port = self.server_address[:2]
            self.server_name, self.server_port = str(host), int(port)

    servers = [Server(bmc.host, bmc.port, sim.wsgi_for(bmc)) for bmc in sim.bmcs.values()]
    selector = selectors.DefaultSelector()
    for server in servers:
        selector.register(server.socket, selectors.EVENT_READ, server)

    def loop() -> None:
        while True:
            for key, _ in selector.select(timeout=1.0):
                key.data._handle_request_noblock()

    threading.Thread(target=loop, name="redfish-bmcs", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help='JSON file: {"nodes": [SimNode, ...]}')
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process is no longer our parent (default: the parent)")
    args = parser.parse_args(argv)
    _watch_parent(args.parent_pid or os.getppid())
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    missing = tuple(f for f in EXTRA_FAULTS if f not in common.FAULTS)
    if missing:  # the control API validates fault names against this tuple
        common.FAULTS = (*common.FAULTS, *missing)  # type: ignore[assignment]
    nodes = [SimNode(**n) for n in json.loads(args.spec.read_text())["nodes"]]
    sim = Simulator(nodes)
    serve_bmcs(sim)
    _server, port = serve_control(sim, port=args.control_port)
    print(f"redfish simulator: {len(nodes)} BMCs, control on http://127.0.0.1:{port}", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
