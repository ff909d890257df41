"""``make bench``: ``python -m tests.bench.run [--sizes 1000,5000] [--reps 3] [--out docs]``.

For each fleet size: start the simulated fleet, load it into a powerq stack of the
benchmark's own, and per repetition run the references (ipmipower at fan-out 1024 and
split into 5 processes, pyghmi with 200 threads, ipmitool one process per node 8 at a
time) and powerq (workers started fresh: cold poll, warm poll, batch cycle). Prints the
tables and writes ``OUT/benchmarks.md`` and ``OUT/benchmarks.png`` (``--json FILE`` keeps
the raw results). A smoke run: ``--sizes 200 --reps 1 --out /tmp/bench``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.bench import references as refs
from tests.bench import report
from tests.bench.stack import (
    CLK_TCK,
    PASSWORD,
    USER,
    BenchFleet,
    JobRun,
    PowerqStack,
    children_cpu,
    cycle_correct,
    poll_correct,
    start_bench_fleet,
)
from tests.conftest import ROOT

ALL_CLIENTS = ("ipmipower_f1024", "ipmipower_x5", "pyghmi", "ipmitool", "powerq")


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- machine and versions -----------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory, "kernel": platform.release(),
            "load_start": _load()}


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_clock() -> tuple[float, float, float]:
    """(wall time, CPU seconds every process on the machine used, CPU seconds this process
    and its waited-for children used), to tell the benchmark's own CPU from other work's."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / CLK_TCK
    me = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), busy, me.ru_utime + me.ru_stime + children_cpu()


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    # read-only git commands; --no-optional-locks: not even the index is refreshed
    commit = _first_line(["git", "-C", str(ROOT), "--no-optional-locks", "rev-parse", "--short", "HEAD"])
    try:
        dirty = subprocess.run(["git", "-C", str(ROOT), "--no-optional-locks", "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        dirty = ""
    out["powerq"] = f"git {commit}" + (" with uncommitted changes" if dirty.strip() else "")
    for package in ("celery", "kombu", "redis", "pyghmi", "cryptography", "matplotlib"):
        try:
            out[package if package != "redis" else "redis-py"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    out["redis-server"] = _first_line(["redis-server", "--version"])
    out["ipmipower (FreeIPMI)"] = _first_line([shutil.which("ipmipower") or "/usr/sbin/ipmipower", "--version"])
    out["ipmitool"] = _first_line(["ipmitool", "-V"])
    return out


# -- one size -----------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.clients = set(args.clients.split(","))
        self.runs: list[dict[str, Any]] = []
        self.commands: dict[str, str] = {}
        env = dict(kv.split("=", 1) for kv in args.env)
        self.stack = PowerqStack(workdir / "powerq", env)
        self.secrets = workdir / "secrets"
        self.secrets.mkdir(mode=0o700)
        self.ipmipower_conf = refs.ipmipower_config(self.secrets, USER, PASSWORD)
        self.password_file = refs.write_secret(self.secrets / "ipmitool-password", PASSWORD)

    def _clean(self, command: str) -> str:
        return (command.replace(str(self.secrets) + "/", "").replace(str(self.workdir) + "/", "")
                .replace(shutil.which("ipmipower") or "/usr/sbin/ipmipower", "ipmipower"))

    def record(self, size: int, rep: int, client: str, **fields: Any) -> dict[str, Any]:
        run = {"size": size, "rep": rep, "client": client, "error": None, **fields}
        self.runs.append(run)
        return run

    def guarded(self, size: int, rep: int, client: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # one client failing must not lose the others' numbers
            log(f"{client} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
            self.record(size, rep, client, seconds=None, correct=0, total=size, cpu=None,
                        fleet_cpu=None, errors={}, error=f"{type(exc).__name__}: {str(exc)[:300]}")

    # -- references ---------------------------------------------------------------------------
    def reference(self, size: int, rep: int, client: str, fleet: BenchFleet,
                  read: Callable[[list[str]], refs.RefRun], sample: int | None = None) -> None:
        expected = fleet.expected()
        by_address = {fleet.addresses[n]: s for n, s in expected.items()}
        addresses = [fleet.addresses[n] for n in fleet.names]
        if sample and sample < len(addresses):
            step = len(addresses) / sample
            addresses = [addresses[int(i * step)] for i in range(sample)]
        else:
            sample = None
        fleet_cpu0 = fleet.cpu()
        ran = read(addresses)
        fleet_cpu = fleet.cpu() - fleet_cpu0
        scale = size / len(addresses) if sample else 1.0
        correct = sum(1 for a, said in ran.states.items() if by_address.get(a) == said)
        errors: Counter[str] = Counter()
        for address, said in ran.states.items():
            if said not in ("on", "off"):
                errors[said[:40]] += 1
            elif said != by_address.get(address):
                errors["wrong state"] += 1
        self.commands[client] = self._clean(ran.command)
        self.record(size, rep, client, seconds=ran.seconds * scale, measured_seconds=ran.seconds,
                    sample=sample, correct=correct, total=len(addresses), cpu=ran.cpu * scale,
                    fleet_cpu=fleet_cpu * scale, errors=dict(errors),
                    error="the client did not report" if ran.extra.get("failed") else None)
        log(f"{size}: rep {rep + 1}: {client}: {ran.seconds:.2f} s"
            + (f" for {len(addresses)} (scaled: {ran.seconds * scale:.1f} s)" if sample else "")
            + f", {correct}/{len(addresses)} correct" + (f", {dict(errors)}" if errors else ""))

    def references(self, size: int, rep: int, fleet: BenchFleet) -> None:
        a = self.args
        work = self.workdir / "refs"
        work.mkdir(exist_ok=True)
        timeout = 120 + size * 0.2
        if "ipmipower_f1024" in self.clients:
            self.guarded(size, rep, "ipmipower_f1024", lambda: self.reference(
                size, rep, "ipmipower_f1024", fleet,
                lambda hosts: refs.ipmipower_stat(hosts, self.ipmipower_conf, work, fanout=1024,
                                                  timeout=timeout)))
        if "ipmipower_x5" in self.clients:
            self.guarded(size, rep, "ipmipower_x5", lambda: self.reference(
                size, rep, "ipmipower_x5", fleet,
                lambda hosts: refs.ipmipower_stat(hosts, self.ipmipower_conf, work, fanout=1024,
                                                  processes=5, timeout=timeout)))
        if "pyghmi" in self.clients:
            self.guarded(size, rep, "pyghmi", lambda: self.reference(
                size, rep, "pyghmi", fleet,
                lambda hosts: refs.pyghmi_threads(hosts, USER, PASSWORD, self.secrets,
                                                  threads=a.pyghmi_threads, timeout=300 + size * 0.2)))
        if "ipmitool" in self.clients:
            self.guarded(size, rep, "ipmitool", lambda: self.reference(
                size, rep, "ipmitool", fleet,
                lambda hosts: refs.ipmitool_each(hosts, USER, self.password_file, parallel=8),
                sample=a.ipmitool_sample))

    # -- powerq -------------------------------------------------------------------------------
    def _powerq_record(self, size: int, rep: int, client: str, run: JobRun, correct: int,
                       **extra: Any) -> None:
        error = None
        if not run.finished:
            error = f"the job did not finish (CLI exit {run.returncode}): {run.stderr[-300:]}"
        self.record(size, rep, client, seconds=run.seconds if run.finished else None,
                    job_seconds=run.job_seconds, submit_seconds=run.submit_seconds, correct=correct,
                    total=size, cpu=run.worker_cpu, fleet_cpu=run.fleet_cpu, cli_cpu=run.cli_cpu,
                    messages=run.messages, chunks=int(run.job.get("chunks") or 0),
                    errors=dict(run.errors), error=error, **extra)
        log(f"{size}: rep {rep + 1}: {client}: {run.seconds:.2f} s end to end, job "
            f"{run.job_seconds if run.job_seconds is None else round(run.job_seconds, 2)} s, "
            f"{correct}/{size} correct, {run.messages} messages for {run.job.get('chunks')} chunks, "
            f"worker CPU {run.worker_cpu:.2f} s" + (f", errors {dict(run.errors)}" if run.errors else "")
            + (f"; {error}" if error else ""))

    def powerq(self, size: int, rep: int, fleet: BenchFleet) -> None:
        a = self.args
        poll_timeout = a.job_timeout or 120 + size * 0.1
        cycle_timeout = a.job_timeout or 300 + size * 0.3
        # The CLI's own share: start, inventory, plan, and nothing sent (no worker involved).
        t0 = time.monotonic()
        dry = self.stack.pq("query", "@all", "--dry-run", "--json", timeout=300)
        dry_seconds = time.monotonic() - t0 if dry.returncode == 0 else None
        self.stack.start_workers(list(fleet.racks), processes=a.workers, concurrency=a.worker_concurrency)
        try:
            for client in ("pq_cold", "pq_warm"):
                expected = fleet.expected()
                run = self.stack.run_job("query", wait_timeout=poll_timeout, fleet_cpu=fleet.cpu)
                self._powerq_record(size, rep, client, run, poll_correct(run, self.stack.states(), expected),
                                    dry_run_seconds=dry_seconds)
            run = self.stack.run_job("cycle", "--force", wait_timeout=cycle_timeout, fleet_cpu=fleet.cpu)
            peak = self.stack.worker_peak_mb()
            self._powerq_record(size, rep, "pq_cycle", run, cycle_correct(run, fleet.expected()), peak_mb=peak)
        finally:
            self.stack.stop_workers()
        self.commands["pq_cold"] = f"powerq query @all --wait --json --yes --timeout {poll_timeout:g}"
        self.commands["pq_warm"] = "the same, right after"
        self.commands["pq_cycle"] = f"powerq cycle @all --wait --json --yes --timeout {cycle_timeout:g} --force"
        racks = list(fleet.racks)
        workers = max(1, min(a.workers, len(racks)))
        self.commands["workers"] = " & ".join(
            "powerq worker " + " ".join(f"--rack {r}" for r in racks[i::workers])
            + (f" --concurrency {a.worker_concurrency}" if a.worker_concurrency else "")
            + f" --hostname bench-w{i}@pqbench" for i in range(workers)) + " &"

    # -- everything ---------------------------------------------------------------------------
    def size(self, size: int) -> None:
        a = self.args
        log(f"{size}: starting {size} simulated BMCs from {a.first_address}")
        t0 = time.monotonic()
        fleet = start_bench_fleet(size, self.workdir / f"fleet-{size}", first_address=a.first_address,
                                  per_rack=a.per_rack, latency=a.latency, jitter=a.jitter,
                                  shard_size=a.shard_size)
        self.latency_how = fleet.latency_how
        try:
            log(f"{size}: fleet up in {time.monotonic() - t0:.1f} s ({len(fleet.racks)} racks); "
                "loading the inventory")
            if "powerq" in self.clients:
                self.stack.load(n.inventory_entry() for n in fleet.nodes)
            for rep in range(a.reps):
                changed = fleet.restore()
                if changed:
                    log(f"{size}: rep {rep + 1}: {changed} node(s) put back in their first state")
                fleet.fleet.reset()
                self.references(size, rep, fleet)
                if "powerq" in self.clients:
                    self.guarded(size, rep, "pq_cold", lambda: self.powerq(size, rep, fleet))  # noqa: B023
        finally:
            fleet.stop()

    def run(self) -> dict[str, Any]:
        a = self.args
        started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        info = machine()
        clock0 = cpu_clock()
        self.latency_how = ""
        self.stack.start()
        try:
            for size in a.sizes:
                self.size(size)
        finally:
            self.stack.stop()
        info["load_end"] = _load()
        clock1 = cpu_clock()
        other = (clock1[1] - clock0[1]) - (clock1[2] - clock0[2])
        info["other_cpu_share"] = max(0.0, other / ((clock1[0] - clock0[0]) * (os.cpu_count() or 1)))
        from scheduler.config import Config

        config = Config.from_env(self.stack.env)
        env = {"POWERQ_REDIS_URL": "redis://127.0.0.1:<a port of its own>/0",
               "POWERQ_KEY_PREFIX": self.stack.prefix, "POWERQ_SECRET_KEY": "<generated>",
               **dict(kv.split("=", 1) for kv in a.env)}
        return {
            "started": started,
            "argv": "python -m tests.bench.run " + shlex.join(sys.argv[1:]),
            "sizes": list(a.sizes),
            "reps": a.reps,
            "settings": {
                "latency": a.latency, "jitter": a.jitter, "latency_how": self.latency_how,
                "per_rack": a.per_rack, "shard_size": a.shard_size, "workers": a.workers,
                "ipmitool_sample": a.ipmitool_sample, "pyghmi_threads": a.pyghmi_threads,
                "inspect_timeout": config.inspect_timeout, "chunk_size": config.chunk_size,
                "env": ", ".join(f"`{k}={v}`" for k, v in env.items()) + " (everything else: defaults)",
            },
            "machine": info,
            "versions": versions(),
            "commands": self.commands,
            "runs": self.runs,
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000",
                        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                        help="fleet sizes, comma-separated (default 1000,5000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per size (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs",
                        help="folder for benchmarks.md and benchmarks.png (default docs/)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--clients", default=",".join(ALL_CLIENTS),
                        help=f"which clients to run (default all: {','.join(ALL_CLIENTS)})")
    parser.add_argument("--first-address", default="127.50.0.1",
                        help="loopback address of the first simulated BMC (default 127.50.0.1)")
    parser.add_argument("--per-rack", type=int, default=500, help="most nodes per rack (default 500)")
    parser.add_argument("--shard-size", type=int, default=500,
                        help="simulated BMCs per simulator process (default 500)")
    parser.add_argument("--latency", type=float, default=0.05, help="BMC reply latency, s (default 0.05)")
    parser.add_argument("--jitter", type=float, default=0.01,
                        help="reply latency jitter, s, when the simulator has the option (default 0.01)")
    parser.add_argument("--workers", type=int, default=2, help="powerq worker processes (default 2)")
    parser.add_argument("--worker-concurrency", type=int, default=None,
                        help="--concurrency of each worker (default: the worker's own)")
    parser.add_argument("--ipmitool-sample", type=int, default=400,
                        help="ipmitool reads at most this many nodes, time scaled up (default 400)")
    parser.add_argument("--pyghmi-threads", type=int, default=200, help="pyghmi threads (default 200)")
    parser.add_argument("--job-timeout", type=float, default=None,
                        help="seconds the CLI waits for a powerq job (default: from the size)")
    parser.add_argument("--env", action="append", default=[], metavar="POWERQ_X=VALUE",
                        help="extra environment of the powerq stack (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="run nothing: render the tables, markdown and plot of a --json file again")
    args = parser.parse_args(argv)
    unknown = set(args.clients.split(",")) - set(ALL_CLIENTS)
    if unknown:
        parser.error(f"unknown client(s) {sorted(unknown)}; known: {', '.join(ALL_CLIENTS)}")
    if not args.sizes or min(args.sizes) < 2 or args.reps < 1:
        parser.error("--sizes must be at least 2 nodes each and --reps at least 1")
    bad = [kv for kv in args.env if not kv.startswith("POWERQ_") or "=" not in kv]
    if bad:
        parser.error(f"--env takes POWERQ_NAME=VALUE, not {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
    else:
        workdir = Path(tempfile.mkdtemp(prefix="pqbench-"))
        log(f"work folder {workdir}; sizes {args.sizes}, {args.reps} repetition(s)")
        try:
            results = Bench(args, workdir).run()
        finally:
            if args.keep:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.json is not None and args.render is None:
        args.json.write_text(json.dumps(results, indent=1))
    png = report.write_plot(results, args.out / "benchmarks.png")
    md = args.out / "benchmarks.md"
    md.write_text(report.render_markdown(results, png.name))
    print(report.text_tables(results))
    print(f"\nwrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
