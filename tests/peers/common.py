"""What every simulated peer shares: the node description and the control API.

Every peer process (IPMI shard, Redfish emulator, libvirt holder, ...) serves a small
JSON control API on 127.0.0.1 so that tests and the demo can read what the peer saw and
inject faults, whatever the protocol:

- ``GET  /nodes`` -> ``{name: {"power": "on"|"off", "boot": str|null, "counts": {...},
  "fault": str, "latency": float}}``; counts keys are actions received: ``on``, ``off``,
  ``soft_off``, ``cycle``, ``reset``, ``boot``, ``query``, ``sessions`` (logins/opened sessions),
  ``open_sessions`` (currently open)
- ``POST /nodes/<name>/fault`` ``{"fault": "none"|"no_answer"|"slow"|"auth"|"busy", "latency": s}``
- ``POST /nodes/<name>/state`` ``{"power": "on"|"off"}``
- ``POST /reset`` zeroes every count
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

FAULTS = ("none", "no_answer", "slow", "auth", "busy", "garbage", "powering")


@dataclass
class SimNode:
    """One simulated node and the power parameters an inventory needs to reach it."""

    name: str
    rack: str
    power_type: str
    power_parameters: dict[str, Any] = field(default_factory=dict)
    power: str = "off"

    def inventory_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rack": self.rack,
            "power_type": self.power_type,
            "power_parameters": dict(self.power_parameters),
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ControlBackend(Protocol):
    def nodes(self) -> dict[str, dict[str, Any]]: ...

    def set_fault(self, name: str, fault: str, latency: float) -> None: ...

    def set_state(self, name: str, power: str) -> None: ...

    def reset_counts(self) -> None: ...


def serve_control(backend: ControlBackend, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, int]:
    """Serve the control API for ``backend`` in a daemon thread. Returns (server, port)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/nodes":
                self._reply(200, backend.nodes())
            elif self.path == "/ping":
                self._reply(200, {"ok": True})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._reply(400, {"error": "bad json"})
                return
            parts = self.path.strip("/").split("/")
            try:
                if parts == ["reset"]:
                    backend.reset_counts()
                elif len(parts) == 3 and parts[0] == "nodes" and parts[2] == "fault":
                    fault = body.get("fault", "none")
                    if fault not in FAULTS:
                        self._reply(400, {"error": f"fault must be one of {FAULTS}"})
                        return
                    backend.set_fault(parts[1], fault, float(body.get("latency", 0.0)))
                elif len(parts) == 3 and parts[0] == "nodes" and parts[2] == "state":
                    backend.set_state(parts[1], body["power"])
                else:
                    self._reply(404, {"error": "not found"})
                    return
            except KeyError as exc:
                self._reply(404, {"error": f"unknown {exc}"})
                return
            self._reply(200, {"ok": True})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="peer-control", daemon=True).start()
    return server, server.server_address[1]


class PeerControl:
    """Client of a peer's control API."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def nodes(self) -> dict[str, dict[str, Any]]:
        return self._call("GET", "/nodes")

    def node(self, name: str) -> dict[str, Any]:
        return self.nodes()[name]

    def fault(self, name: str, fault: str, latency: float = 0.0) -> None:
        self._call("POST", f"/nodes/{name}/fault", {"fault": fault, "latency": latency})

    def set_state(self, name: str, power: str) -> None:
        self._call("POST", f"/nodes/{name}/state", {"power": power})

    def reset(self) -> None:
        self._call("POST", "/reset", {})

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", "/ping")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def raise_open_files(needed: int) -> None:
    """Raise this process' soft limit of open files to at least ``needed`` (up to the hard
    limit): a peer process binds one socket per simulated BMC, and many systems start
    processes with a soft limit of 1,024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
