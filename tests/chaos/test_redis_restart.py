"""Chaos 2: Redis (broker and store, append-only persistence) restarts in the middle of a
batch. 0 lost jobs; every node's result recorded exactly once; one off and one on per
node at the peers; workers and the waiting CLI reconnect by themselves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import LARGE, ChaosStack
from tests.conftest import ROOT
from tests.peers import ipmi_bmc

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SIZE: dict[str, Any] = (
    {"nodes": 300, "chunk": 25, "latency": 0.2, "down_for": 5.0}
    if LARGE else
    {"nodes": 30, "chunk": 5, "latency": 0.3, "down_for": 2.0}
)
TIME_LIMIT = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChaosStack, Any]]:
    workdir = Path(tmp_path_factory.mktemp("chaos-redis"))
    nodes = ipmi_bmc.make_nodes(SIZE["nodes"], "rr", first_address="127.41.30.1", prefix="rr",
                                power="on")
    fleet = ipmi_bmc.start_fleet(nodes, workdir / "peers", shard_size=500)
    stack = ChaosStack(
        workdir, ["rr"], per_rack=2, appendonly=True,
        POWERQ_CHUNK_SIZE=str(SIZE["chunk"]), POWERQ_TASK_TIME_LIMIT=str(TIME_LIMIT),
        POWERQ_VISIBILITY_TIMEOUT=str(TIME_LIMIT + 31), POWERQ_INSPECT_TIMEOUT="3",
        POWERQ_CONFIRM_TIMEOUT="10",
    )
    try:
        stack.start()
        stack.load([n.inventory_entry() for n in nodes])
        for node in nodes:
            fleet.fault(node.name, "slow", SIZE["latency"])
        yield stack, fleet
    finally:
        stack.stop()
        fleet.stop()


def test_redis_restart_mid_batch(stack: tuple[ChaosStack, Any]) -> None:
    chaos, fleet = stack
    names = [n.name for n in fleet.sim_nodes]
    fleet.reset()
    batch = subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "cycle", "@all", "--wait", "--json", "--yes",
         "--force", "--timeout", "240"],
        env=chaos.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Restart once some, not all, of the nodes are reported.
    client = chaos.client()
    deadline = time.monotonic() + 60
    while True:
        jobs = client.zrange(f"{chaos.prefix}:jobs", 0, -1)
        done = int(client.hget(f"{chaos.prefix}:job:{jobs[0]}", "done") or 0) if jobs else 0
        if done > 0:
            break
        assert time.monotonic() < deadline, "the batch never started"
        assert batch.poll() is None, batch.communicate()
        time.sleep(0.1)
    client.close()
    assert done < len(names), "the batch finished before Redis could be restarted: make it slower"
    # The scheduler's other half, beat (`powerq poll`), runs through the restart too.
    with open(chaos.workdir / "beat.log", "wb") as beat_log:
        beat = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "poll", "--every", "2s"],
                                env=chaos.env, cwd=ROOT, stdout=beat_log, stderr=subprocess.STDOUT)
    chaos.procs.append(beat)  # stopped with the stack whatever happens here
    time.sleep(1.0)
    chaos.restart_redis(down_for=SIZE["down_for"])
    restarted = time.time()
    # Until the workers have reconnected, a new job is refused ("no worker consumes the
    # queue"), never queued and lost: wait for them, then submit one more.
    back = time.monotonic()
    chaos.wait_workers(timeout=60)
    reconnect = time.monotonic() - back
    second = chaos.pq("query", "@all", "--wait", "--json", timeout=240)

    out, err = batch.communicate(timeout=300)
    assert batch.returncode == 0, (out[-2000:], err[-2000:], chaos.worker_log()[-3000:])
    first = json.loads(out)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]

    records = chaos.job_records()
    assert set(records) == {first["job"]["id"], json.loads(second.stdout)["job"]["id"]}, records.keys()
    for job in records.values():
        assert job["status"] == "done", job
        assert (job["done"], job["ok"], job["total"]) == (len(names),) * 3, job
        counted = chaos.client().scard(f"{chaos.prefix}:job:{job['id']}:chunks")
        assert counted == job["chunks"], (counted, job)  # each chunk counted once
        assert job["chunks_done"] == job["chunks"], (counted, job)
        assert sorted(job["results"]) == sorted(names)
    peers = fleet.nodes()
    wrong = {n: peers[n]["counts"] for n in names
             if (peers[n]["counts"]["off"], peers[n]["counts"]["on"]) != (1, 1)
             or peers[n]["power"] != "on"}
    assert not wrong, f"{len(wrong)} node(s) lost or repeated an action: {wrong}"
    assert reconnect < 30, reconnect

    # Beat reconnected by itself: it keeps polling after the restart.
    try:
        deadline = time.monotonic() + 60
        client = chaos.client()
        polled: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not polled:
            assert beat.poll() is None, (chaos.workdir / "beat.log").read_text()[-3000:]
            states = [json.loads(v) for v in client.hvals(f"{chaos.prefix}:state")]
            polled = [st for st in states if st.get("job") == "poll" and st.get("at", 0) > restarted]
            time.sleep(0.5)
        client.close()
        assert polled, ("beat did not poll after the Redis restart",
                        (chaos.workdir / "beat.log").read_text()[-3000:])
    finally:
        beat.terminate()
        beat.wait(10)
