"""A simulated vCenter for the ``vmware`` power type: govmomi's vSphere simulator.

``tests/peers/vcsim/main.go`` is a small Go program around govmomi's ``simulator.VPX()``
(Debian's ``golang-github-vmware-govmomi-dev``). :func:`build` compiles it offline with
Debian's ``golang-go`` into ``.cache/vcsim/`` at the repository root, again whenever
``main.go`` or the Go toolchain changed; a missing ``go`` is an error, never a skip.

:func:`start` runs it and returns a :class:`VcsimPeer`:

- the simulator keeps every VM's state; the peer reads power state and boot order through
  the vSphere API (pyvmomi, one session of its own) and changes power state the same way.
  Its own requests carry the header ``X-Powerq-Peer-Control``, which the Go side does not
  count;
- counts come from the Go side's hook, which reads every SOAP request before the simulator
  gets it: ``on`` PowerOnVM_Task, ``off`` PowerOffVM_Task, ``soft_off`` ShutdownGuest,
  ``reset`` ResetVM_Task, ``cycle`` RebootGuest, ``boot`` ReconfigVM_Task, ``query`` reads
  of a VM's runtime, ``sessions`` logins, ``open_sessions`` logins not yet logged out (the
  last two are server-wide: every VM shows the same numbers);
- drivers reach the simulator through a TCP proxy in this process (the nodes'
  ``power_port``), so that ``no_answer`` can make the whole endpoint accept and never
  answer, as a hung vCenter does.

Faults (``set_fault``): ``busy`` — the VM's power and reconfigure tasks fail with the
vSphere fault ``TaskInProgress`` (done by the simulator: the VM object is wrapped in Go);
``slow`` — requests naming the VM are delayed by ``latency`` seconds (Go side); ``auth`` —
the simulator refuses every login (``InvalidLogin``) until cleared: credentials belong to
the vCenter, not to a VM; ``no_answer`` — the proxy stops answering for every VM. Other
faults raise ``ValueError``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.peers.common import SimNode, serve_control

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().parent / "vcsim" / "main.go"
CACHE = REPO_ROOT / ".cache" / "vcsim"
GOPATH_SYSTEM = "/usr/share/gocode"
CONTROL_HEADER = "X-Powerq-Peer-Control"
USER = "powerq"
PASSWORD = "vcsim-Pa55"
COUNT_KEYS = ("on", "off", "soft_off", "cycle", "reset", "boot", "query", "sessions", "open_sessions")
_BOOT_NAMES = {"BootableEthernetDevice": "pxe", "BootableDiskDevice": "disk",
               "BootableCdromDevice": "cdrom", "BootableFloppyDevice": "floppy"}


def _go() -> str:
    go = shutil.which("go") or ("/usr/bin/go" if os.path.exists("/usr/bin/go") else None)
    if go is None:
        raise RuntimeError("go not found: install Debian's golang-go and "
                           "golang-github-vmware-govmomi-dev (deploy/bootstrap.sh)")
    if not Path(GOPATH_SYSTEM, "src/github.com/vmware/govmomi/simulator").is_dir():
        raise RuntimeError("govmomi's simulator library is missing: install Debian's "
                           "golang-github-vmware-govmomi-dev (deploy/bootstrap.sh)")
    return go


def build() -> Path:
    """The simulator binary, built into ``.cache/vcsim/`` if missing or stale. Safe to
    call from several processes at once. Raises ``RuntimeError`` with the compiler's
    output when the build fails."""
    go = _go()
    CACHE.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    stamp = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()
    binary, stamp_file = CACHE / "vcsim", CACHE / "vcsim.sha256"
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
            return binary
        env = {
            **os.environ, "GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": "", "GOENV": "off",
            "GOPATH": f"{CACHE / 'gopath'}:{GOPATH_SYSTEM}", "GOCACHE": str(CACHE / "gocache"),
            "CGO_ENABLED": "0",
        }
        tmp = CACHE / "vcsim.tmp"
        out = subprocess.run([go, "build", "-o", str(tmp), "."], cwd=SOURCE.parent, env=env,
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"building the vCenter simulator failed:\n{out.stdout}{out.stderr}")
        tmp.replace(binary)
        stamp_file.write_text(stamp)
    return binary


class HangingProxy:
    """A TCP proxy on 127.0.0.1 that forwards to ``target`` until :attr:`hang` is set;
    then it still accepts connections and reads, but forwards and answers nothing."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.hang = False
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="vcsim-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(client)
            if self.hang:
                threading.Thread(target=self._drain, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _drain(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.hang:  # swallow: the other side waits forever
                    self._drain(src)
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()
            self._conns.clear()


@dataclass
class VcsimPeer:
    """A running simulator, its proxy, a pyvmomi control session and the SimNodes."""

    proc: subprocess.Popen[bytes]
    sdk_url: str
    control_url: str
    proxy: HangingProxy
    tls: bool
    cert_file: Path | None
    nodes_list: list[SimNode] = field(default_factory=list)
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> moref, uuids, macs
    faults: dict[str, str] = field(default_factory=dict)
    _si: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- Go side --------------------------------------------------------------------

    def _go_call(self, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.control_url + path, data=data,
                                     method="GET" if body is None else "POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    # -- vSphere side (not counted) ---------------------------------------------------

    def _session(self) -> Any:
        from pyVim import connect

        if self._si is None:
            u = urlsplit(self.sdk_url)
            context = ssl._create_unverified_context() if self.tls else None
            kwargs = {"sslContext": context} if context else {}
            self._si = connect.SmartConnect(
                protocol=u.scheme, host=u.hostname, port=u.port, user=USER, pwd=PASSWORD,
                customHeaders={CONTROL_HEADER: "1"}, httpConnectionTimeout=10, **kwargs)
        return self._si

    def _vm(self, name: str) -> Any:
        from pyVmomi import vim

        return vim.VirtualMachine(self.vms[name]["moref"], self._session()._stub)

    def _read_all(self) -> dict[str, dict[str, Any]]:
        from pyVmomi import vim, vmodl

        si = self._session()
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                name="view", path="view", skip=False, type=vim.view.ContainerView)])],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=[
                "name", "runtime.powerState", "config.bootOptions", "config.instanceUuid",
                "config.uuid", "config.hardware.device"])],
        )
        try:
            objects = content.propertyCollector.RetrieveContents([spec])
        finally:
            view.Destroy()
        out = {}
        for obj in objects:
            props = {p.name: p.val for p in obj.propSet}
            boot_opts = props.get("config.bootOptions")
            order = list(boot_opts.bootOrder or []) if boot_opts else []
            boot = _BOOT_NAMES.get(type(order[0]).__name__.split(".")[-1]) if order else None
            out[props["name"]] = {
                "moref": obj.obj._moId, "power": props["runtime.powerState"], "boot": boot,
                "instance_uuid": props.get("config.instanceUuid"), "uuid": props.get("config.uuid"),
                "macs": [d.macAddress for d in props.get("config.hardware.device") or []
                         if isinstance(d, vim.vm.device.VirtualEthernetCard)],
            }
        return out

    # -- control API (tests.peers.common.ControlBackend) ------------------------------

    def nodes(self) -> dict[str, dict[str, Any]]:
        """``{name: {"power": "on"|"off"|"suspended", "boot", "counts", "fault", ...}}``."""
        with self._lock:
            seen = self._read_all()
        go = self._go_call("/vms")
        out = {}
        for name, info in seen.items():
            counts = {k: 0 for k in COUNT_KEYS}
            counts.update(go.get(name, {}).get("counts", {}))
            power = {"poweredOn": "on", "poweredOff": "off"}.get(info["power"], info["power"])
            out[name] = {**info, "power": power, "counts": counts,
                         "fault": self.faults.get(name, "none"),
                         "latency": go.get(name, {}).get("latency", 0.0)}
        return out

    def set_state(self, name: str, power: str) -> None:
        """Power the VM on, off or ``suspended`` through the vSphere API (not counted)."""
        from pyVim.task import WaitForTask

        want = {"on": "poweredOn", "off": "poweredOff", "suspended": "suspended"}[power]
        with self._lock:
            vm = self._vm(name)
            state = vm.runtime.powerState
            if state == want:
                return
            if want == "poweredOn":
                WaitForTask(vm.PowerOnVM_Task())
            elif want == "poweredOff":
                WaitForTask(vm.PowerOffVM_Task())
            else:
                if state != "poweredOn":
                    WaitForTask(vm.PowerOnVM_Task())
                WaitForTask(vm.SuspendVM_Task())

    def set_fault(self, name: str, fault: str, latency: float = 0.0) -> None:
        if name not in self.vms:
            raise KeyError(name)
        if fault not in ("none", "busy", "slow", "auth", "no_answer"):
            raise ValueError(f"the vCenter simulator cannot simulate {fault!r}")
        previous = self.faults.get(name, "none")
        if previous == "auth" or fault == "auth":
            self._go_call("/auth", {"refuse": fault == "auth"})
        if previous == "no_answer" or fault == "no_answer":
            self.proxy.hang = fault == "no_answer"
        go_fault = fault if fault in ("busy", "slow") else "none"
        self._go_call("/fault", {"vm": name, "fault": go_fault, "latency": latency})
        self.faults[name] = fault

    fault = set_fault

    def reset_counts(self) -> None:
        self._go_call("/reset", {})

    reset = reset_counts

    def serve_control(self) -> int:
        """Serve the JSON control API of tests.peers.common; returns its port."""
        _server, port = serve_control(self)
        return port

    def stop(self) -> None:
        if self._si is not None:
            from pyVim import connect

            with contextlib.suppress(Exception):
                connect.Disconnect(self._si)
            self._si = None
        self.proxy.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    # -- inventory --------------------------------------------------------------------

    def params(self, **overrides: Any) -> dict[str, Any]:
        """Chassis-scope parameters that reach the simulator through the proxy."""
        return {
            "power_address": "127.0.0.1", "power_port": self.proxy.port,
            "power_protocol": "https+unverified" if self.tls else "http",
            "power_user": USER, "power_pass": PASSWORD, **overrides,
        }


def start(count: int, workdir: Path, *, rack: str = "r1", prefix: str = "vmw",
          tls: bool = False, by: str = "uuid") -> VcsimPeer:
    """Build (if needed) and start a simulator with ``count`` VMs named
    ``<prefix>-001``…, all powered off. ``by`` says how the nodes address their VM:
    ``uuid`` (power_uuid), ``name`` (power_vm_name) or ``mixed`` (alternating)."""
    binary = build()
    workdir.mkdir(parents=True, exist_ok=True)
    cert_file = workdir / "vcsim-cert.pem" if tls else None
    cmd = [str(binary), "-vms", str(count), "-prefix", prefix, "-user", USER, "-pass", PASSWORD]
    if tls:
        cmd += ["-tls", "-certfile", str(cert_file)]
    log = open(workdir / "vcsim.log", "wb")  # noqa: SIM115 - owned by the process
    # stdin stays open: the simulator exits when this process (the pipe's writer) goes away.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    log.close()
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise RuntimeError("the vCenter simulator did not start:\n"
                           + (workdir / "vcsim.log").read_text(errors="replace")[-3000:])
    urls = json.loads(line)
    sdk = urlsplit(urls["sdk"])
    proxy = HangingProxy((sdk.hostname or "127.0.0.1", sdk.port or 0))
    peer = VcsimPeer(proc=proc, sdk_url=urls["sdk"], control_url=urls["control"], proxy=proxy,
                     tls=tls, cert_file=cert_file)
    try:
        peer.vms = peer._read_all()
        for i, name in enumerate(sorted(peer.vms)):
            info = peer.vms[name]
            use_uuid = by == "uuid" or (by == "mixed" and i % 2 == 0)
            node_param = ({"power_uuid": info["instance_uuid"]} if use_uuid
                          else {"power_vm_name": name})
            peer.nodes_list.append(SimNode(name=name, rack=rack, power_type="vmware",
                                           power_parameters={**peer.params(), **node_param},
                                           power="off"))
            peer.faults[name] = "none"
    except BaseException:
        peer.stop()
        raise
    return peer
