"""A simulated Redfish fleet: sushy-tools' emulator (the real peer), one BMC per address.

The emulator's Flask app runs in this process over libvirt's in-process test driver
(``test:///default``, which applies power changes at once, unlike the emulator's fake
backend and its random 1-11 s delay). Every node is one libvirt test domain and one BMC:
its own loopback address (127.x.y.z) and port, serving only its own system. A WSGI
middleware in front of the emulator, per BMC:

- enforces HTTP basic auth or a session token against the BMC's accounts (the node's
  ``power_user`` / ``power_pass`` is account 1, an Administrator);
- serves a minimal SessionService (``POST /redfish/v1/SessionService/Sessions`` ->
  ``X-Auth-Token`` + ``Location``; ``DELETE`` of that location; at most
  :data:`MAX_SESSIONS` open, then 503) and links it from the service root;
- serves an AccountService (``/redfish/v1/AccountService/Accounts``: GET, POST to create
  with ``UserName`` / ``Password`` / ``RoleId`` / ``Enabled``, PATCH of ``Password`` /
  ``RoleId`` / ``Enabled`` / ``Locked`` / ``UserName`` honouring ``If-Match``, DELETE);
  writes need the Administrator role (an account may change its own password), 403
  otherwise; at most ``max_accounts`` accounts (default :data:`MAX_ACCOUNTS`), then 400
  ``CreateLimitReachedForResource``; a duplicate name is 409 ``ResourceAlreadyExists``;
  passwords of :data:`PASSWORD_LENGTHS` characters. Power actions and boot changes need
  Operator or Administrator (a ReadOnly account gets 403). Disabled or locked accounts
  cannot log in. The control API lists ``accounts`` (id, name, role, enabled: never a
  password) and counts accepted account writes as ``users``;
- counts what it receives (:data:`COUNT_KEYS`) and injects faults (``no_answer``: hang
  until the fault is cleared; ``slow``: latency; ``auth``: 401; ``busy``: 503;
  ``garbage``: a malformed JSON body; ``powering``: ``PowerState`` reads ``PoweringOn``).

It serves the control API of :mod:`tests.peers.common` on 127.0.0.1. Start it with
:func:`start_fleet` (subprocesses of at most ``shard_size`` BMCs each, default
:data:`SHARD_SIZE`, that exit when their parent dies), or by hand::

    python -m tests.peers.redfish_sim --spec fleet.json --control-port 9100

where ``fleet.json`` is ``{"nodes": [SimNode.to_json(), ...], "max_accounts": 16}`` (see
:func:`make_nodes`), plus optionally ``latency`` and ``jitter`` (seconds: every request is
answered after ``latency`` ± ``jitter``, in its own thread, so it never holds up another
BMC) and ``state_dir`` (the emulator's sqlite state). Every BMC of a process binds its own
listening socket; one selector loop accepts on all of them.
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
import random
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
              "auth_failures", "users")
"""The control API's count keys, plus ``auth_failures``: requests refused for bad credentials,
and ``users``: account writes (create, change, delete) accepted."""
EXTRA_FAULTS = ("garbage", "powering")
"""Faults this peer adds to :data:`tests.peers.common.FAULTS`."""
MAX_SESSIONS = 8
"""Open sessions per BMC before a login is refused with 503 (like many real BMCs)."""
MAX_ACCOUNTS = 16
"""Accounts per BMC (the default; the spec's ``max_accounts`` overrides it)."""
ROLES = ("Administrator", "Operator", "ReadOnly")
PASSWORD_LENGTHS = (8, 20)
"""The AccountService's MinPasswordLength and MaxPasswordLength."""
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
_ACCOUNT_SERVICE = f"{_ROOT}/AccountService"
_ACCOUNTS = f"{_ACCOUNT_SERVICE}/Accounts"
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


class _Shard:
    """One simulator process, its control API and the names of its BMCs."""

    def __init__(self, proc: subprocess.Popen[bytes], control_url: str, names: list[str],
                 log_path: Path) -> None:
        self.proc = proc
        self.control_url = control_url
        self.control = PeerControl(control_url)
        self.names = names
        self.log_path = log_path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class RedfishFleet:
    """Running simulator processes (one per shard of BMCs) and their control APIs.

    ``proc``, ``control_url``, ``control`` and ``log_path`` are the first shard's (a fleet
    of at most ``shard_size`` BMCs has only that one); :meth:`nodes` and the other
    methods act on the whole fleet, routing each node to its shard.
    """

    def __init__(self, shards: list[_Shard], nodes: list[SimNode]) -> None:
        if not shards:
            raise ValueError("a fleet needs at least one shard")
        self._shards = shards
        self._owner = {name: shard for shard in shards for name in shard.names}
        self.sim_nodes = list(nodes)
        first = shards[0]
        self.proc, self.control_url, self.control, self.log_path = (
            first.proc, first.control_url, first.control, first.log_path)

    @property
    def control_urls(self) -> list[str]:
        """The control API of every shard."""
        return [shard.control_url for shard in self._shards]

    @property
    def pids(self) -> list[int]:
        """The simulator processes' ids."""
        return [shard.proc.pid for shard in self._shards]

    def nodes(self) -> dict[str, dict[str, Any]]:
        """What the peer saw, per node: power, boot, counts, fault, latency (see common)."""
        out: dict[str, dict[str, Any]] = {}
        for shard in self._shards:
            out.update(shard.control.nodes())
        return out

    def node(self, name: str) -> dict[str, Any]:
        return self._shard_of(name).control.node(name)

    def fault(self, name: str, fault: str, latency: float = 0) -> None:
        self._shard_of(name).control.fault(name, fault, latency)

    def set_state(self, name: str, power: str) -> None:
        self._shard_of(name).control.set_state(name, power)

    def reset(self) -> None:
        """Zero every count (open sessions stay open and counted)."""
        for shard in self._shards:
            shard.control.reset()

    def stop(self) -> None:
        for shard in self._shards:
            if shard.proc.poll() is None:
                shard.proc.terminate()
        for shard in self._shards:
            shard.stop()

    def _shard_of(self, name: str) -> _Shard:
        # an unknown name goes to the first shard, whose control API answers 404
        return self._owner.get(name, self._shards[0])

    def __enter__(self) -> RedfishFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


SHARD_SIZE = 250
"""BMCs per simulator process by default: sushy-tools' emulator spends ~10 ms of CPU on a
GET of a system, so a fleet of hundreds is spread over processes (both cores)."""


def start_fleet(nodes: list[SimNode], workdir: Path, timeout: float = 30.0, *,
                max_accounts: int = MAX_ACCOUNTS, shard_size: int = SHARD_SIZE,
                shards: int | None = None, latency: float = 0.0,
                jitter: float = 0.0) -> RedfishFleet:
    """Start the simulator for ``nodes``: ``shard_size`` BMCs per subprocess (or split evenly
    over ``shards`` subprocesses); each exits when this process dies. Every request is
    answered after ``latency`` ± ``jitter`` seconds (default 0), in its own thread. Waits
    until every shard's BMCs and control API answer (``timeout`` seconds, more for big
    fleets). Raises ``RuntimeError``, or ``ValueError`` for a bad size or latency."""
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
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
    started: list[_Shard] = []
    try:
        for number, index in enumerate(range(0, max(len(nodes), 1), shard_size)):
            chunk = nodes[index:index + shard_size]
            suffix = "" if number == 0 else f"-{number}"
            spec = workdir / f"redfish-fleet{suffix}.json"
            state = workdir / f"redfish-state{suffix}"
            spec.write_text(json.dumps({"nodes": [n.to_json() for n in chunk],
                                        "max_accounts": max_accounts, "latency": latency,
                                        "jitter": jitter, "state_dir": str(state)}, indent=1))
            spec.chmod(0o600)
            port = free_port()
            log_path = workdir / f"redfish-sim{suffix}.log"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.peers.redfish_sim", "--spec", str(spec),
                     "--control-port", str(port), "--parent-pid", str(os.getpid())],
                    cwd=_REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                )
            started.append(_Shard(proc, f"http://127.0.0.1:{port}", [n.name for n in chunk], log_path))
        deadline = time.monotonic() + timeout + len(nodes) * 0.01
        for shard in started:
            while True:
                if shard.proc.poll() is not None:
                    raise RuntimeError(
                        f"redfish simulator exited with {shard.proc.returncode}: "
                        + shard.log_path.read_text(errors="replace")[-2000:]
                    )
                try:
                    shard.control._call("GET", "/ping")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("redfish simulator did not start in time") from None
                    time.sleep(0.1)
        return RedfishFleet(started, nodes)
    except BaseException:
        for shard in started:
            shard.stop()
        raise


# -- the simulator process ---------------------------------------------------------


@dataclass
class Account:
    """One BMC account (a Redfish ManagerAccount)."""

    id: str
    name: str
    password: str
    role: str
    enabled: bool = True
    locked: bool = False
    version: int = 1

    def doc(self) -> dict[str, Any]:
        return {
            "@odata.type": "#ManagerAccount.v1_3_0.ManagerAccount",
            "@odata.id": f"{_ACCOUNTS}/{self.id}", "@odata.etag": self.etag(),
            "Id": self.id, "Name": "User Account", "UserName": self.name, "Password": None,
            "RoleId": self.role, "Enabled": self.enabled, "Locked": self.locked,
            "AccountTypes": ["Redfish", "IPMI"],
            "Links": {"Role": {"@odata.id": f"{_ACCOUNT_SERVICE}/Roles/{self.role}"}},
        }

    def etag(self) -> str:
        return f'W/"{self.id}-{self.version}"'


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
    accounts: dict[str, Account] = field(default_factory=dict)
    """Account id -> account; ``user`` / ``password`` seed account 1."""
    session_users: dict[str, str] = field(default_factory=dict)
    """Open sessions: token -> the account name that made it."""
    max_accounts: int = MAX_ACCOUNTS

    def __post_init__(self) -> None:
        if not self.accounts:
            self.accounts["1"] = Account("1", self.user, self.password, "Administrator")

    def login(self, name: str, password: str) -> Account | None:
        """The enabled, unlocked account with these credentials, if any."""
        for account in self.accounts.values():
            if (account.name == name and account.enabled and not account.locked
                    and secrets.compare_digest(account.password.encode(), password.encode())):
                return account
        return None

    def by_name(self, name: str) -> Account | None:
        return next((a for a in self.accounts.values() if a.name == name), None)


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

    def __init__(self, nodes: list[SimNode], max_accounts: int = MAX_ACCOUNTS, *,
                 latency: float = 0.0, jitter: float = 0.0, state_dir: str | None = None) -> None:
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
        if state_dir:
            # the emulator's sqlite state (indicators, virtual media) of this process only,
            # not the machine-wide default under /tmp/sushy-emulator
            self.app.config["SUSHY_EMULATOR_STATE_DIR"] = state_dir
        if latency < 0 or jitter < 0:
            raise ValueError("latency and jitter must not be negative")
        self.latency, self.jitter = float(latency), float(jitter)
        self._random = random.Random()
        self.lock = threading.Lock()
        self.bmcs: dict[str, Bmc] = {}
        for node in nodes:
            params = node.power_parameters
            url = urlsplit(params["power_address"])
            bmc = Bmc(
                name=node.name, uuid=system_uuid(node.name), host=url.hostname or "127.0.0.1",
                port=url.port or 80, user=params.get("power_user", "admin"),
                password=params.get("power_pass", DEFAULT_PASSWORD), max_accounts=max_accounts,
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
                accounts = [{"id": a.id, "name": a.name, "role": a.role, "enabled": a.enabled,
                             "locked": a.locked} for a in bmc.accounts.values()]
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
                "accounts": accounts,
                "max_accounts": bmc.max_accounts,
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

    def _authorized(self, bmc: Bmc, environ: dict[str, Any]) -> Account | None:
        """The account a request is made as (a session's or basic auth's), or None."""
        token = environ.get("HTTP_X_AUTH_TOKEN")
        if token:
            with self.lock:
                name = bmc.session_users.get(token) if token in bmc.sessions else None
                account = bmc.by_name(name) if name is not None else None
                if account is None or not account.enabled or account.locked:
                    return None
                return account
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header[:6].lower() == "basic ":
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            with self.lock:
                return bmc.login(user, password)
        return None

    def handle(self, bmc: Bmc, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = "/" + environ.get("PATH_INFO", "").strip("/")
        if self.latency or self.jitter:  # the fleet's latency (each request has its thread)
            time.sleep(max(0.0, self.latency + self._random.uniform(-self.jitter, self.jitter)))
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
        account = self._authorized(bmc, environ)
        if account is None:
            self._count(bmc, "auth_failures")
            return _error(start_response, "401 Unauthorized", "Base.1.0.NoValidSession",
                          "authentication required", [("WWW-Authenticate", 'Basic realm="BMC"')])
        if path == _ACCOUNT_SERVICE or path.startswith(_ACCOUNT_SERVICE + "/"):
            return self._account_service(bmc, account, method, path, environ, start_response)
        if method != "GET" and account.role == "ReadOnly":
            return _error(start_response, "403 Forbidden", "Base.1.8.InsufficientPrivilege",
                          "the account's role does not allow this")
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
        doc["AccountService"] = {"@odata.id": _ACCOUNT_SERVICE}
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
            user, password = creds.get("UserName"), creds.get("Password")
            with self.lock:
                account = (bmc.login(user, password)
                           if isinstance(user, str) and isinstance(password, str) else None)
            if account is None:
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
                    bmc.session_users[token] = account.name
                    bmc.counts["sessions"] += 1
            if full:
                return _error(start_response, "503 Service Unavailable",
                              "Base.1.0.SessionLimitExceeded", "no free session")
            location = f"{_SESSIONS}/{sid}"
            return _json_reply(start_response, "201 Created", self._session_doc(account.name, sid),
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
                    bmc.session_users.pop(found, None)
                user = bmc.session_users.get(found or "", "")
            if found is None:
                return _error(start_response, "404 Not Found", "Base.1.0.ResourceMissingAtURI",
                              "no such session")
            if method == "DELETE":
                return _json_reply(start_response, "204 No Content", None)
            if method == "GET":
                return _json_reply(start_response, "200 OK", self._session_doc(user, sid))
        return _error(start_response, "405 Method Not Allowed", "Base.1.0.OperationNotAllowed",
                      "method not allowed")

    @staticmethod
    def _session_doc(user: str, sid: str) -> dict[str, Any]:
        return {"@odata.type": "#Session.v1_0_0.Session", "@odata.id": f"{_SESSIONS}/{sid}",
                "Id": sid, "Name": "User Session", "UserName": user}

    # -- AccountService --

    def _account_service(self, bmc: Bmc, caller: Account, method: str, path: str,
                         environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def error(status: str, code: str, message: str) -> Iterable[bytes]:
            return _error(start_response, status, f"Base.1.8.{code}", message)

        if path == _ACCOUNT_SERVICE and method == "GET":
            return _json_reply(start_response, "200 OK", {
                "@odata.type": "#AccountService.v1_5_0.AccountService",
                "@odata.id": _ACCOUNT_SERVICE, "Id": "AccountService", "Name": "Account Service",
                "ServiceEnabled": True, "MinPasswordLength": PASSWORD_LENGTHS[0],
                "MaxPasswordLength": PASSWORD_LENGTHS[1], "Accounts": {"@odata.id": _ACCOUNTS}})
        if path == _ACCOUNTS and method == "GET":
            with self.lock:
                ids = sorted(bmc.accounts, key=int)
            return _json_reply(start_response, "200 OK", {
                "@odata.type": "#ManagerAccountCollection.ManagerAccountCollection",
                "@odata.id": _ACCOUNTS, "Name": "Accounts", "Members@odata.count": len(ids),
                "Members": [{"@odata.id": f"{_ACCOUNTS}/{i}"} for i in ids]})
        if path == _ACCOUNTS and method == "POST":
            if caller.role != "Administrator":
                return error("403 Forbidden", "InsufficientPrivilege", "creating accounts needs ConfigureUsers")
            body = self._json_body(environ)
            if body is None:
                return error("400 Bad Request", "MalformedJSON", "the request body is not a JSON object")
            name, password = body.get("UserName"), body.get("Password")
            role, enabled = body.get("RoleId"), body.get("Enabled", True)
            for prop, value in (("UserName", name), ("Password", password), ("RoleId", role)):
                if value is None:
                    return error("400 Bad Request", "PropertyMissing", f"{prop} is required")
            problem = self._account_problem(name, password, role, enabled)
            if problem:
                return error("400 Bad Request", *problem)
            with self.lock:
                if bmc.by_name(name) is not None:
                    full, exists = False, True
                elif len(bmc.accounts) >= bmc.max_accounts:
                    full, exists = True, False
                else:
                    full = exists = False
                    ident = str(max(map(int, bmc.accounts), default=0) + 1)
                    account = Account(ident, name, password, role, enabled=bool(enabled))
                    bmc.accounts[ident] = account
                    bmc.counts["users"] += 1
                    doc = account.doc()
            if exists:
                return error("409 Conflict", "ResourceAlreadyExists", "an account of that name exists")
            if full:
                return error("400 Bad Request", "CreateLimitReachedForResource",
                             "no more accounts can be created")
            return _json_reply(start_response, "201 Created", doc,
                               [("Location", doc["@odata.id"]), ("ETag", doc["@odata.etag"])])
        if path.startswith(_ACCOUNTS + "/"):
            ident = path[len(_ACCOUNTS) + 1:]
            with self.lock:
                account = bmc.accounts.get(ident)
            if account is None:
                return error("404 Not Found", "ResourceMissingAtURI", "no such account")
            if method == "GET":
                with self.lock:
                    doc = account.doc()
                return _json_reply(start_response, "200 OK", doc, [("ETag", doc["@odata.etag"])])
            if method == "DELETE":
                if caller.role != "Administrator" or account is caller:
                    return error("403 Forbidden", "InsufficientPrivilege", "cannot delete this account")
                with self.lock:
                    bmc.accounts.pop(ident, None)
                    bmc.counts["users"] += 1
                return _json_reply(start_response, "204 No Content", None)
            if method == "PATCH":
                return self._patch_account(bmc, caller, account, environ, start_response)
        return error("405 Method Not Allowed", "OperationNotAllowed", "method not allowed")

    def _patch_account(self, bmc: Bmc, caller: Account, account: Account, environ: dict[str, Any],
                       start_response: Callable[..., Any]) -> Iterable[bytes]:
        def error(status: str, code: str, message: str) -> Iterable[bytes]:
            return _error(start_response, status, f"Base.1.8.{code}", message)

        body = self._json_body(environ)
        if body is None:
            return error("400 Bad Request", "MalformedJSON", "the request body is not a JSON object")
        allowed = {"UserName", "Password", "RoleId", "Enabled", "Locked"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            return error("400 Bad Request", "PropertyNotWritable", f"{unknown[0]} cannot be written")
        if caller.role != "Administrator" and not (account is caller and set(body) == {"Password"}):
            return error("403 Forbidden", "InsufficientPrivilege", "changing accounts needs ConfigureUsers")
        if body.get("Locked") is True:
            return error("400 Bad Request", "PropertyValueNotInList", "Locked can only be set to false")
        problem = self._account_problem(body.get("UserName", account.name), body.get("Password", "x" * 8),
                                        body.get("RoleId", account.role), body.get("Enabled", True))
        if problem:
            return error("400 Bad Request", *problem)
        with self.lock:
            match = environ.get("HTTP_IF_MATCH")
            if match and match not in ("*", account.etag()):
                stale = True
            else:
                stale = False
                other = bmc.by_name(body.get("UserName", account.name))
                clash = other is not None and other is not account
                if not clash:
                    account.name = body.get("UserName", account.name)
                    account.password = body.get("Password", account.password)
                    account.role = body.get("RoleId", account.role)
                    account.enabled = bool(body.get("Enabled", account.enabled))
                    account.locked = bool(body.get("Locked", account.locked))
                    account.version += 1
                    bmc.counts["users"] += 1
                doc = account.doc()
        if stale:
            return error("412 Precondition Failed", "PreconditionFailed", "the ETag does not match")
        if clash:
            return error("409 Conflict", "ResourceAlreadyExists", "an account of that name exists")
        return _json_reply(start_response, "200 OK", doc, [("ETag", doc["@odata.etag"])])

    @staticmethod
    def _account_problem(name: Any, password: Any, role: Any, enabled: Any) -> tuple[str, str] | None:
        """(message id, message) for a bad account property, or None. Never echoes values."""
        if not isinstance(name, str) or not 1 <= len(name) <= 16:
            return ("PropertyValueFormatError", "UserName must be 1 to 16 characters")
        low, high = PASSWORD_LENGTHS
        if not isinstance(password, str) or not low <= len(password) <= high:
            return ("PropertyValueFormatError", f"Password must be {low} to {high} characters")
        if role not in ROLES:
            return ("PropertyValueNotInList", f"RoleId must be one of {', '.join(ROLES)}")
        if not isinstance(enabled, bool):
            return ("PropertyValueTypeError", "Enabled must be true or false")
        return None

    def _json_body(self, environ: dict[str, Any]) -> dict[str, Any] | None:
        try:
            body = json.loads(self._read_body(environ) or b"{}")
        except ValueError:
            return None
        return body if isinstance(body, dict) else None


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
    parser.add_argument("--spec", required=True, type=Path,
                        help='JSON file: {"nodes": [SimNode, ...], "max_accounts": N, "latency": s, '
                             '"jitter": s, "state_dir": DIR}')
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process is no longer our parent (default: the parent)")
    args = parser.parse_args(argv)
    _watch_parent(args.parent_pid or os.getppid())
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    missing = tuple(f for f in EXTRA_FAULTS if f not in common.FAULTS)
    if missing:  # the control API validates fault names against this tuple
        common.FAULTS = (*common.FAULTS, *missing)  # type: ignore[assignment]
    spec = json.loads(args.spec.read_text())
    nodes = [SimNode(**n) for n in spec["nodes"]]
    common.raise_open_files(len(nodes) + 512)  # a listening socket per BMC, a few per request
    sim = Simulator(nodes, max_accounts=int(spec.get("max_accounts", MAX_ACCOUNTS)),
                    latency=float(spec.get("latency", 0.0)), jitter=float(spec.get("jitter", 0.0)),
                    state_dir=spec.get("state_dir"))
    serve_bmcs(sim)
    _server, port = serve_control(sim, port=args.control_port)
    print(f"redfish simulator: {len(nodes)} BMCs, control on http://127.0.0.1:{port}", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
