"""The audit stream (scheduler/audit.py): requests, refusals and outcomes, in a real Redis
and through the CLI and a real worker."""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from scheduler import audit
from scheduler.planner import Plan, PlanError, submit
from scheduler.store import Store
from tests.fullpath import FullPath
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode


def _plan(nodes: list[str], action: str = "off", **options: Any) -> Plan:
    return Plan(action=action, nodeset=",".join(nodes), nodes=nodes, chunks=[("r1", nodes)],
                options=dict(options))


def _entries(client: Any, prefix: str) -> list[dict[str, Any]]:
    return audit.read(client, prefix, 100)


def test_submit_records_the_request_then_the_outcome_once(redis_client: redis.Redis, prefix: str) -> None:
    store = Store(redis_client, prefix)
    job = submit(_plan(["a", "b"], soft=True), store, racks_without_worker=lambda racks: [],
                 send=lambda job_id, plan: 1, requested_by="api:ops")
    [request] = _entries(redis_client, prefix)
    assert request["kind"] == "request" and request["who"] == "api:ops" and request["job"] == job
    assert request["action"] == "off" and request["nodes"] == "2" and request["racks"] == "r1"
    assert json.loads(request["options"]) == {"soft": True} and float(request["at"]) > 0

    store.record_results(job, [{"node": "a", "outcome": "ok"}, {"node": "b", "outcome": "error"}])
    assert store.chunk_finished(job)
    store.chunk_finished(job)  # a redelivered last chunk: the outcome is not written again
    entries = _entries(redis_client, prefix)
    assert [e["kind"] for e in entries] == ["outcome", "request"]
    outcome = entries[0]
    assert outcome["job"] == job and outcome["who"] == "api:ops" and outcome["status"] == "done"
    assert (outcome["ok"], outcome["error"], outcome["skipped"]) == ("1", "1", "0")


def test_a_refusal_in_submit_is_recorded_with_its_code(redis_client: redis.Redis, prefix: str) -> None:
    store = Store(redis_client, prefix)
    with pytest.raises(PlanError) as info:
        submit(_plan(["a"]), store, racks_without_worker=lambda racks: list(racks),
               send=lambda job_id, plan: 1, requested_by="cli:alice")
    # The CLI records refusals too: the same exception is not recorded twice.
    assert audit.record_refusal(store, "cli:alice", info.value, action="off", nodeset="a") is None
    [refused] = _entries(redis_client, prefix)
    assert refused["kind"] == "refused" and refused["code"] == "bad_request"
    assert refused["who"] == "cli:alice" and refused["nodes"] == "1"
    assert "no worker" in refused["message"] and not redis_client.keys(f"{prefix}:job:*")


def test_options_that_look_secret_are_left_out(redis_client: redis.Redis, prefix: str) -> None:
    store = Store(redis_client, prefix)
    audit.record_request(store, "j1", _plan(["a"], "enlist", username="powerq", password="x-Pa55",
                                            k_g="kg-Pa55"), "cli:bob")
    [entry] = _entries(redis_client, prefix)
    assert json.loads(entry["options"]) == {"username": "powerq"}
    assert "Pa55" not in json.dumps(entry)


def test_the_stream_is_capped(redis_client: redis.Redis, prefix: str) -> None:
    store = Store(redis_client, prefix, audit_maxlen=10)
    for i in range(400):
        audit.record_request(store, f"j{i}", _plan(["a"]), "cli:bob")
    assert redis_client.xlen(audit.stream_key(prefix)) < 400


def test_read_merges_the_api_refusals_newest_first(redis_client: redis.Redis, prefix: str) -> None:
    store = Store(redis_client, prefix)
    audit.record_request(store, "j1", _plan(["a"]), "api:ops")
    redis_client.xadd(audit.api_stream_key(prefix), {"at": time.time(), "who": "api:ro", "method": "POST",
                                                     "path": "/v1/jobs", "status": "403",
                                                     "code": "forbidden"})
    redis_client.xadd(audit.api_stream_key(prefix), {"at": time.time(), "who": "api:ops", "method": "POST",
                                                     "path": "/v1/jobs", "status": "202"})
    entries = _entries(redis_client, prefix)
    assert [(e["kind"], e["source"]) for e in entries] == [("refused", "api"), ("request", "powerq")]
    assert entries[0]["code"] == "forbidden" and entries[0]["http_status"] == "403"
    assert [e["kind"] for e in audit.read(redis_client, prefix, 10, include_api=False)] == ["request"]


def test_a_redis_failure_never_fails_the_request() -> None:
    dead = Store(redis.Redis(port=1, socket_connect_timeout=0.2), "x")
    assert audit.record_request(dead, "j1", _plan(["a"]), "cli:bob") is None
    assert audit.record_outcome(dead, "j1") is None


# -- through the CLI and a real worker ---------------------------------------------------------


@pytest.fixture(scope="module")
def ipmi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ipmi_bmc.IpmiFleet, list[SimNode]]]:
    nodes = ipmi_bmc.make_nodes(2, "fp", first_address="127.35.0.11", prefix="audipmi",
                                password="aud-ipmi-Pa55")
    fleet = ipmi_bmc.start_fleet(nodes, Path(tmp_path_factory.mktemp("aud-ipmi")))
    yield fleet, nodes
    fleet.stop()


@pytest.mark.integration
def test_cli_requests_refusals_and_outcomes(
    fullpath: FullPath, ipmi: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]
) -> None:
    fleet, nodes = ipmi
    entries = [n.inventory_entry() for n in nodes]
    orphan = {**entries[0], "name": "audorphan", "rack": "no-such-rack",
              "power_parameters": {**entries[0]["power_parameters"], "power_address": "127.35.0.19"}}
    fullpath.load(entries + [orphan])
    names = ",".join(n.name for n in nodes)
    me = f"cli:{getpass.getuser()}"

    job = fullpath.run("query", names)
    assert all(r["outcome"] == "ok" for r in job["by_node"].values()), job
    job_id = job["job"]["id"]

    assert fullpath.pq("query", "audnosuch").returncode == 2
    assert fullpath.pq("query", "audorphan").returncode == 2
    env = dict(fullpath.env, POWERQ_CONFIRM_THRESHOLD="0")
    import subprocess
    import sys

    from tests.conftest import ROOT

    refused = subprocess.run([sys.executable, "-m", "scheduler.cli", "off", names, "--json"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "confirmation_required" in refused.stdout

    out = fullpath.pq("audit", "--count", "20", "--json")
    assert out.returncode == 0, out.stderr
    log = json.loads(out.stdout)
    mine = [e for e in log if e.get("job") == job_id]
    kinds = {e["kind"]: e for e in mine}
    assert set(kinds) == {"request", "outcome"}, mine
    assert kinds["request"]["who"] == me and kinds["request"]["nodes"] == "2"
    assert kinds["outcome"]["status"] == "done" and kinds["outcome"]["ok"] == "2"
    refusals = [e for e in log if e["kind"] == "refused"][:3]
    assert [e["code"] for e in refusals] == ["confirmation_required", "bad_request", "bad_request"]
    assert all(e["who"] == me for e in refusals)
    assert refusals[0]["action"] == "off" and refusals[0]["nodeset"] == names
    assert "no worker" in refusals[1]["message"] and refusals[1]["nodeset"] == "audorphan"
    assert "audnosuch" in refusals[2]["message"]
    assert "aud-ipmi-Pa55" not in out.stdout

    table = fullpath.pq("audit", "-n", "5")
    assert table.returncode == 0 and "confirmation_required" in table.stdout and me in table.stdout
