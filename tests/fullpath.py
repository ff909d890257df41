"""The full path for any power type: CLI -> planner -> Redis -> rack worker -> driver -> peer.

One :class:`FullPath` per test session (fixture ``fullpath`` in ``conftest.py``): a Redis
server of its own and one real ``powerq worker`` process per rack. A test module starts its
peer in the test process, calls :meth:`FullPath.load` with the peer's inventory entries
(which replaces the whole inventory), then drives the CLI and checks the peer.

:func:`exercise` runs the checks every power type owes: on / off / cycle / query (and
next boot when declared) through the CLI, with the peer's end state and its call counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT, RedisServer, powerq_env

RACKS = ("fp",)
"""Racks the session's workers serve; entries without a rack go to the first one."""


class FullPath:
    """A Redis of its own, a worker per rack, and the CLI pointed at them."""

    def __init__(
        self, workdir: Path, racks: Iterable[str] = RACKS, broker_url: str | None = None,
        redis_args: list[str] | None = None, **env: str
    ) -> None:
        """``broker_url`` (POWERQ_BROKER_URL) puts the chunks on another broker, e.g. a
        RabbitMQ; by default the broker is this stack's Redis. ``redis_args`` go to its
        redis-server (see :class:`tests.conftest.RedisServer`)."""
        from cryptography.fernet import Fernet

        self.workdir = workdir
        self.racks = tuple(racks)
        self.redis = RedisServer(workdir, redis_args=redis_args)
        self.prefix = "pqfp"
        self.secret_key = Fernet.generate_key().decode()
        self.extra_env = {
            "POWERQ_CALL_TIMEOUT": "3", "POWERQ_MAX_ATTEMPTS": "2", "POWERQ_BACKOFF_BASE": "0.1",
            "POWERQ_CONFIRM_INTERVAL": "0.2", "POWERQ_CONFIRM_TIMEOUT": "20",
            "POWERQ_CONFIRM_THRESHOLD": "1000", "POWERQ_INSPECT_TIMEOUT": "0.5", **env,
        }
        if broker_url is not None:
            self.extra_env["POWERQ_BROKER_URL"] = broker_url
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env: dict[str, str] = {}

    def start(self) -> None:
        self.redis.start()
        self.env = powerq_env(self.redis.url, self.prefix, self.secret_key, **self.extra_env)
        for rack in self.racks:
            log = open(self.workdir / f"worker-{rack}.log", "wb")  # noqa: SIM115 - kept for the process
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "scheduler.cli", "worker", "--rack", rack, "--loglevel", "INFO"],
                env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            ))
        deadline = time.monotonic() + 60
        wanted = {f"powerq.rack.{r}" for r in self.racks}
        while time.monotonic() < deadline:
            out = self.pq("workers", "--json")
            if out.returncode == 0 and wanted <= set(json.loads(out.stdout or "{}")):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        raise RuntimeError("full-path workers did not come up:\n" + self.worker_log()[-3000:])

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        self.redis.stop()

    def worker_log(self) -> str:
        return "".join((self.workdir / f"worker-{r}.log").read_text(errors="replace") for r in self.racks)

    def pq(self, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``powerq ARGS`` against this stack."""
        return subprocess.run(
            [sys.executable, "-m", "scheduler.cli", *args], env=self.env, cwd=ROOT,
            capture_output=True, text=True, input=input, timeout=timeout,
        )

    def pq_json(self, *args: str) -> Any:
        out = self.pq(*args, "--json")
        assert out.stdout, out.stderr
        return json.loads(out.stdout)

    def load(self, entries: Iterable[dict[str, Any]], **extra: Any) -> None:
        """Replace the inventory with ``entries`` (inventory node dicts; ``rack`` defaults
        to the first rack). ``extra`` adds top-level inventory keys (``budgets``...)."""
        nodes = [{"rack": self.racks[0], **e} for e in entries]
        path = self.workdir / "inventory.yaml"
        path.write_text(yaml.safe_dump({"nodes": nodes, **extra}))
        out = self.pq("inventory", "load", str(path))
        assert out.returncode == 0, out.stdout + out.stderr

    def run(self, action: str, nodeset: str, *args: str) -> dict[str, Any]:
        """``powerq ACTION NODESET --wait --json ARGS``; the job with its results by node."""
        out = self.pq(action, nodeset, "--wait", "--json", "--yes", *args)
        assert out.stdout, out.stderr + self.worker_log()[-2000:]
        job = json.loads(out.stdout)
        job["by_node"] = {r["node"]: r for r in job.get("results", [])}
        job["returncode"] = out.returncode
        return job


ACTIONS = ("on", "off", "soft_off", "cycle", "reset")


def _counts(nodes: dict[str, dict[str, Any]], name: str) -> dict[str, int]:
    return {k: int(v) for k, v in nodes[name].get("counts", {}).items()}


def exercise(
    fp: FullPath,
    peer_nodes: Callable[[], dict[str, dict[str, Any]]],
    set_state: Callable[[str, str], None],
    reset_counts: Callable[[], None],
    names: list[str],
    *,
    boot: bool = False,
    cycle_counts: Callable[[dict[str, int]], bool] | None = None,
) -> None:
    """Drive ``names`` (already loaded with :meth:`FullPath.load`) through on, query, off,
    cycle and, when ``boot``, next boot to PXE, checking the peer's state and counts after
    each. ``cycle_counts`` decides whether one node's counts after a cycle are right
    (default: exactly one ``off`` and one ``on``, or exactly one ``cycle``/``reset``)."""
    nodeset = ",".join(names)
    for name in names:
        set_state(name, "off")
    reset_counts()

    job = fp.run("on", nodeset)
    peers = peer_nodes()
    for name in names:
        assert job["by_node"][name]["outcome"] == "ok", job["by_node"][name]
        assert peers[name]["power"] == "on", (name, peers[name])
        counts = _counts(peers, name)
        assert counts.get("on") == 1, (name, counts)
        assert not any(counts.get(a) for a in ACTIONS if a != "on"), (name, counts)

    reset_counts()
    job = fp.run("on", nodeset)  # already on: nothing sent
    peers = peer_nodes()
    for name in names:
        assert job["by_node"][name]["note"] == "already on", job["by_node"][name]
        assert not any(_counts(peers, name).get(a) for a in ACTIONS), (name, peers[name])

    set_state(names[0], "off")
    reset_counts()
    job = fp.run("query", nodeset)
    peers = peer_nodes()
    for name in names:
        want = "off" if name == names[0] else "on"
        assert job["by_node"][name]["state_after"] == want, (name, job["by_node"][name])
        counts = _counts(peers, name)
        assert not any(counts.get(a) for a in ACTIONS), (name, counts)  # a query acts on nothing
        if "query" in counts:  # peers that count reads: the read reached the device
            assert counts["query"] >= 1, (name, counts)
    status = fp.pq_json("status", nodeset)
    assert {n["node"]: n["state"] for n in status["nodes"]}[names[0]] == "off"
    set_state(names[0], "on")

    reset_counts()
    job = fp.run("off", nodeset)
    peers = peer_nodes()
    for name in names:
        assert job["by_node"][name]["outcome"] == "ok", job["by_node"][name]
        assert peers[name]["power"] == "off", (name, peers[name])
        counts = _counts(peers, name)
        assert counts.get("off", 0) + counts.get("soft_off", 0) == 1, (name, counts)

    for name in names:
        set_state(name, "on")
    reset_counts()
    job = fp.run("cycle", nodeset)
    peers = peer_nodes()
    for name in names:
        assert job["by_node"][name]["outcome"] == "ok", job["by_node"][name]
        assert peers[name]["power"] == "on", (name, peers[name])
        counts = _counts(peers, name)
        if cycle_counts is not None:
            assert cycle_counts(counts), (name, counts)
        else:
            one_each = counts.get("off") == 1 and counts.get("on") == 1
            native = counts.get("cycle", 0) + counts.get("reset", 0) == 1 and not counts.get("off")
            assert one_each or native, (name, counts)

    if boot:
        reset_counts()
        job = fp.run("boot", nodeset, "--device", "pxe")
        peers = peer_nodes()
        for name in names:
            assert job["by_node"][name]["outcome"] == "ok", job["by_node"][name]
            assert str(peers[name].get("boot") or "").lower().startswith(("pxe", "network")), peers[name]
            counts = _counts(peers, name)
            assert not any(counts.get(a) for a in ACTIONS), (name, counts)  # boot powers nothing
            # Sent once at most: some devices have no boot command of their own (an HMC
            # LPAR network-boots on every power-on this driver sends), so none is fine.
            assert counts.get("boot", 0) <= 1, (name, counts)


def error_code(fp: FullPath, name: str, action: str = "query") -> str:
    """The error code the full path reports for one node."""
    job = fp.run(action, name)
    result = job["by_node"][name]
    assert result["outcome"] == "error", result
    return str(result["error"]["code"])


def check_probe(fp: FullPath, workdir: Path, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``powerq probe`` through the CLI for the chassis behind ``entries`` (all of one power
    type and one chassis): every entry's machine is found, the entries written load as
    they are, and a query through the workers reaches every probed machine. Returns the
    probe's JSON report."""
    from drivers import registry

    power_type = entries[0]["power_type"]
    node_fields = registry.get(power_type).settings_model.node_fields()
    chassis = {k: v for k, v in entries[0]["power_parameters"].items() if k not in node_fields}
    out = workdir / f"probed-{power_type}.yaml"
    args = [a for k, v in chassis.items() for a in ("-p", f"{k}={v}")]
    run = fp.pq("probe", power_type, *args, "--rack", fp.racks[0], "--prefix", "probed-",
                "--out", str(out), "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    found = [m["power_parameters"] for m in report["machines"]]
    for entry in entries:
        own = {k: v for k, v in entry["power_parameters"].items() if k in node_fields}
        assert any(all(str(p.get(k)) == str(v) for k, v in own.items()) for p in found), (own, found)
    for secret in registry.get(power_type).settings_model.secret_fields():
        value = chassis.get(secret)
        if value:
            assert str(value) not in out.read_text() and str(value) not in run.stdout
    load = fp.pq("inventory", "load", str(out))
    assert load.returncode == 0, load.stdout + load.stderr
    job = fp.run("query", "@all")
    assert len(job["by_node"]) == len(report["machines"])
    for name, result in job["by_node"].items():
        assert result["outcome"] == "ok", (name, result)
    return dict(report)


def check_enlist(fp: FullPath, peer_nodes: Any, entries: list[dict[str, Any]], admin_password: str) -> None:
    """``powerq enlist`` through the CLI and a worker: each BMC gets a ``powerq`` account
    (seen in the peer's ``accounts``), the job's results hold no password, later actions
    use the new account, an inventory reload keeps it, and forgetting it goes back to the
    inventory's credentials."""
    names = [e["name"] for e in entries]
    fp.load(entries)
    job = fp.run("enlist", ",".join(names))
    assert job["returncode"] == 0, job
    text = json.dumps(job)
    assert admin_password not in text
    peers = peer_nodes()
    for name in names:
        result = job["by_node"][name]
        assert result["outcome"] == "ok" and result["note"] == "enlisted as BMC user powerq", result
        accounts = {str(a.get("name") or a.get("UserName")): a for a in peers[name]["accounts"]}
        assert "powerq" in accounts, peers[name]["accounts"]
    shown = fp.pq("inventory", "show", names[0])
    assert shown.returncode == 0 and "powerq" in shown.stdout and admin_password not in shown.stdout
    # Prove the stored account is the one used: break the inventory's admin password.
    broken = [{**e, "power_parameters": {**e["power_parameters"], "power_pass": "no-longer-valid"}}
              for e in entries]
    fp.load(broken)  # a reload keeps the enlisted credentials
    job = fp.run("query", ",".join(names))
    assert all(job["by_node"][n]["outcome"] == "ok" for n in names), job["by_node"]
    forget = fp.pq("inventory", "forget-enlisted", ",".join(names))
    assert forget.returncode == 0 and f"{len(names)} node(s)" in forget.stdout
    job = fp.run("query", ",".join(names))
    assert all(job["by_node"][n]["error"]["code"] == "auth_failed" for n in names)
