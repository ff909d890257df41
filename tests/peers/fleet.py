"""A simulated fleet of mixed power types: IPMI BMCs, Redfish systems, libvirt domains.

Two layouts:

- **racks x mix** (the demo's): each of ``racks`` racks gets ``mix`` IPMI BMCs (pyghmi's
  BMC server, each on its own 127.20.<rack>.x:623), Redfish systems (sushy-tools'
  emulator, each on its own 127.40.<rack>.x:8000) and libvirt domains (libvirt's test
  driver served by a libvirtd of the fleet's own). :func:`start`.
- **at scale** (issue 4): ``ipmi`` / ``redfish`` / ``virsh`` nodes in all, each type cut
  into racks of ``rack_size`` nodes (``r1``, ``r2`` ... IPMI first, then Redfish, then
  virsh), IPMI BMCs on consecutive addresses from ``ipmi_base`` (127.100.0.1: 5,000 BMCs
  reach 127.100.19.174) sharded over a few processes, Redfish BMCs from
  ``redfish_base`` (127.110.0.1) a few hundred per process. :class:`Layout`,
  :func:`start_layout`.

Both take a fleet-wide reply ``latency`` with ``jitter`` (seconds) for IPMI and Redfish.

``powerq sim`` runs one (:func:`main` in the foreground; :func:`up` / :func:`down` start it
detached and stop it). While it runs, ``DIR/fleet.json`` is its state file: the runner's
pid, its peer processes' pids, the control API URLs, node counts and racks. The
inventory goes to ``DIR/inventory.yaml`` and its passwords to ``DIR/secrets.yaml`` (both
mode 0600; the inventory names the secrets file, so ``powerq inventory load
DIR/inventory.yaml`` needs nothing else).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.peers.common import SimNode

STATE_FILE = "fleet.json"
INVENTORY_FILE = "inventory.yaml"
SECRETS_FILE = "secrets.yaml"
LOG_FILE = "sim.log"
IPMI_PER_SHARD = 1700
"""IPMI BMCs per shard process in a fleet at scale: 5,000 make three shards (one epoll
loop each), which suits a 2-core machine where the client needs a core too."""
MAX_IPMI_SHARDS = 4
SECRET_PARAMS = ("power_pass", "k_g")
_REPO = Path(__file__).resolve().parents[2]


@dataclass
class Mix:
    ipmi: int = 20
    redfish: int = 10
    virsh: int = 10

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``ipmi=20,redfish=10,virsh=10``"""
        values: dict[str, int] = {}
        for part in filter(None, text.split(",")):
            key, _, num = part.partition("=")
            if key not in ("ipmi", "redfish", "virsh") or not num.isdigit():
                raise ValueError(f"bad mix {text!r}: use ipmi=N,redfish=N,virsh=N")
            values[key] = int(num)
        return cls(**values)


@dataclass
class Layout:
    """A fleet at scale: node counts per type, cut into racks of ``rack_size``."""

    ipmi: int = 0
    redfish: int = 0
    virsh: int = 0
    rack_size: int = 500
    ipmi_base: str = "127.100.0.1"
    redfish_base: str = "127.110.0.1"
    redfish_port: int = 8000
    ipmi_shards: int | None = None
    """IPMI shard processes (None: one per :data:`IPMI_PER_SHARD` BMCs, at most
    :data:`MAX_IPMI_SHARDS`)."""
    redfish_shard_size: int | None = None
    """Redfish BMCs per process (None: the simulator's default)."""

    def check(self) -> None:
        """Raise ``ValueError`` for a layout that cannot run."""
        for name in ("ipmi", "redfish", "virsh"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.ipmi + self.redfish + self.virsh == 0:
            raise ValueError("the fleet needs at least one node")
        if self.rack_size < 1:
            raise ValueError("rack_size must be at least 1")
        if self.ipmi_shards is not None and self.ipmi_shards < 1:
            raise ValueError("ipmi_shards must be at least 1")

    def shards_for_ipmi(self) -> int:
        if self.ipmi_shards is not None:
            return self.ipmi_shards
        return max(1, min(MAX_IPMI_SHARDS, -(-self.ipmi // IPMI_PER_SHARD)))


@dataclass
class SimFleet:
    nodes: list[SimNode]
    peers: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None

    def by_name(self) -> dict[str, SimNode]:
        return {n.name: n for n in self.nodes}

    def peer_of(self, name: str) -> Any:
        return self.peers[self.by_name()[name].power_type]

    def peer_nodes(self) -> dict[str, dict[str, Any]]:
        """Every node's state and counts, as its peer saw them."""
        out: dict[str, dict[str, Any]] = {}
        for peer in self.peers.values():
            out.update(peer.nodes())
        return out

    def reset_counts(self) -> None:
        for peer in self.peers.values():
            peer.reset()

    def inventory(self) -> dict[str, Any]:
        return {"nodes": [n.inventory_entry() for n in self.nodes]}

    def write_inventory(self, path: Path, secrets_path: Path | None = None) -> Path:
        """Write the inventory (mode 0600). With ``secrets_path``, the secret parameters go
        to that YAML file instead (one key per power type and parameter, e.g.
        ``ipmi_power_pass``) and the inventory refers to them as ``{file: key}``."""
        doc = self.inventory()
        if secrets_path is not None:
            found: dict[str, str] = {}
            for entry in doc["nodes"]:
                params = entry["power_parameters"]
                for key in SECRET_PARAMS:
                    if key not in params:
                        continue
                    value = str(params[key])
                    ref = f"{entry['power_type']}_{key}"
                    if found.setdefault(ref, value) != value:  # a node of its own password
                        ref = f"{entry['name']}_{key}"
                        found[ref] = value
                    params[key] = {"file": ref}
            _write_private(secrets_path, _yaml(found))
            where = secrets_path.name if secrets_path.parent == path.parent else str(secrets_path)
            doc = {"secrets_file": where, **doc}
        _write_private(path, _yaml(doc))
        return path

    def pids(self) -> list[int]:
        """The peer processes' ids (IPMI shards, Redfish simulators, libvirt holder)."""
        out: list[int] = []
        for peer in self.peers.values():
            pids = getattr(peer, "pids", None)
            if pids is not None:
                out.extend(pids)
            elif getattr(peer, "proc", None) is not None:
                out.append(peer.proc.pid)
        return out

    def stop(self) -> None:
        for peer in self.peers.values():
            try:
                peer.stop()
            except Exception:  # stop everything we can
                pass


def _yaml(doc: Any) -> str:
    """``doc`` as YAML, in order; libyaml's emitter when present (5,500 nodes: 2.3 s in
    pure Python, a tenth of that in C)."""
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return str(yaml.dump(doc, Dumper=dumper, sort_keys=False))


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def _set_initial(by_type: dict[str, list[SimNode]], initial: str) -> None:
    if initial not in ("on", "off", "mixed"):
        raise ValueError("initial must be on, off or mixed")
    for nodes in by_type.values():
        for i, node in enumerate(nodes):
            node.power = initial if initial != "mixed" else ("on" if i % 3 == 0 else "off")


def _launch(workdir: Path, by_type: dict[str, list[SimNode]], options: dict[str, dict[str, Any]]) -> SimFleet:
    from tests.peers import ipmi_bmc, libvirt_sim, redfish_sim

    fleet = SimFleet(nodes=[], workdir=workdir)
    starters = {"ipmi": ipmi_bmc.start_fleet, "redfish": redfish_sim.start_fleet,
                "virsh": libvirt_sim.start_fleet}
    # The power types start side by side (each waits for its own processes to be ready).
    # libvirt's holder asks Linux to stop it when the *thread* that started it ends
    # (PR_SET_PDEATHSIG follows the parent thread): it starts in this thread.
    failure: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="sim-start")
    futures = {power_type: pool.submit(starters[power_type], nodes, workdir / power_type,
                                       **options.get(power_type, {}))
               for power_type, nodes in by_type.items() if nodes and power_type != "virsh"}
    try:
        if by_type.get("virsh"):
            try:
                fleet.peers["virsh"] = starters["virsh"](by_type["virsh"], workdir / "virsh",
                                                         **options.get("virsh", {}))
            except Exception as exc:
                failure = exc
        for power_type, future in futures.items():
            try:
                fleet.peers[power_type] = future.result()
            except Exception as exc:  # stop the others, then re-raise
                failure = failure or exc
    except BaseException:  # interrupted while waiting: stop whatever started
        failure = failure or RuntimeError("interrupted")
        raise
    finally:
        pool.shutdown(wait=True)
        if failure is not None:
            for power_type, future in futures.items():
                if power_type not in fleet.peers and future.exception() is None:
                    fleet.peers[power_type] = future.result()
            fleet.stop()
    if failure is not None:
        raise failure
    fleet.nodes = [n for nodes in by_type.values() for n in nodes]
    return fleet


def start(workdir: Path, racks: int = 3, mix: Mix | None = None, rack_offset: int = 1,
          password: str | None = None, initial: str = "mixed", *, latency: float = 0.0,
          jitter: float = 0.0) -> SimFleet:
    """Start a fleet of ``racks`` racks with ``mix`` nodes each. ``initial`` is the nodes'
    power state: ``on``, ``off``, or ``mixed`` (every third on). IPMI and Redfish replies
    wait ``latency`` ± ``jitter`` seconds."""
    from tests.peers import ipmi_bmc, libvirt_sim, redfish_sim

    mix = mix or Mix()
    password = password or secrets.token_urlsafe(12)
    workdir.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[SimNode]] = {"ipmi": [], "redfish": [], "virsh": []}
    for r in range(rack_offset, rack_offset + racks):
        rack = f"r{r}"
        if mix.ipmi:
            by_type["ipmi"] += ipmi_bmc.make_nodes(
                mix.ipmi, rack, first_address=f"127.20.{r}.1", user="admin", password=password)
        if mix.redfish:
            by_type["redfish"] += redfish_sim.make_nodes(
                mix.redfish, rack, first_address=f"127.40.{r}.1", user="admin", password=password)
        if mix.virsh:
            by_type["virsh"] += libvirt_sim.make_nodes(mix.virsh, rack, prefix="vm")
    _set_initial(by_type, initial)
    timing = {"latency": latency, "jitter": jitter}
    return _launch(workdir, by_type, {"ipmi": timing, "redfish": timing})


def _next_address(address: str) -> str:
    import ipaddress

    nxt = ipaddress.IPv4Address(address) + 1
    while nxt.packed[3] in (0, 255):
        nxt += 1
    return str(nxt)


def plan_layout(layout: Layout, *, password: str | None = None,
                initial: str = "mixed") -> dict[str, list[SimNode]]:
    """The nodes of a fleet at scale, per power type, without starting anything. Raises
    ``ValueError`` for a bad layout or addresses leaving 127.0.0.0/8."""
    from tests.peers import ipmi_bmc, libvirt_sim, redfish_sim

    layout.check()
    password = password or secrets.token_urlsafe(12)
    by_type: dict[str, list[SimNode]] = {"ipmi": [], "redfish": [], "virsh": []}
    rack_no = 0
    addresses = {"ipmi": layout.ipmi_base, "redfish": layout.redfish_base}
    for power_type in ("ipmi", "redfish", "virsh"):
        left = getattr(layout, power_type)
        while left > 0:
            size = min(layout.rack_size, left)
            left -= size
            rack_no += 1
            rack = f"r{rack_no}"
            if power_type == "ipmi":
                made = ipmi_bmc.make_nodes(size, rack, first_address=addresses["ipmi"],
                                           user="admin", password=password)
                addresses["ipmi"] = _next_address(str(made[-1].power_parameters["power_address"]))
            elif power_type == "redfish":
                made = redfish_sim.make_nodes(size, rack, first_address=addresses["redfish"],
                                              port=layout.redfish_port, user="admin", password=password)
                last = str(made[-1].power_parameters["power_address"]).split("//")[1].split(":")[0]
                addresses["redfish"] = _next_address(last)
            else:
                made = libvirt_sim.make_nodes(size, rack, prefix="vm")
            by_type[power_type] += made
    _set_initial(by_type, initial)
    return by_type


def start_layout(workdir: Path, layout: Layout, *, password: str | None = None,
                 initial: str = "mixed", latency: float = 0.0, jitter: float = 0.0,
                 ready_timeout: float = 180.0) -> SimFleet:
    """Start a fleet at scale (see :class:`Layout`). Raises ``ValueError`` for a bad layout
    (or addresses leaving 127.0.0.0/8) and ``RuntimeError`` when a peer does not start."""
    by_type = plan_layout(layout, password=password, initial=initial)
    workdir.mkdir(parents=True, exist_ok=True)
    ipmi_options: dict[str, Any] = {"latency": latency, "jitter": jitter, "max_sessions": 32,
                                    "shards": layout.shards_for_ipmi(), "ready_timeout": ready_timeout}
    redfish_options: dict[str, Any] = {"latency": latency, "jitter": jitter, "timeout": ready_timeout}
    if layout.redfish_shard_size:
        redfish_options["shard_size"] = layout.redfish_shard_size
    return _launch(workdir, by_type, {"ipmi": ipmi_options, "redfish": redfish_options})


# -- the runner ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.peers.fleet",
        description="Run a simulated fleet in the foreground until SIGINT / SIGTERM: write "
                    "DIR/inventory.yaml, DIR/secrets.yaml and DIR/fleet.json (the state file).")
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--racks", type=int, default=3, help="racks x mix layout: number of racks")
    parser.add_argument("--mix", default="ipmi=20,redfish=10,virsh=10",
                        help="racks x mix layout: nodes per rack of each type")
    parser.add_argument("--ipmi", type=int, default=None, help="fleet at scale: IPMI BMCs in all")
    parser.add_argument("--redfish", type=int, default=None, help="fleet at scale: Redfish systems in all")
    parser.add_argument("--virsh", type=int, default=None, help="fleet at scale: libvirt domains in all")
    parser.add_argument("--rack-size", type=int, default=500, help="fleet at scale: nodes per rack")
    parser.add_argument("--ipmi-base", default=Layout.ipmi_base, help="fleet at scale: first IPMI address")
    parser.add_argument("--redfish-base", default=Layout.redfish_base,
                        help="fleet at scale: first Redfish address")
    parser.add_argument("--ipmi-shards", type=int, default=None,
                        help=f"fleet at scale: IPMI shard processes (default: one per {IPMI_PER_SHARD} "
                             f"BMCs, at most {MAX_IPMI_SHARDS})")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every IPMI / Redfish reply")
    parser.add_argument("--jitter", type=float, default=0.0, help="± seconds around --latency")
    parser.add_argument("--initial", default="mixed", choices=["on", "off", "mixed"])
    parser.add_argument("--report", metavar="RACK", default=None,
                        help="Print what the peers of a running fleet in --dir counted for RACK, then exit")
    return parser


def _layout(args: argparse.Namespace) -> Layout | None:
    if args.ipmi is None and args.redfish is None and args.virsh is None:
        return None
    return Layout(ipmi=args.ipmi or 0, redfish=args.redfish or 0, virsh=args.virsh or 0,
                  rack_size=args.rack_size, ipmi_base=args.ipmi_base, redfish_base=args.redfish_base,
                  ipmi_shards=args.ipmi_shards)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.peers.fleet --dir D [--racks 3 --mix ipmi=20,redfish=10,virsh=10 |
    --ipmi N --redfish N --virsh N --rack-size 500] [--latency s --jitter s]``: start a
    fleet, write D/inventory.yaml, D/secrets.yaml and D/fleet.json, run until SIGINT or
    SIGTERM (then stop every peer and remove D/fleet.json)."""
    args = _parser().parse_args(argv)
    if args.report:
        return report(args.dir, args.report)
    if args.latency < 0 or args.jitter < 0:
        print("error: --latency and --jitter must not be negative", file=sys.stderr)
        return 2
    layout = _layout(args)
    workdir = args.dir.resolve()
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    # Signals that arrive while the peers start are acted on once they are up (and so
    # stopped cleanly), not by killing the runner half-way and leaving peers behind.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    began = time.monotonic()
    try:
        if layout is not None:
            layout.check()
            fleet = start_layout(workdir, layout, initial=args.initial, latency=args.latency,
                                 jitter=args.jitter)
        else:
            fleet = start(workdir, racks=args.racks, mix=Mix.parse(args.mix), initial=args.initial,
                          latency=args.latency, jitter=args.jitter)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = workdir / STATE_FILE
    try:
        fleet.write_inventory(workdir / INVENTORY_FILE, workdir / SECRETS_FILE)
        counts: dict[str, int] = {}
        racks: dict[str, int] = {}
        for n in fleet.nodes:
            counts[n.power_type] = counts.get(n.power_type, 0) + 1
            racks[n.rack] = racks.get(n.rack, 0) + 1
        controls = {t: _control_urls(p) for t, p in fleet.peers.items()}
        took = time.monotonic() - began
        # Written last, atomically: its presence means "up and every address answers".
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "pid": os.getpid(), "cmdline": _cmdline(os.getpid()), "pids": fleet.pids(), "started": time.time(),
            "startup_seconds": round(took, 2), "nodes": len(fleet.nodes), "types": counts,
            "rack_sizes": racks, "latency": args.latency, "jitter": args.jitter,
            "inventory": str(workdir / INVENTORY_FILE), "controls": controls,
            "racks": {n.name: n.rack for n in fleet.nodes}}))
        tmp.replace(state)
        print(f"simulated fleet up: {len(fleet.nodes)} nodes {counts} in {len(racks)} racks, "
              f"latency {args.latency * 1000:g} ms ± {args.jitter * 1000:g} ms, started in {took:.1f} s",
              flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        fleet.stop()
        state.unlink(missing_ok=True)
    print("simulated fleet stopped", flush=True)
    return 0


def _control_urls(peer: Any) -> list[str]:
    urls = getattr(peer, "control_urls", None)
    if urls is not None:
        return list(urls)
    if hasattr(peer, "control") and isinstance(peer.control, list):
        return [c.url for c in peer.control]
    return [peer.control_url]


def report(workdir: Path, rack: str) -> int:
    """Print the actions the peers of a running fleet counted for the nodes of ``rack``."""
    from tests.peers.common import PeerControl

    info = json.loads((workdir / STATE_FILE).read_text())
    seen: dict[str, dict[str, Any]] = {}
    for urls in info["controls"].values():
        for url in urls:
            seen.update(PeerControl(url).nodes())
    names = sorted(n for n, r in info["racks"].items() if r == rack)
    totals: dict[str, int] = {}
    exact = 0
    for name in names:
        counts = seen[name]["counts"]
        for key in ("on", "off", "soft_off", "cycle", "reset"):
            totals[key] = totals.get(key, 0) + int(counts.get(key, 0))
        exact += counts.get("on", 0) == 1 and counts.get("off", 0) == 1
    print(f"peers of rack {rack}: {len(names)} nodes; actions received: "
          + ", ".join(f"{k} {v}" for k, v in totals.items())
          + f"; {exact}/{len(names)} nodes got exactly one off and one on")
    return 0


# -- up / down: a runner in the background ------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and its command line holds ``marker`` (not a reused pid)."""
    cmd = _cmdline(pid)
    if not cmd or marker not in cmd:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def read_state(workdir: Path) -> dict[str, Any] | None:
    """The state file of the fleet in ``workdir``, None when there is none."""
    try:
        return dict(json.loads((workdir / STATE_FILE).read_text()))
    except (OSError, ValueError):
        return None


def _runner_marker(state: dict[str, Any]) -> str:
    """What the runner's command line holds: all of it as recorded (``powerq sim`` in the
    foreground or ``python -m tests.peers.fleet``), so a reused pid is not mistaken for it."""
    return str(state.get("cmdline") or "tests.peers.fleet")


def running(workdir: Path) -> dict[str, Any] | None:
    """The state of the fleet running in ``workdir`` (its runner alive), else None."""
    state = read_state(workdir)
    if state and _alive(int(state.get("pid", 0)), _runner_marker(state)):
        return state
    return None


def up(argv: list[str], workdir: Path, *, timeout: float = 300.0) -> int:
    """Start ``python -m tests.peers.fleet ARGV`` detached (its own session, output in
    ``DIR/sim.log``), wait until its state file says every peer is up, print a summary.
    Returns 0, 1 (it failed to start: the log's tail is printed) or 2 (already running)."""
    workdir = workdir.resolve()
    try:  # refuse a bad layout here, not in the runner's log
        args = _parser().parse_args([*argv, "--dir", str(workdir)])
        if args.latency < 0 or args.jitter < 0:
            raise ValueError("--latency and --jitter must not be negative")
        layout = _layout(args)
        if layout is not None:
            plan_layout(layout)
        else:
            Mix.parse(args.mix)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    state = running(workdir)
    if state:
        print(f"error: a simulated fleet already runs in {workdir} (pid {state['pid']}); "
              f"stop it first: powerq sim down --dir {workdir}", file=sys.stderr)
        return 2
    (workdir / STATE_FILE).unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
    log = workdir / LOG_FILE
    began = time.monotonic()
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.peers.fleet", *argv, "--dir", str(workdir)],
            cwd=_REPO, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = began + timeout
    while True:
        state = read_state(workdir)
        if state and state.get("pid") == proc.pid:
            break
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            if code is None:
                _stop_pid(proc.pid, "tests.peers.fleet", 20.0)
                proc.wait(5)
            tail = log.read_text(errors="replace")[-3000:]
            why = "did not start in time" if code is None else f"exited with {proc.returncode}"
            print(f"error: the simulated fleet {why}; {log}:\n{tail}", file=sys.stderr)
            return 1
        time.sleep(0.1)
    took = time.monotonic() - began
    types = ", ".join(f"{k} {v}" for k, v in state["types"].items())
    print(f"simulated fleet up in {workdir}: {state['nodes']} nodes ({types}) in "
          f"{len(state['rack_sizes'])} racks, latency {state['latency'] * 1000:g} ms "
          f"± {state['jitter'] * 1000:g} ms; started in {took:.1f} s (pid {proc.pid})")
    print(f"inventory: {workdir / INVENTORY_FILE} (secrets: {workdir / SECRETS_FILE})")
    print(f"stop it:   powerq sim down --dir {workdir}")
    return 0


def _stop_pid(pid: int, marker: str, timeout: float) -> bool:
    """SIGTERM ``pid`` (if it is still ours), then SIGKILL after ``timeout`` s. True if it
    was running."""
    if not _alive(pid, marker):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while _alive(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid, marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        end = time.monotonic() + 5
        while _alive(pid, marker) and time.monotonic() < end:
            time.sleep(0.05)
    return True


def down(workdir: Path, *, timeout: float = 30.0) -> int:
    """Stop the fleet running in ``workdir``: SIGTERM its runner (which stops every peer),
    then make sure none of its peer processes is left. Returns 0 (also when nothing ran)
    or 1 (a process would not stop)."""
    workdir = workdir.resolve()
    state = read_state(workdir)
    if state is None:
        print(f"no simulated fleet runs in {workdir} (no {STATE_FILE})")
        return 0
    runner = int(state.get("pid", 0))
    was_running = _stop_pid(runner, _runner_marker(state), timeout)
    leftovers = [pid for pid in state.get("pids", []) if _alive(int(pid), "tests.peers.")]
    for pid in leftovers:  # the runner died without stopping its peers
        _stop_pid(int(pid), "tests.peers.", 5.0)
    stuck = [pid for pid in state.get("pids", []) if _alive(int(pid), "tests.peers.")]
    if _alive(runner, _runner_marker(state)):
        stuck.insert(0, runner)
    if stuck:
        print(f"error: processes {stuck} of the simulated fleet would not stop", file=sys.stderr)
        return 1
    (workdir / STATE_FILE).unlink(missing_ok=True)
    what = "stopped" if was_running else "was not running (stale state removed)"
    extra = f"; {len(leftovers)} orphaned peer process(es) stopped" if leftovers else ""
    print(f"simulated fleet in {workdir} {what}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
