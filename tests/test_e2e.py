"""End to end: the powerq CLI -> planner -> Redis broker -> rack workers (real Celery
worker processes) -> drivers -> real protocol peers (pyghmi's BMC server, sushy-tools,
libvirt's test driver), with results read back from the Redis store and Flower watching.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.conftest import ROOT, RedisServer, powerq_env
from tests.peers import fleet as simfleet
from tests.peers.common import free_port

pytestmark = pytest.mark.integration

WRONG_PASSWORD = "Wr0ng-e2e-Passw0rd"


@dataclass
class Stack:
    env: dict[str, str]
    fleet: simfleet.SimFleet
    redis: redis.Redis
    prefix: str
    workdir: Path
    procs: list[subprocess.Popen[bytes]]
    flower_url: str
    flower_auth: str
    password: str

    def pq(self, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scheduler.cli", *args], env=self.env, cwd=ROOT,
            capture_output=True, text=True, input=input, timeout=timeout,
        )

    def pq_json(self, *args: str) -> Any:
        out = self.pq(*args, "--json")
        assert out.stdout, out.stderr
        return json.loads(out.stdout)

    def queued_messages(self) -> int:
        return sum(int(self.redis.llen(k)) for k in self.redis.keys("powerq.rack.*"))

    def job_count(self) -> int:
        return int(self.redis.zcard(f"{self.prefix}:jobs"))


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from cryptography.fernet import Fernet

    workdir = tmp_path_factory.mktemp("e2e")
    # A Redis of this module's own: the test reads every key and message in it.
    server = RedisServer(workdir)
    server.start()
    prefix = "pqe2e"
    flower_port = free_port()
    flower_auth = "flower:" + Fernet.generate_key().decode()[:16]
    env = powerq_env(server.url, prefix, Fernet.generate_key().decode(),
                     POWERQ_CONFIRM_TIMEOUT="20", POWERQ_CALL_TIMEOUT="3", POWERQ_MAX_ATTEMPTS="2",
                     POWERQ_BACKOFF_BASE="0.1", POWERQ_CONFIRM_INTERVAL="0.2",
                     POWERQ_CONFIRM_THRESHOLD="5", POWERQ_FLOWER_PORT=str(flower_port),
                     POWERQ_FLOWER_BASIC_AUTH=flower_auth)
    fleet = simfleet.start(workdir / "sim", racks=2, mix=simfleet.Mix(ipmi=4, redfish=2, virsh=2))
    procs: list[subprocess.Popen[bytes]] = []
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        inventory = fleet.inventory()
        first_ipmi = next(n for n in fleet.nodes if n.power_type == "ipmi")
        inventory["nodes"] += [
            # A real BMC of the fleet, with the wrong password.
            {"name": "badpw", "rack": "r1", "power_type": "ipmi",
             "power_parameters": {**first_ipmi.power_parameters, "power_pass": WRONG_PASSWORD,
                                  "mac_address": "52:54:00:00:00:99"}},
            {"name": "hand1", "rack": "r1", "power_type": "manual", "power_parameters": {}},
            # Rack r3 has no worker.
            {"name": "lonely", "rack": "r3", "power_type": "manual", "power_parameters": {}},
        ]
        (workdir / "inventory.yaml").write_text(yaml.safe_dump(inventory))
        stack = Stack(env, fleet, client, prefix, workdir, procs, f"http://127.0.0.1:{flower_port}",
                      flower_auth, first_ipmi.power_parameters["power_pass"])
        load = stack.pq("inventory", "load", str(workdir / "inventory.yaml"))
        assert load.returncode == 0, load.stderr
        procs.append(_start([sys.executable, "-m", "scheduler.cli", "flower"], env, workdir / "flower.log"))
        for rack in ("r1", "r2"):
            procs.append(_start([sys.executable, "-m", "scheduler.cli", "worker", "--rack", rack,
                                 "--loglevel", "DEBUG"], env, workdir / f"worker-{rack}.log"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            queues = stack.pq_json("workers")
            if {"powerq.rack.r1", "powerq.rack.r2"} <= set(queues):
                break
            time.sleep(0.5)
        else:
            pytest.fail("workers did not come up: " + (workdir / "worker-r1.log").read_text()[-2000:])
        yield stack
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        fleet.stop()
        client.close()
        server.stop()


def sim_nodes(stack: Stack, rack: str) -> list[str]:
    return sorted(n.name for n in stack.fleet.nodes if n.rack == rack)


def test_query_reads_every_node_as_the_peers_hold_it(stack: Stack) -> None:
    out = stack.pq("query", "@all!lonely", "--wait", "--json")
    data = json.loads(out.stdout)
    results = {r["node"]: r for r in data["results"]}
    peers = stack.fleet.peer_nodes()
    for node in stack.fleet.nodes:
        assert results[node.name]["outcome"] == "ok", results[node.name]
        assert results[node.name]["state_after"] == peers[node.name]["power"], node.name
    assert results["hand1"]["state_after"] == "unknown"
    assert results["badpw"]["outcome"] == "error"
    assert out.returncode == 1  # badpw failed
    status = stack.pq_json("status", "@rack:r1")
    states = {n["node"]: n["state"] for n in status["nodes"]}
    assert all(states[name] == peers[name]["power"] for name in sim_nodes(stack, "r1"))
    # Fleet freshness (issue 4): percentiles over the nodes read, in order, just read.
    ages = status["state_age"]["percentiles"]
    node_ages = sorted(n["age"] for n in status["nodes"] if n["age"] is not None)
    assert list(ages) == ["p50", "p90", "p99", "max"]
    assert ages["max"] == node_ages[-1] and ages["p50"] <= ages["p90"] <= ages["p99"] <= ages["max"]
    assert ages["max"] < 300, ages
    assert status["state_age"]["never_read"] == sum(1 for n in status["nodes"] if n["age"] is None)
    assert "state age: p50" in stack.pq("status", "@rack:r1").stdout


def test_cycle_rack_counts_exactly_one_off_and_one_on_per_node(stack: Stack) -> None:
    r2 = sim_nodes(stack, "r2")
    for name in r2:
        stack.fleet.peer_of(name).set_state(name, "on")
    stack.fleet.reset_counts()
    out = stack.pq("cycle", "@rack:r2", "--wait", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    peers = stack.fleet.peer_nodes()
    for name in r2:
        counts = peers[name]["counts"]
        assert counts.get("off", 0) == 1 and counts.get("on", 0) == 1, (name, counts)
        assert counts.get("cycle", 0) == 0 and counts.get("reset", 0) == 0, (name, counts)
        assert peers[name]["power"] == "on"
    assert "8 ok" in out.stdout


def test_on_for_a_running_node_changes_nothing_at_the_peer(stack: Stack) -> None:
    name = sim_nodes(stack, "r1")[0]
    peer = stack.fleet.peer_of(name)
    peer.set_state(name, "on")
    stack.fleet.reset_counts()
    out = stack.pq_json("on", name, "--wait")
    result = out["results"][0]
    assert result["outcome"] == "ok" and result["note"] == "already on"
    counts = stack.fleet.peer_nodes()[name]["counts"]
    assert all(counts.get(k, 0) == 0 for k in ("on", "off", "soft_off", "cycle", "reset")), counts


def test_off_then_on_changes_the_peers(stack: Stack) -> None:
    names = sim_nodes(stack, "r1")[:3]
    out = stack.pq("off", ",".join(names), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(stack.fleet.peer_nodes()[n]["power"] == "off" for n in names)
    out = stack.pq("on", ",".join(names), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(stack.fleet.peer_nodes()[n]["power"] == "on" for n in names)


def test_boot_pxe_reaches_the_ipmi_and_redfish_peers(stack: Stack) -> None:
    names = [n.name for n in stack.fleet.nodes if n.rack == "r1" and n.power_type in ("ipmi", "redfish")][:2]
    out = stack.pq("boot", ",".join(names), "--device", "pxe", "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    peers = stack.fleet.peer_nodes()
    for name in names:
        assert str(peers[name]["boot"]).lower().startswith(("pxe", "network")), peers[name]


def test_wrong_password_is_an_auth_error_after_one_attempt(stack: Stack) -> None:
    out = stack.pq_json("query", "badpw", "--wait")
    result = out["results"][0]
    assert result["outcome"] == "error"
    assert result["error"]["code"] == "auth_failed"
    assert result["attempts"] == 1


def test_unknown_node_is_refused_and_nothing_is_queued(stack: Stack) -> None:
    jobs, queued = stack.job_count(), stack.queued_messages()
    out = stack.pq("on", "nosuchnode," + sim_nodes(stack, "r1")[0])
    assert out.returncode == 2
    assert "nosuchnode" in out.stderr and "unknown node" in out.stderr
    assert stack.job_count() == jobs and stack.queued_messages() == queued


def test_rack_without_worker_is_refused_and_nothing_is_queued(stack: Stack) -> None:
    jobs, queued = stack.job_count(), stack.queued_messages()
    out = stack.pq("query", "lonely")
    assert out.returncode == 2
    assert "r3" in out.stderr and "no worker" in out.stderr
    assert stack.job_count() == jobs and stack.queued_messages() == queued


def test_bad_parameter_refuses_the_whole_inventory(stack: Stack) -> None:
    bad = stack.workdir / "bad.yaml"
    inventory = stack.fleet.inventory()
    inventory["nodes"][0]["power_parameters"]["cipher_suite_id"] = "99"
    inventory["nodes"][1]["power_type"] = "no-such-type"
    bad.write_text(yaml.safe_dump(inventory))
    before = stack.redis.hgetall(f"{stack.prefix}:inventory")
    out = stack.pq("inventory", "load", str(bad))
    assert out.returncode == 2
    assert inventory["nodes"][0]["name"] in out.stderr and inventory["nodes"][1]["name"] in out.stderr
    assert stack.password not in out.stderr + out.stdout
    assert stack.redis.hgetall(f"{stack.prefix}:inventory") == before


def test_large_off_needs_confirmation(stack: Stack) -> None:
    jobs = stack.job_count()
    out = stack.pq("off", "@rack:r1", input="n\n")
    assert out.returncode == 2 and "--yes" in out.stderr
    assert stack.job_count() == jobs


def test_dry_run_prints_the_plan_and_sends_nothing(stack: Stack) -> None:
    jobs, queued = stack.job_count(), stack.queued_messages()
    plan = stack.pq_json("cycle", "@all!lonely", "--dry-run")["plan"]
    assert {q["queue"] for q in plan["queues"]} == {"powerq.rack.r1", "powerq.rack.r2"}
    assert plan["nodes"] == len(stack.fleet.nodes) + 2
    assert stack.job_count() == jobs and stack.queued_messages() == queued


def test_job_show_reads_back_a_job(stack: Stack) -> None:
    name = sim_nodes(stack, "r2")[0]
    out = stack.pq_json("query", name)
    job_id = out["job"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        shown = stack.pq_json("job", "show", job_id)
        if shown["job"]["status"] == "done":
            break
        time.sleep(0.3)
    assert shown["job"]["requested_by"].startswith("cli:")
    assert shown["results"][0]["node"] == name
    assert shown["results"][0]["worker"].startswith("rack-r2@")


def test_polling_through_beat_records_states(stack: Stack) -> None:
    name = sim_nodes(stack, "r2")[1]
    peer = stack.fleet.peer_of(name)
    current = stack.fleet.peer_nodes()[name]["power"]
    flipped = "off" if current == "on" else "on"
    peer.set_state(name, flipped)  # changed behind powerq's back
    beat = _start([sys.executable, "-m", "scheduler.cli", "poll", "--every", "2s"], stack.env,
                  stack.workdir / "beat.log")
    try:
        deadline = time.monotonic() + 30
        state = None
        while time.monotonic() < deadline:
            state = stack.pq_json("status", name)["nodes"][0]
            if state["state"] == flipped and state["job"] == "poll":
                break
            time.sleep(0.5)
        assert state and state["state"] == flipped and state["job"] == "poll", (
            state, (stack.workdir / "beat.log").read_text()[-2000:])
    finally:
        beat.terminate()
        beat.wait(10)
    events = stack.redis.xrevrange(f"{stack.prefix}:events", count=500)
    assert any(f.get("node") == name and f.get("new") == flipped and f.get("kind") == "state"
               for _, f in events)


def _flower(stack: Stack, path: str) -> Any:
    req = urllib.request.Request(stack.flower_url + path)
    req.add_header("Authorization", "Basic " + base64.b64encode(stack.flower_auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=20) as resp:
        return resp.read().decode()


def test_flower_shows_workers_and_tasks_and_requires_auth(stack: Stack) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(stack.flower_url + "/api/workers", timeout=10)
    assert err.value.code == 401
    workers = json.loads(_flower(stack, "/api/workers?refresh=1"))
    assert any(name.startswith("rack-r1@") for name in workers)
    assert any(name.startswith("rack-r2@") for name in workers)
    tasks = json.loads(_flower(stack, "/api/tasks"))
    assert any(t.get("name") == "powerq.run_chunk" for t in tasks.values())


def test_no_secret_anywhere(stack: Stack) -> None:
    """No BMC password in a Celery message, the store, a log line or Flower's API."""
    from scheduler.config import Config
    from workers.app import rack_queue
    from workers.dispatch import app_for, send_chunks

    secrets = {stack.password, WRONG_PASSWORD}
    # A real chunk message, held in a queue nobody consumes so it can be read raw.
    config = Config.from_env(stack.env)
    app = app_for(config)
    with app.connection_for_write() as conn:
        rack_queue("scan")(conn.default_channel).declare()
    send_chunks(app, "scan-job", "cycle", [("scan", sim_nodes(stack, "r1"))], {"soft": True})
    raw_messages = stack.redis.lrange("powerq.rack.scan", 0, -1)
    assert len(raw_messages) == 1
    envelope = json.loads(raw_messages[0])
    body = base64.b64decode(envelope["body"]).decode()  # kombu stores the body base64-encoded
    assert json.loads(body)[0] == ["scan-job", "cycle", sim_nodes(stack, "r1"), {"soft": True, "chunk": 0}]
    haystacks: list[str] = [raw_messages[0], body]
    for key in stack.redis.keys("*"):
        kind = stack.redis.type(key)
        if kind == "string":
            haystacks.append(str(stack.redis.get(key)))
        elif kind == "hash":
            haystacks.append(json.dumps(stack.redis.hgetall(key)))
        elif kind == "list":
            haystacks.extend(stack.redis.lrange(key, 0, -1))
        elif kind == "stream":
            haystacks.append(json.dumps(stack.redis.xrange(key)))
        elif kind in ("set", "zset"):
            haystacks.append(json.dumps(sorted(stack.redis.zrange(key, 0, -1) if kind == "zset"
                                               else stack.redis.smembers(key))))
    for log in stack.workdir.glob("*.log"):
        haystacks.append(log.read_text(errors="replace"))
    for path in ("/api/tasks", "/api/workers?refresh=1"):
        haystacks.append(_flower(stack, path))
    assert os.path.getsize(stack.workdir / "worker-r1.log") > 0
    for secret in secrets:
        for text in haystacks:
            assert secret not in text
