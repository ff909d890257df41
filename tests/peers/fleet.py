"""A simulated fleet of mixed power types: IPMI BMCs, Redfish systems, libvirt domains.

Each rack gets IPMI BMCs (pyghmi's BMC server, each on its own 127.20.<rack>.x:623),
Redfish systems (sushy-tools' emulator, each on its own 127.40.<rack>.x:8000) and
libvirt domains (libvirt's test driver served by a libvirtd of the fleet's own).
``powerq sim up`` runs one; tests build smaller ones with :func:`start`.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.peers.common import SimNode


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

    def write_inventory(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump(self.inventory(), sort_keys=False))
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        for peer in self.peers.values():
            try:
                peer.stop()
            except Exception:  # stop everything we can
                pass


def start(workdir: Path, racks: int = 3, mix: Mix | None = None, rack_offset: int = 1,
          password: str | None = None, initial: str = "mixed") -> SimFleet:
    """Start a fleet of ``racks`` racks with ``mix`` nodes each. ``initial`` is the nodes'
    power state: ``on``, ``off``, or ``mixed`` (every third on)."""
    if initial not in ("on", "off", "mixed"):
        raise ValueError("initial must be on, off or mixed")
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
    for nodes in by_type.values():
        for i, node in enumerate(nodes):
            node.power = initial if initial != "mixed" else ("on" if i % 3 == 0 else "off")
    fleet = SimFleet(nodes=[], workdir=workdir)
    starters = {"ipmi": ipmi_bmc.start_fleet, "redfish": redfish_sim.start_fleet,
                "virsh": libvirt_sim.start_fleet}
    try:
        for power_type, nodes in by_type.items():
            if nodes:
                fleet.peers[power_type] = starters[power_type](nodes, workdir / power_type)
    except BaseException:
        fleet.stop()
        raise
    fleet.nodes = [n for nodes in by_type.values() for n in nodes]
    return fleet


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.peers.fleet --dir D --racks 3 --mix ipmi=20,redfish=10,virsh=10``:
    start a fleet, write D/inventory.yaml and D/fleet.json, run until SIGINT/SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--racks", type=int, default=3)
    parser.add_argument("--mix", default="ipmi=20,redfish=10,virsh=10")
    parser.add_argument("--initial", default="mixed", choices=["on", "off", "mixed"])
    parser.add_argument("--report", metavar="RACK", default=None,
                        help="Print what the peers of a running fleet in --dir counted for RACK, then exit")
    args = parser.parse_args(argv)
    if args.report:
        return report(args.dir, args.report)
    fleet = start(args.dir.resolve(), racks=args.racks, mix=Mix.parse(args.mix), initial=args.initial)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        fleet.write_inventory(args.dir / "inventory.yaml")
        counts: dict[str, int] = {}
        for n in fleet.nodes:
            counts[n.power_type] = counts.get(n.power_type, 0) + 1
        controls = {t: _control_urls(p) for t, p in fleet.peers.items()}
        (args.dir / "fleet.json").write_text(json.dumps(
            {"nodes": len(fleet.nodes), "types": counts, "controls": controls,
             "racks": {n.name: n.rack for n in fleet.nodes}}))
        print(f"simulated fleet up: {len(fleet.nodes)} nodes {counts}", flush=True)
        while not stop:
            time.sleep(0.5)
    finally:
        fleet.stop()
    return 0


def _control_urls(peer: Any) -> list[str]:
    if hasattr(peer, "control") and isinstance(peer.control, list):
        return [c.url for c in peer.control]
    return [peer.control_url]


def report(workdir: Path, rack: str) -> int:
    """Print the actions the peers of a running fleet counted for the nodes of ``rack``."""
    from tests.peers.common import PeerControl

    info = json.loads((workdir / "fleet.json").read_text())
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


if __name__ == "__main__":
    sys.exit(main())
