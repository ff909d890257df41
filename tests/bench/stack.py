"""The benchmark's fleet and powerq stack, and what is measured on them.

- :class:`BenchFleet` — ``tests/peers/ipmi_bmc.py``'s simulated BMCs, one loopback
  address each, split into racks, every reply delayed by the configured latency (the
  fleet-wide ``latency`` / ``jitter`` of the simulator when it has them, else the
  ``slow`` fault on every node), a third of the nodes off.
- :class:`PowerqStack` — a Redis of its own (never the shared 6379), ``powerq worker``
  processes with the racks split between them (each rack served by exactly one process,
  so a warm poll finds the sessions of the cold one), and the CLI.
- :class:`QueueCounter` — the messages pushed to the rack queues, counted exactly from
  Redis keyspace notifications on the broker's list keys.
- ``/proc`` readings: CPU seconds and peak memory (VmHWM) of a process and its children.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

from tests.conftest import ROOT, RedisServer, powerq_env
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode

CLK_TCK = os.sysconf("SC_CLK_TCK")
USER = "admin"
PASSWORD = "bench-ipmi-pass"  # a test fleet's; still kept out of argv, logs and results


# -- /proc ------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (from ``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{current}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(c) for c in children)
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of ``pids`` and their descendants (live ones, plus the
    children they have waited for), from ``/proc/<pid>/stat``."""
    total = 0
    for root in pids:
        for pid in process_tree(root):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17
            total += sum(int(v) for v in fields[11:15])
    return total / CLK_TCK


def peak_memory_mb(pid: int) -> float:
    """The largest VmHWM (peak resident set) of ``pid`` and its descendants, in MB."""
    peak = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the fleet ------------------------------------------------------------------------------
@dataclass
class BenchFleet:
    """A running simulated fleet with the benchmark's view of it."""

    fleet: ipmi_bmc.IpmiFleet
    nodes: list[SimNode]
    racks: dict[str, list[str]]
    latency: float
    jitter: float
    latency_how: str
    initial: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def addresses(self) -> dict[str, str]:
        """node name -> BMC address"""
        return {n.name: str(n.power_parameters["power_address"]) for n in self.nodes}

    def expected(self) -> dict[str, str]:
        """node name -> power state, as the simulated BMCs have it now."""
        return {name: str(node["power"]) for name, node in self.fleet.nodes().items()}

    def shard_pids(self) -> list[int]:
        return [shard.proc.pid for shard in self.fleet._shards]

    def cpu(self) -> float:
        """CPU seconds the simulator's shard processes have used so far."""
        return cpu_seconds(self.shard_pids())

    def restore(self) -> int:
        """Put every node back in its initial power state; returns how many changed."""
        now = self.expected()
        wrong = [n for n, want in self.initial.items() if now.get(n) != want]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: self.fleet.set_state(n, self.initial[n]), wrong))
        return len(wrong)

    def stop(self) -> None:
        self.fleet.stop()


def _after(address: str) -> str:
    nxt = ipaddress.IPv4Address(address) + 1
    while nxt.packed[3] in (0, 255):
        nxt += 1
    return str(nxt)


def rack_sizes(count: int, per_rack: int) -> list[int]:
    """Rack sizes for ``count`` nodes: at most ``per_rack`` each, at least two racks (so two
    worker processes have a rack each), as even as possible."""
    racks = max(2, -(-count // per_rack)) if count >= 2 else 1
    base, extra = divmod(count, racks)
    return [base + (1 if i < extra else 0) for i in range(racks)]


def start_bench_fleet(
    count: int, workdir: Path, *, first_address: str, per_rack: int = 500, latency: float = 0.05,
    jitter: float = 0.01, shard_size: int = 500, prefix: str = "bench",
) -> BenchFleet:
    """Start ``count`` simulated BMCs from ``first_address`` on, in racks ``r00``, ``r01``...
    Node ``i`` (over the whole fleet) is off when ``i % 3 == 0``, else on.

    Raises :class:`RuntimeError` (from the simulator) when a shard does not start.
    """
    nodes: list[SimNode] = []
    racks: dict[str, list[str]] = {}
    address = first_address
    for index, size in enumerate(rack_sizes(count, per_rack)):
        rack = f"r{index:02d}"
        made = ipmi_bmc.make_nodes(size, rack, first_address=address, user=USER, password=PASSWORD,
                                   prefix=prefix)
        racks[rack] = [n.name for n in made]
        nodes.extend(made)
        address = _after(str(made[-1].power_parameters["power_address"]))
    for i, node in enumerate(nodes):
        node.power = "off" if i % 3 == 0 else "on"
    params = inspect.signature(ipmi_bmc.start_fleet).parameters
    kwargs: dict[str, Any] = {"max_sessions": 32, "ready_timeout": 120.0}
    fleet_wide = "latency" in params
    if fleet_wide:
        kwargs["latency"] = latency
        if "jitter" in params:
            kwargs["jitter"] = jitter
    fleet = ipmi_bmc.start_fleet(nodes, workdir, shard_size=shard_size, **kwargs)
    try:
        if fleet_wide:
            how = f"by {latency * 1000:g} ms" + (f" ± {jitter * 1000:g} ms of jitter" if "jitter" in params
                                                  else " (the simulator has no jitter option)")
        else:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda n: fleet.fault(n.name, "slow", latency), nodes))
            how = f"by {latency * 1000:g} ms (the simulator's `slow` fault on every node; no jitter)"
            jitter = 0.0
        bench = BenchFleet(fleet, nodes, racks, latency, jitter, how)
        bench.initial = {n.name: n.power for n in nodes}
        return bench
    except BaseException:
        fleet.stop()
        raise


# -- counting broker messages ---------------------------------------------------------------
class QueueCounter:
    """Messages pushed onto the rack queues (``powerq.rack.*`` list keys, every priority
    variant kombu makes of them), seen through Redis keyspace notifications."""

    SENTINEL = "pqbench:sentinel"

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        client.config_set("notify-keyspace-events", "Kl")
        self.pushed = 0
        self._sentinels = 0
        self._cond = threading.Condition()
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(**{
            "__keyspace@*__:powerq.rack.*": self._on_queue,
            f"__keyspace@*__:{self.SENTINEL}": self._on_sentinel,
        })
        self.thread = self.pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _on_queue(self, message: dict[str, Any]) -> None:
        if message.get("data") in ("lpush", "rpush", b"lpush", b"rpush"):
            with self._cond:
                self.pushed += 1

    def _on_sentinel(self, message: dict[str, Any]) -> None:
        if message.get("data") in ("lpush", b"lpush"):
            with self._cond:
                self._sentinels += 1
                self._cond.notify_all()

    def count(self, timeout: float = 10.0) -> int:
        """Messages pushed so far, once every notification sent before this call has
        arrived (a sentinel push, delivered in order after them, is waited for)."""
        with self._cond:
            want = self._sentinels + 1
        self.client.lpush(self.SENTINEL, "x")
        self.client.delete(self.SENTINEL)
        with self._cond:
            if not self._cond.wait_for(lambda: self._sentinels >= want, timeout):
                raise RuntimeError("keyspace notifications did not arrive: cannot count messages")
            return self.pushed

    def stop(self) -> None:
        self.thread.stop()  # its loop closes the pubsub connection on the way out
        self.thread.join(5)


# -- powerq ----------------------------------------------------------------------------------
@dataclass
class JobRun:
    """One ``powerq ACTION @all --wait --json`` as seen from outside."""

    action: str
    seconds: float  # end to end: the CLI started -> the CLI printed every result
    submit_seconds: float | None  # CLI started -> job recorded (start, inventory, plan, inspect)
    job_seconds: float | None  # job recorded -> last chunk finished (every result stored)
    finished: bool
    returncode: int
    job: dict[str, Any]
    results: dict[str, dict[str, Any]]
    messages: int  # pushed onto rack queues during the run
    worker_cpu: float
    fleet_cpu: float
    cli_cpu: float
    stderr: str = ""

    @property
    def errors(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for result in self.results.values():
            if result.get("outcome") != "ok":
                out[str((result.get("error") or {}).get("code") or result.get("outcome"))] += 1
        return out


class PowerqStack:
    """A Redis of its own, ``powerq worker`` processes, and the CLI pointed at them."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        from cryptography.fernet import Fernet

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(workdir)
        self.prefix = "pqbench"
        self.secret_key = Fernet.generate_key().decode()
        self.extra_env = dict(env or {})
        self.env: dict[str, str] = {}
        self.workers: list[tuple[subprocess.Popen[bytes], str, Path]] = []
        self.counter: QueueCounter | None = None
        self._client: redis.Redis | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.redis.start()
        self.env = powerq_env(self.redis.url, self.prefix, self.secret_key, **self.extra_env)
        # An installed powerq has its bytecode; a checkout run with PYTHONDONTWRITEBYTECODE=1
        # (as on these machines) would compile its own modules at every CLI start: once here.
        subprocess.run([sys.executable, "-m", "compileall", "-q", "drivers", "workers", "scheduler"],
                       cwd=ROOT, env={k: v for k, v in self.env.items() if k != "PYTHONDONTWRITEBYTECODE"},
                       check=False, stdout=subprocess.DEVNULL)
        self.counter = QueueCounter(self.client)

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.redis.url, decode_responses=True)
        return self._client

    def stop(self) -> None:
        self.stop_workers()
        if self.counter is not None:
            self.counter.stop()
            self.counter = None
        if self._client is not None:
            self._client.close()
            self._client = None
        self.redis.stop()

    def start_workers(self, racks: Sequence[str], processes: int = 2,
                      concurrency: int | None = None, timeout: float = 90.0) -> None:
        """``processes`` workers, the racks dealt out between them (each rack to exactly
        one), and wait until every one answers ``powerq workers``.

        Raises :class:`RuntimeError` with the workers' logs when they do not come up.
        """
        processes = max(1, min(processes, len(racks)))
        for index in range(processes):
            mine = list(racks[index::processes])
            hostname = f"bench-w{index}@pqbench"
            log = self.workdir / f"worker-{index}.log"
            args = [a for r in mine for a in ("--rack", r)]
            if concurrency:
                args += ["--concurrency", str(concurrency)]
            with open(log, "ab") as logf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "scheduler.cli", "worker", *args, "--hostname", hostname,
                     "--loglevel", "WARNING"],
                    env=self.env, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                )
            self.workers.append((proc, hostname, log))
        deadline = time.monotonic() + timeout
        wanted = {h for _, h, _ in self.workers}
        while time.monotonic() < deadline:
            out = self.pq("workers", "--json", timeout=60)
            if out.returncode == 0:
                seen = {h for hosts in json.loads(out.stdout or "{}").values() for h in hosts}
                if wanted <= seen:
                    return
            if any(p.poll() is not None for p, _, _ in self.workers):
                break
            time.sleep(0.3)
        raise RuntimeError("benchmark workers did not come up:\n" + self.worker_log()[-3000:])

    def stop_workers(self) -> None:
        for proc, _, _ in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc, _, _ in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()

    def worker_pids(self) -> list[int]:
        return [p.pid for p, _, _ in self.workers]

    def worker_cpu(self) -> float:
        return cpu_seconds(self.worker_pids())

    def worker_peak_mb(self) -> list[float]:
        """VmHWM of each worker process (with its children), MB."""
        return [peak_memory_mb(pid) for pid in self.worker_pids()]

    def worker_log(self) -> str:
        return "".join(log.read_text(errors="replace") for _, _, log in self.workers if log.exists())

    # -- CLI ----------------------------------------------------------------------------
    def pq(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``powerq ARGS`` against this stack."""
        return subprocess.run(
            [sys.executable, "-m", "scheduler.cli", *args], env=self.env, cwd=ROOT,
            capture_output=True, text=True, timeout=timeout,
        )

    def load(self, entries: Iterable[dict[str, Any]]) -> None:
        """Replace the inventory with ``entries``.

        Raises :class:`RuntimeError` with the CLI's output when the load is refused.
        """
        path = self.workdir / "inventory.yaml"
        path.write_text(yaml.safe_dump({"nodes": list(entries)}))
        path.chmod(0o600)
        out = self.pq("inventory", "load", str(path), timeout=600)
        if out.returncode != 0:
            raise RuntimeError("inventory load failed: " + out.stdout[-2000:] + out.stderr[-2000:])

    def run_job(self, action: str, *args: str, wait_timeout: float,
                fleet_cpu: Callable[[], float] | None = None) -> JobRun:
        """``powerq ACTION @all --wait --json --yes ARGS`` timed from outside, with the
        messages pushed to the rack queues and the CPU the workers (and the fleet) used."""
        assert self.counter is not None, "start() first"
        msgs0 = self.counter.count()
        wcpu0 = self.worker_cpu()
        fcpu0 = fleet_cpu() if fleet_cpu else 0.0
        ccpu0 = children_cpu()
        t0 = time.time()
        try:
            out = self.pq(action, "@all", "--wait", "--json", "--yes", "--timeout", f"{wait_timeout:g}",
                          *args, timeout=wait_timeout + 120)
            stdout, stderr, code = out.stdout, out.stderr, out.returncode
        except subprocess.TimeoutExpired as exc:
            stdout, stderr, code = "", f"the CLI did not return within {exc.timeout:g} s", -1
        t1 = time.time()
        ccpu = children_cpu() - ccpu0
        wcpu = self.worker_cpu() - wcpu0
        fcpu = (fleet_cpu() - fcpu0) if fleet_cpu else 0.0
        msgs = self.counter.count() - msgs0
        try:
            body = json.loads(stdout)
        except ValueError:
            body = {}
        job = dict(body.get("job") or {})
        results = {str(r["node"]): r for r in body.get("results") or []}
        created, done_at = job.get("created"), job.get("finished")
        finished = bool(job) and job.get("status") in ("done", "failed") and done_at is not None
        return JobRun(
            action=action,
            seconds=t1 - t0,
            submit_seconds=(float(created) - t0) if created else None,
            job_seconds=(float(done_at) - float(created)) if finished and created and done_at else None,
            finished=finished,
            returncode=code,
            job=job,
            results=results,
            messages=msgs,
            worker_cpu=wcpu,
            fleet_cpu=fcpu,
            cli_cpu=ccpu,
            stderr=stderr[-2000:],
        )

    def states(self) -> dict[str, dict[str, Any]]:
        """node -> latest state record in the store."""
        from scheduler.store import Store

        return Store(self.client, self.prefix).states()


def poll_correct(run: JobRun, states: dict[str, dict[str, Any]], expected: dict[str, str]) -> int:
    """Nodes whose result is ok, and whose state in the store was written by this job
    (not an earlier one) and agrees with the simulated BMC."""
    created = float(run.job.get("created") or 0.0)
    correct = 0
    for name, want in expected.items():
        result = run.results.get(name) or {}
        state = states.get(name) or {}
        if (result.get("outcome") == "ok" and result.get("state_after") == want
                and state.get("state") == want and float(state.get("at") or 0.0) >= created):
            correct += 1
    return correct


def cycle_correct(run: JobRun, after: dict[str, str]) -> int:
    """Nodes the cycle reports ok and the simulated BMC has on afterwards."""
    return sum(1 for name, power in after.items()
               if power == "on" and (run.results.get(name) or {}).get("outcome") == "ok")
