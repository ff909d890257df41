"""A simulated hypervisor fleet for the ``virsh`` power type: libvirt's own test driver,
served by a real ``libvirtd``.

libvirt's test driver lives inside the process that opens it, so a worker and a test
would each see a hypervisor of their own. This peer therefore runs a *holder* process
(``python -m tests.peers.libvirt_sim --spec FILE --control-port N``) that

- starts ``libvirtd --timeout 0`` unprivileged (as ``nobody`` when run as root) in session
  mode, with ``HOME`` / ``XDG_*`` in a private runtime directory under ``/tmp`` (short,
  because a unix socket path is limited to 107 bytes, and reachable by ``nobody``, which
  pytest's 0700 ``tmp_path`` is not);
- opens ``test+unix:///default?socket=…`` and keeps that one connection open for its whole
  life (the daemon's test driver resets when its last client leaves), with an event loop
  running so libvirt's keepalive works;
- removes the driver's built-in ``test`` domain and defines one ``<domain type='test'>``
  per simulated node from a generated fleet XML (``fleet.xml`` in the workdir). Only
  ``/default`` is shared between connections: ``test:///<path>/fleet.xml`` gives every
  connection a private copy, so the fleet is defined into ``/default``;
- serves the control API of :mod:`tests.peers.common`.

Passwords. On the unix socket a session-mode libvirtd asks for none. So that a driver's
``power_pass`` is really checked, libvirtd also listens on TCP on a free loopback port
(``listen_tcp``, ``auth_tcp = "sasl"``) with Cyrus SASL's DIGEST-MD5 mechanism and a
sasldb made with ``saslpasswd2`` (Debian's ``sasl2-bin``); libvirtd finds its SASL config
through ``SASL_CONF_PATH``. The fleet's :attr:`LibvirtFleet.tcp_uri`
(``test+tcp://powerq@127.0.0.1:PORT/default``, the same ``/default`` hypervisor) with
:attr:`LibvirtFleet.sasl_password` as ``power_pass`` works; another password gets
libvirt's own ``VIR_ERR_AUTH_FAILED``. DIGEST-MD5 because libvirt refuses SASL on plain
TCP without a security layer of at least 56 bits, which SCRAM does not give ("no SASL
mechanisms are available"). Without ``saslpasswd2`` the fleet has no TCP listener and
``tcp_uri`` is ``None``.

Counting. The test driver counts nothing, and its lifecycle events are no good for it:
none is emitted for ``reset``, and events reach the holder asynchronously, after the
client already has its reply. libvirtd is therefore started with a debug log of the public
domain API only (``LIBVIRT_LOG_FILTERS=1:libvirt.domain``): every ``virDomain*`` call it
receives is written, synchronously and before the call runs, as
``virDomainReset:NNN : dom=0x…, (VM: name=vm-r1-001, uuid=…)``. The holder reads that
log on every ``GET /nodes``, so counts are exact the moment a driver call returns. Failed
calls count too (they were received). Keys:

=========== ==========================================================
on          virDomainCreate, CreateWithFlags, Resume, PMWakeup
off         virDomainDestroy, DestroyFlags
soft_off    virDomainShutdown, ShutdownFlags
reset       virDomainReset
cycle       virDomainReboot (a libvirt "cycle" is a reset, or off + on)
boot        virDomainDefineXML(Flags) of that domain
query       virDomainGetState, GetInfo
sessions    0, open_sessions 0 (a connection names no domain)
=========== ==========================================================

The holder's own calls (``set_state``) are not counted. Power state is read with one
``virConnectListAllDomains(ACTIVE)`` (active = ``on``), boot from the persistent
definition's first ``<boot dev>`` (network → ``pxe``, hd → ``disk``, cdrom → ``cdrom``).

Faults: ``auth`` changes the SASL password in the sasldb (libvirtd reads it on every
login), so every login on ``tcp_uri`` is refused until every node that asked for ``auth``
is set back to ``none``: libvirt authenticates a connection, not a domain, so this fault
holds for the whole hypervisor (``GET /nodes`` shows it on the nodes that asked). It
needs the TCP listener (400 without one). libvirtd cannot be made to misbehave for one
domain, so ``no_answer``, ``slow`` and ``busy`` are refused with HTTP 400. There is no
honest ``busy``: libvirtd's client limits (``max_clients``, ``max_anonymous_clients``,
``max_queued_clients``, ``max_client_requests``) make it stop accepting or reading, so a
client waits without an error, and the test driver has no domain job lock, so libvirt's
"cannot acquire state change lock" never happens on it. ``set_state`` works.

The holder exits — stopping libvirtd and deleting its runtime directory — on SIGTERM /
SIGINT, when its parent dies (``PR_SET_PDEATHSIG`` plus a parent-pid watch), or when
libvirtd dies; libvirtd itself gets ``PR_SET_PDEATHSIG`` so it never outlives the holder.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from tests.peers.common import PeerControl, SimNode, serve_control

URI_PLACEHOLDER = "test+unix:///default?socket=/nonexistent/filled-in-by-start_fleet"
"""``power_address`` of nodes from :func:`make_nodes` until :func:`start_fleet` fills it in."""

REPO_ROOT = Path(__file__).resolve().parents[2]
LIBVIRTD = shutil.which("libvirtd", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/libvirtd"
SASLPASSWD2 = shutil.which("saslpasswd2", path="/usr/sbin:/usr/bin:/sbin:/bin")
SASL_USER = "powerq"
"""The SASL user name of the fleet's TCP listener (in :attr:`LibvirtFleet.tcp_uri`)."""

COUNT_KEYS = ("on", "off", "soft_off", "cycle", "reset", "boot", "query", "sessions", "open_sessions")
_API_TO_KEY = {
    "virDomainCreate": "on",
    "virDomainCreateWithFlags": "on",
    "virDomainResume": "on",
    "virDomainPMWakeup": "on",
    "virDomainDestroy": "off",
    "virDomainDestroyFlags": "off",
    "virDomainShutdown": "soft_off",
    "virDomainShutdownFlags": "soft_off",
    "virDomainReset": "reset",
    "virDomainReboot": "cycle",
    "virDomainGetState": "query",
    "virDomainGetInfo": "query",
}
_BOOT_NAMES = {"network": "pxe", "hd": "disk", "cdrom": "cdrom", "fd": "floppy"}

_TS = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+[+-]\d{4}: ")
_DOM_CALL = re.compile(r": (virDomain\w+):\d+ : dom=0x[0-9a-f]+, \(VM: name=(.*?), uuid=")
_DEFINE = re.compile(r": virDomainDefineXML(?:Flags)?:\d+ : ")
_XML_NAME = re.compile(r"<name>([^<]*)</name>")

PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (best effort)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


# -- building a fleet -------------------------------------------------------------------


def make_nodes(count: int, rack: str, prefix: str = "vm", power: str = "off") -> list[SimNode]:
    """``count`` simulated VMs named ``<prefix>-<rack>-NNN`` (power type ``virsh``).

    ``power_address`` is :data:`URI_PLACEHOLDER` until :func:`start_fleet` fills in the
    fleet's URI (it updates these same objects); ``power_id`` is the domain name.
    """
    return [
        SimNode(
            name=f"{prefix}-{rack}-{i:03d}",
            rack=rack,
            power_type="virsh",
            power_parameters={"power_address": URI_PLACEHOLDER, "power_id": f"{prefix}-{rack}-{i:03d}"},
            power=power,
        )
        for i in range(1, count + 1)
    ]


def fleet_xml(nodes: list[SimNode]) -> str:
    """A test-driver node description: one ``<domain type='test'>`` per node, booting from disk."""
    root = ET.Element("node")
    for node in nodes:
        dom = ET.SubElement(root, "domain", {"type": "test"})
        ET.SubElement(dom, "name").text = _domain_name(node)
        ET.SubElement(dom, "uuid").text = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node.name}.powerq.sim"))
        ET.SubElement(dom, "memory", {"unit": "MiB"}).text = "512"
        ET.SubElement(dom, "vcpu").text = "1"
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type").text = "hvm"
        ET.SubElement(os_el, "boot", {"dev": "hd"})
        ET.SubElement(os_el, "boot", {"dev": "network"})
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _domain_name(node: SimNode) -> str:
    return str(node.power_parameters.get("power_id") or node.name)


# -- the holder (runs in its own process) ----------------------------------------------------


class UnsupportedFault(ValueError):
    """A fault this peer cannot inject."""


class ApiLog:
    """Incremental reader of libvirtd's ``libvirt.domain`` debug log: calls per domain."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: Counter[tuple[str, str]] = Counter()  # (domain, api) -> n
        self.defines: Counter[str] = Counter()  # domain -> n
        self._fh: io.TextIOWrapper | None = None
        self._partial = ""
        self._define_open = False
        self._lock = threading.Lock()

    def update(self) -> None:
        with self._lock:
            if self._fh is None:
                if not self.path.exists():
                    return
                self._fh = open(self.path, encoding="utf-8", errors="replace")  # noqa: SIM115
            data = self._partial + self._fh.read()
            cut = data.rfind("\n") + 1
            self._partial = data[cut:]
            for line in data[:cut].splitlines():
                self._line(line)

    def _line(self, line: str) -> None:
        if _TS.match(line):
            self._define_open = False
            m = _DOM_CALL.search(line)
            if m:
                self.calls[(m.group(2), m.group(1))] += 1
                return
            if _DEFINE.search(line):
                self._define_open = True
        if self._define_open:
            m = _XML_NAME.search(line)
            if m:
                self.defines[m.group(1)] += 1
                self._define_open = False

    def counts(self) -> dict[str, Counter[str]]:
        """Count keys per domain name (raw, since libvirtd started)."""
        self.update()
        out: dict[str, Counter[str]] = {}
        with self._lock:
            for (name, api), n in self.calls.items():
                key = _API_TO_KEY.get(api)
                if key:
                    out.setdefault(name, Counter())[key] += n
            for name, n in self.defines.items():
                out.setdefault(name, Counter())["boot"] += n
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


class Holder:
    """libvirtd + the one long-lived connection + the control backend."""

    def __init__(self, nodes: list[SimNode], workdir: Path) -> None:
        self.sim_nodes = nodes
        self.names = [_domain_name(n) for n in nodes]
        self.workdir = workdir
        self.rundir: Path | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.conn: Any = None
        self.log: ApiLog | None = None
        self.uri = ""
        self.tcp_uri: str | None = None
        self.sasl_password = secrets.token_urlsafe(12)
        self._auth_faults: set[str] = set()
        self._owner: tuple[int, int] | None = None  # (uid, gid) libvirtd runs as, when root
        self._lock = threading.RLock()
        self._baseline: dict[str, Counter[str]] = {}
        self._own: dict[str, Counter[str]] = {}
        self._boot_cache: dict[str, tuple[int, str | None]] = {}

    # lifecycle

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = "/tmp" if os.path.isdir("/tmp") else None
        self.rundir = Path(tempfile.mkdtemp(prefix="pqvirt-", dir=base))
        (self.workdir / "libvirt-rundir").write_text(str(self.rundir) + "\n")
        (self.workdir / "fleet.xml").write_text(fleet_xml(self.sim_nodes))
        self._owner = _unprivileged_ids() if os.geteuid() == 0 else None
        if self._owner is not None:
            os.chown(self.rundir, *self._owner)
        if SASLPASSWD2 is not None:
            self._setup_sasl()
        sock = self.rundir / "run" / "libvirt" / "libvirt-sock"
        self.uri = f"test+unix:///default?socket={sock}"
        self.log = ApiLog(self.rundir / "api.log")
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._event_loop, name="libvirt-events", daemon=True).start()
        deadline = time.monotonic() + timeout
        for attempt in range(3):  # a free port taken by someone else before libvirtd binds it
            port = _free_port() if SASLPASSWD2 is not None else None
            self._start_daemon(port)
            if self._wait_up(sock, port, deadline):
                break
            if attempt == 2 or port is None:
                assert self.daemon is not None
                raise RuntimeError(f"libvirtd exited with {self.daemon.returncode}; see {self.rundir}")
        if port is not None:
            self.tcp_uri = f"test+tcp://{SASL_USER}@127.0.0.1:{port}/default"
        self._define_fleet()
        self.reset_counts()

    def _wait_up(self, sock: Path, port: int | None, deadline: float) -> bool:
        """Wait for libvirtd's unix socket (opening the holder's connection) and its TCP
        port. False when libvirtd exited first; raises ``RuntimeError`` at ``deadline``."""
        import libvirt

        while True:
            if self.daemon is not None and self.daemon.poll() is not None:
                return False
            if self.conn is None and sock.exists():
                try:
                    self.conn = libvirt.open(self.uri)
                except libvirt.libvirtError:
                    pass
            if self.conn is not None and (port is None or _listening(port)):
                return True
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd did not come up")
            time.sleep(0.05)

    def _setup_sasl(self) -> None:
        """SASL config for libvirtd (DIGEST-MD5 over a sasldb) and the fleet's user."""
        assert self.rundir is not None
        sasl = self.rundir / "sasl"
        sasl.mkdir()
        (sasl / "libvirt.conf").write_text(f"mech_list: digest-md5\nsasldb_path: {sasl / 'passwd.db'}\n")
        self._set_sasl_password(self.sasl_password)

    def _set_sasl_password(self, password: str) -> None:
        """Write ``password`` for :data:`SASL_USER` into the sasldb libvirtd reads."""
        assert self.rundir is not None and SASLPASSWD2 is not None
        sasl = self.rundir / "sasl"
        subprocess.run(
            [SASLPASSWD2, "-p", "-c", "-a", "libvirt", "-f", str(sasl / "passwd.db"), SASL_USER],
            input=password.encode(), check=True, capture_output=True, timeout=30,
        )
        if self._owner is not None:
            for path in (sasl, *sasl.iterdir()):
                os.chown(path, *self._owner)

    def _start_daemon(self, tcp_port: int | None) -> None:
        """Start libvirtd; with ``tcp_port``, also listening on 127.0.0.1:``tcp_port``
        with SASL authentication."""
        assert self.rundir is not None
        rundir = self.rundir
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(rundir),
            "XDG_RUNTIME_DIR": str(rundir / "run"),
            "XDG_CONFIG_HOME": str(rundir / "config"),
            "XDG_CACHE_HOME": str(rundir / "cache"),
            "LIBVIRT_LOG_FILTERS": "1:libvirt.domain",
            "LIBVIRT_LOG_OUTPUTS": f"1:file:{rundir / 'api.log'}",
        }
        argv = [LIBVIRTD, "--timeout", "0"]
        if tcp_port is not None:
            conf = rundir / "libvirtd.conf"
            conf.write_text(
                "listen_tls = 0\nlisten_tcp = 1\n"
                f'listen_addr = "127.0.0.1"\ntcp_port = "{tcp_port}"\nauth_tcp = "sasl"\n'
            )
            env["SASL_CONF_PATH"] = str(rundir / "sasl")
            argv += ["--listen", "--config", str(conf)]
        kwargs: dict[str, Any] = {}
        if self._owner is not None:
            kwargs = {"user": self._owner[0], "group": self._owner[1], "extra_groups": []}
        out = open(self.workdir / "libvirtd.out", "ab")  # noqa: SIM115
        try:
            # PDEATHSIG is set after the uid change (which would clear it), so libvirtd
            # dies with the holder whatever happens to the holder.
            self.daemon = subprocess.Popen(
                argv,
                env=env, cwd=str(rundir), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                preexec_fn=_die_with_parent, **kwargs,
            )
        finally:
            out.close()

    @staticmethod
    def _event_loop() -> None:
        import libvirt

        while True:
            try:
                libvirt.virEventRunDefaultImpl()
            except Exception:  # noqa: BLE001 - keep serving keepalives
                time.sleep(0.1)

    def _define_fleet(self) -> None:
        for dom in self.conn.listAllDomains(0):  # the test driver's built-in "test" domain
            if dom.name() not in self.names:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        root = ET.fromstring((self.workdir / "fleet.xml").read_text())
        wanted = {_domain_name(n): n.power for n in self.sim_nodes}
        for dom_el in root.findall("domain"):
            dom = self.conn.defineXML(ET.tostring(dom_el, encoding="unicode"))
            if wanted.get(dom.name()) == "on" and not dom.isActive():
                dom.create()
        for node in self.sim_nodes:
            node.power_parameters["power_address"] = self.uri

    def stop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
        if self.log is not None:
            self.log.close()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(5)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(5)
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None

    # ControlBackend

    def _raw_counts(self) -> dict[str, Counter[str]]:
        assert self.log is not None
        return self.log.counts()

    def nodes(self) -> dict[str, dict[str, Any]]:
        import libvirt

        with self._lock:
            raw = self._raw_counts()
            active = {d.name() for d in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
            out: dict[str, dict[str, Any]] = {}
            for name in self.names:
                got = raw.get(name, Counter())
                base = self._baseline.get(name, Counter())
                own = self._own.get(name, Counter())
                counts = {k: max(0, got[k] - base[k] - own[k]) for k in COUNT_KEYS}
                out[name] = {
                    "power": "on" if name in active else "off",
                    "boot": self._boot(name, got["boot"]),
                    "counts": counts,
                    "fault": "auth" if name in self._auth_faults else "none",
                    "latency": 0.0,
                }
            return out

    def _boot(self, name: str, defines: int) -> str | None:
        import libvirt

        cached = self._boot_cache.get(name)
        if cached is not None and cached[0] == defines:
            return cached[1]
        try:
            xml = self.conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        except libvirt.libvirtError:
            return None
        os_el = ET.fromstring(xml).find("os")
        boots = [] if os_el is None else [b.get("dev", "") for b in os_el.findall("boot")]
        boot = _BOOT_NAMES.get(boots[0], boots[0]) if boots else None
        self._boot_cache[name] = (defines, boot)
        return boot

    def _lookup(self, name: str) -> Any:
        import libvirt

        if name not in self.names:
            raise KeyError(name)
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError:
            raise KeyError(name) from None

    def set_state(self, name: str, power: str) -> None:
        if power not in ("on", "off"):
            raise ValueError("power must be 'on' or 'off'")
        with self._lock:
            dom = self._lookup(name)
            own = self._own.setdefault(name, Counter())
            if power == "on" and not dom.isActive():
                own["on"] += 1
                dom.create()
            elif power == "off" and dom.isActive():
                own["off"] += 1
                dom.destroy()

    def set_fault(self, name: str, fault: str, latency: float) -> None:
        """``none``, or ``auth`` (hypervisor-wide, see the module docstring)."""
        self._lookup(name)
        if fault == "auth" and self.tcp_uri is None:
            raise UnsupportedFault("fault 'auth' needs the TCP listener, which needs saslpasswd2")
        if fault not in ("none", "auth"):
            raise UnsupportedFault(
                f"fault {fault!r} is not supported by the libvirt peer: libvirtd cannot be "
                "made to misbehave for one domain"
            )
        with self._lock:
            before = bool(self._auth_faults)
            if fault == "auth":
                self._auth_faults.add(name)
            else:
                self._auth_faults.discard(name)
            if bool(self._auth_faults) != before:
                self._set_sasl_password(
                    secrets.token_urlsafe(12) if self._auth_faults else self.sasl_password
                )

    def reset_counts(self) -> None:
        with self._lock:
            self._baseline = self._raw_counts()
            self._own = {}


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _unprivileged_ids() -> tuple[int, int]:
    """(uid, gid) of ``nobody`` / ``nogroup``: who libvirtd runs as when the holder is root."""
    import grp
    import pwd

    uid = pwd.getpwnam("nobody").pw_uid
    gid = grp.getgrnam("nogroup").gr_gid if _has_group("nogroup") else pwd.getpwnam("nobody").pw_gid
    return uid, gid


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def serve_libvirt_control(holder: Holder, port: int = 0) -> tuple[Any, int]:
    """:func:`tests.peers.common.serve_control`, answering 400 for faults this peer
    cannot inject and for a bad ``power`` value."""
    server, bound = serve_control(holder, port=port)
    base = server.RequestHandlerClass

    class Handler(base):  # type: ignore[misc, valid-type]
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            self.rfile = io.BytesIO(raw)
            try:
                super().do_POST()
            except (UnsupportedFault, ValueError) as exc:
                self._reply(400, {"error": str(exc)})

    server.RequestHandlerClass = Handler
    return server, bound


def holder_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help="JSON: {nodes: [SimNode...], workdir?: path, parent_pid?: int}")
    parser.add_argument("--control-port", type=int, default=0, help="control API port (0: any free port)")
    args = parser.parse_args(argv)

    spec = json.loads(args.spec.read_text())
    parent_pid = int(spec.get("parent_pid") or os.getppid())
    _die_with_parent(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return 1
    nodes = [SimNode(**n) for n in spec["nodes"]]
    workdir = Path(spec.get("workdir") or args.spec.parent)

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())

    holder = Holder(nodes, workdir)
    try:
        holder.start()
        server, port = serve_libvirt_control(holder, args.control_port)
        ready = {
            "uri": holder.uri,
            "tcp_uri": holder.tcp_uri,
            "sasl_password": holder.sasl_password if holder.tcp_uri else None,
            "control_url": f"http://127.0.0.1:{port}",
            "pid": os.getpid(),
            "daemon_pid": holder.daemon.pid if holder.daemon is not None else None,
            "nodes": [n.inventory_entry() for n in nodes],
        }
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        while not stopping.wait(0.5):
            if os.getppid() != parent_pid:
                break
            if holder.daemon is not None and holder.daemon.poll() is not None:
                print(f"libvirtd exited with {holder.daemon.returncode}", file=sys.stderr)
                break
        server.shutdown()
        server.server_close()
    finally:
        holder.stop()
    return 0


# -- the parent's side ------------------------------------------------------------------


class LibvirtFleet:
    """A running holder process: its URI, its nodes and its control API."""

    def __init__(self, proc: subprocess.Popen[bytes], uri: str, control_url: str,
                 sim_nodes: list[SimNode], workdir: Path, daemon_pid: int | None = None,
                 tcp_uri: str | None = None, sasl_password: str | None = None) -> None:
        self.proc = proc
        self.daemon_pid = daemon_pid
        """libvirtd's pid (it runs as ``nobody``)."""
        self.uri = uri
        """The ``test+unix://`` URI to put in ``power_address`` (no password asked)."""
        self.tcp_uri = tcp_uri
        """``test+tcp://powerq@127.0.0.1:PORT/default``: the same hypervisor behind SASL
        authentication (``None`` without ``saslpasswd2``)."""
        self.sasl_password = sasl_password
        """The ``power_pass`` that :attr:`tcp_uri` accepts."""
        self.control_url = control_url
        self.control = PeerControl(control_url)
        self.sim_nodes = sim_nodes
        """The nodes, with ``power_address`` filled in."""
        self.workdir = workdir

    def nodes(self) -> dict[str, dict[str, Any]]:
        """``GET /nodes``: power, boot and counts per domain."""
        return self.control.nodes()

    def node(self, name: str) -> dict[str, Any]:
        return self.control.node(name)

    def inventory(self) -> list[dict[str, Any]]:
        """Inventory entries (name, rack, power_type, power_parameters) of the fleet."""
        return [n.inventory_entry() for n in self.sim_nodes]

    def set_state(self, name: str, power: str) -> None:
        """Power a domain on or off behind the drivers' back (not counted)."""
        self.control.set_state(name, power)

    def tcp_entry(self, name: str, password: str | None = None) -> dict[str, Any]:
        """The inventory entry of ``name`` reached through :attr:`tcp_uri`, with
        ``password`` (default: the right one) as ``power_pass``."""
        assert self.tcp_uri is not None, "this fleet has no TCP listener (saslpasswd2 missing)"
        entry = next(n.inventory_entry() for n in self.sim_nodes if n.name == name)
        entry["power_parameters"].update(
            power_address=self.tcp_uri,
            power_pass=self.sasl_password if password is None else password,
        )
        return entry

    def fault(self, name: str, fault: str, latency: float = 0.0) -> None:
        """``"none"`` or ``"auth"`` (every login on :attr:`tcp_uri` refused until cleared);
        anything else raises ``urllib.error.HTTPError`` 400."""
        self.control.fault(name, fault, latency)

    def reset(self) -> None:
        """Zero every count."""
        self.control.reset()

    def stop(self) -> None:
        """Stop the holder (and with it libvirtd). Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> LibvirtFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_fleet(nodes: list[SimNode], workdir: Path, *, control_port: int = 0,
                timeout: float = 30.0) -> LibvirtFleet:
    """Start a holder serving ``nodes`` (see :func:`make_nodes`) and wait until it is ready.

    Fills in each node's ``power_address`` with the fleet's URI. Each call gets its own
    libvirtd, socket and control port, so fleets never collide. Raises ``RuntimeError``
    when the holder does not come up within ``timeout`` seconds.
    """
    if len({_domain_name(n) for n in nodes}) != len(nodes):
        raise ValueError("domain names must be unique")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "libvirt-fleet.json"
    spec.write_text(json.dumps({
        "nodes": [n.to_json() for n in nodes],
        "workdir": str(workdir),
        "parent_pid": os.getpid(),
    }, indent=1))
    with open(workdir / "libvirt-holder.log", "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.peers.libvirt_sim", "--spec", str(spec),
             "--control-port", str(control_port)],
            cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
        )
    assert proc.stdout is not None
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            line += chunk
    if not line.endswith(b"\n"):
        fleet = LibvirtFleet(proc, "", "", nodes, workdir)
        fleet.stop()
        raise RuntimeError(f"libvirt fleet did not start; see {workdir / 'libvirt-holder.log'}")
    ready = json.loads(line)
    for node in nodes:
        node.power_parameters["power_address"] = ready["uri"]
    fleet = LibvirtFleet(proc, ready["uri"], ready["control_url"], nodes, workdir,
                         ready.get("daemon_pid"), ready.get("tcp_uri"), ready.get("sasl_password"))
    fleet.control.wait_ready(timeout)
    return fleet


if __name__ == "__main__":
    sys.exit(holder_main())
