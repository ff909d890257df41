"""The reference clients, run on the benchmark's fleet: FreeIPMI ``ipmipower``, pyghmi
with threads, ``ipmitool`` one process per node.

Each returns a :class:`RefRun`: the wall time, what the client said about every BMC it
read (address -> ``on`` / ``off`` / an error text), the CPU it used and the command.
Passwords go in files of mode 0600 (``ipmipower --config-file``, ``ipmitool -f``, a spec
file for the pyghmi process), never in argv.

Run as ``python -m tests.bench.references pyghmi --spec FILE``: the pyghmi client in a
process of its own (its CPU and threads apart from the harness); prints one JSON line.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from tests.bench.stack import children_cpu
from tests.conftest import ROOT


@dataclass
class RefRun:
    """One run of a reference client."""

    seconds: float  # wall time of the read (for a sample: of the sample)
    states: dict[str, str]  # BMC address -> "on" / "off" / what the client said instead
    cpu: float  # CPU seconds the client used
    command: str  # the command, as run (passwords in files)
    sample: int | None = None  # nodes actually read, when fewer than the fleet
    extra: dict[str, Any] = field(default_factory=dict)


def need(tool: str) -> str:
    """The path of ``tool``; raises :class:`RuntimeError` when it is not installed."""
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        raise RuntimeError(f"{tool} is not installed (deploy/bootstrap.sh installs it)")
    return path


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return path


# -- FreeIPMI hostlists -----------------------------------------------------------------------
def _ranges(numbers: Sequence[int]) -> str:
    parts = []
    for _, run in groupby(enumerate(numbers), key=lambda p: p[1] - p[0]):
        values = [v for _, v in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(parts)


def hostlist(addresses: Sequence[str]) -> str:
    """IPv4 addresses as a FreeIPMI hostlist, e.g. ``127.50.[0-18].[1-254],127.50.19.[1-174]``
    (the addresses of one /24 in ascending order, /24s with the same last octets merged)."""
    by_net: dict[tuple[int, int, int], list[int]] = {}
    for address in addresses:
        a, b, c, d = ipaddress.IPv4Address(address).packed
        by_net.setdefault((a, b, c), []).append(d)
    rows = [(a, b, c, _ranges(sorted(ds))) for (a, b, c), ds in by_net.items()]
    parts: list[str] = []
    i = 0
    while i < len(rows):
        a, b, c, last = rows[i]
        j = i
        while j + 1 < len(rows) and rows[j + 1][:2] == (a, b) and rows[j + 1][2] == rows[j][2] + 1 \
                and rows[j + 1][3] == last:
            j += 1
        third = str(c) if j == i else f"[{c}-{rows[j][2]}]"
        fourth = last if re.fullmatch(r"\d+", last) else f"[{last}]"
        parts.append(f"{a}.{b}.{third}.{fourth}")
        i = j + 1
    return ",".join(parts)


# -- ipmipower -----------------------------------------------------------------------------------
def ipmipower_config(workdir: Path, user: str, password: str) -> Path:
    """A FreeIPMI configuration file holding the credentials (mode 0600)."""
    return write_secret(workdir / "freeipmi.conf", f"username {user}\npassword {password}\n")


def ipmipower_stat(addresses: Sequence[str], config: Path, workdir: Path, *, fanout: int = 1024,
                   processes: int = 1, timeout: float = 600.0) -> RefRun:
    """``ipmipower --stat`` over ``addresses``, split into ``processes`` processes running
    side by side, each at fan-out ``fanout``. Hosts missing from the output count as
    ``missing``."""
    binary = need("ipmipower")
    size = -(-len(addresses) // processes)
    parts = [list(addresses[i:i + size]) for i in range(0, len(addresses), size)]
    commands = [[binary, "-D", "LAN_2_0", "-I", "3", "-l", "operator", "--config-file", str(config),
                 "-F", str(fanout), "--stat", "-h", hostlist(part)] for part in parts]
    outputs = [workdir / f"ipmipower-{i}.out" for i in range(len(parts))]
    cpu0 = children_cpu()
    t0 = time.monotonic()
    procs = []
    for cmd, path in zip(commands, outputs, strict=True):
        with open(path, "w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
    deadline = t0 + timeout
    timed_out = False
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - t0
    cpu = children_cpu() - cpu0
    states = {a: "missing" for a in addresses}
    for path in outputs:
        for line in path.read_text(errors="replace").splitlines():
            host, sep, said = line.partition(": ")
            if sep and host in states:
                states[host] = said.strip()
    shown = [" ".join(c[:-1]) + f" '{c[-1]}'" for c in commands]
    command = shown[0] if len(shown) == 1 else " & ".join(shown) + " & wait"
    return RefRun(seconds, states, cpu, command, extra={"timed_out": timed_out})


# -- pyghmi ----------------------------------------------------------------------------------------
def pyghmi_threads(addresses: Sequence[str], user: str, password: str, workdir: Path, *,
                   threads: int = 200, timeout: float = 900.0) -> RefRun:
    """pyghmi, one new session per BMC (``Command(...)`` then ``get_power()``), ``threads``
    at a time, in a process of its own. ``seconds`` is timed inside that process, from the
    first login to the last answer (interpreter start and imports left out)."""
    spec = write_secret(workdir / "pyghmi-spec.json", json.dumps(
        {"hosts": list(addresses), "user": user, "password": password, "threads": threads,
         "deadline": max(30.0, min(timeout - 30.0, 60.0 + 0.02 * len(addresses)))}))
    cmd = [sys.executable, "-m", "tests.bench.references", "pyghmi", "--spec", str(spec)]
    cpu0 = children_cpu()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        body = json.loads(lines[-1]) if lines else {}
    except subprocess.TimeoutExpired:
        body = {}
    if not body:
        return RefRun(float("nan"), {a: "missing" for a in addresses}, children_cpu() - cpu0,
                      " ".join(cmd[1:]), extra={"failed": True})
    return RefRun(float(body["seconds"]), dict(body["states"]), float(body["cpu"]),
                  f"python -m tests.bench.references pyghmi --spec SPEC  # {threads} threads, "
                  "pyghmi.ipmi.command.Command(bmc, userid, password).get_power() per node")


def _pyghmi_main(spec_path: Path) -> int:
    from pyghmi.ipmi import command

    spec = json.loads(spec_path.read_text())
    user, password = spec["user"].encode(), spec["password"].encode()  # bytes: see PEERS.md
    opened: list[Any] = []

    def read(host: str) -> tuple[str, str]:
        try:
            cmd = command.Command(bmc=host, userid=user, password=password, port=623, keepalive=False)
            opened.append(cmd)
            return host, str(cmd.get_power().get("powerstate"))
        except Exception as exc:  # the report says how a BMC failed, never why in detail
            return host, f"error: {type(exc).__name__}"

    cpu0 = time.process_time()
    t0 = time.monotonic()
    # pyghmi can keep logging in forever to a BMC whose handshake reply it missed (see
    # PEERS.md): the reads get a deadline; a read not finished by then is "timeout".
    pool = ThreadPoolExecutor(int(spec["threads"]))
    futures = {pool.submit(read, host): host for host in spec["hosts"]}
    done, _ = wait(futures, timeout=float(spec.get("deadline", 120.0)))
    states = {futures[f]: "timeout" for f in futures}
    states.update(dict(f.result() for f in done))
    seconds = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    print(json.dumps({"seconds": seconds, "cpu": cpu, "states": states}), flush=True)
    if len(done) < len(futures):
        os._exit(0)  # stuck pyghmi threads never end; the sessions expire at the peers

    def logout(cmd: Any) -> None:  # untimed: leave the simulated BMCs' session tables clean
        try:
            cmd.ipmi_session.logout()
        except Exception:
            pass

    with ThreadPoolExecutor(int(spec["threads"])) as pool:
        list(pool.map(logout, opened))
    sys.stdout.flush()
    os._exit(0)  # pyghmi's IO thread would keep the interpreter alive


# -- ipmitool --------------------------------------------------------------------------------------
def ipmitool_each(addresses: Sequence[str], user: str, password_file: Path, *, parallel: int = 8,
                  timeout_each: float = 60.0) -> RefRun:
    """``ipmitool -I lanplus ... chassis power status``, one process per BMC, ``parallel``
    at a time (Ironic's pattern)."""
    binary = need("ipmitool")

    def cmd(address: str) -> list[str]:
        return [binary, "-I", "lanplus", "-C", "3", "-L", "OPERATOR", "-H", address, "-p", "623",
                "-U", user, "-f", str(password_file), "chassis", "power", "status"]

    def one(address: str) -> tuple[str, str]:
        try:
            out = subprocess.run(cmd(address), capture_output=True, text=True, timeout=timeout_each)
        except subprocess.TimeoutExpired:
            return address, "timeout"
        said = re.search(r"Chassis Power is (\w+)", out.stdout)
        if said:
            return address, said.group(1)
        return address, f"exit {out.returncode}"

    cpu0 = children_cpu()
    t0 = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        states = dict(pool.map(one, addresses))
    seconds = time.monotonic() - t0
    shown = " ".join(cmd("ADDRESS")).replace(binary, "ipmitool")
    return RefRun(seconds, states, children_cpu() - cpu0,
                  f"{shown}  # one process per node, {parallel} at a time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A reference client in a process of its own.")
    parser.add_argument("client", choices=["pyghmi"])
    parser.add_argument("--spec", required=True, type=Path,
                        help='JSON {"hosts": [...], "user": ..., "password": ..., "threads": N} (mode 0600)')
    args = parser.parse_args(argv)
    return _pyghmi_main(args.spec)


if __name__ == "__main__":
    sys.exit(main())
