"""Metrics and JSON logs against a running stack: the session's Redis (``fullpath``), a rack
worker of this module's own started with ``POWERQ_LOG_FORMAT=json``, simulated IPMI BMCs
(pyghmi) and a real ``powerq api`` process whose ``/metrics`` is scraped and parsed."""

from __future__ import annotations

import json
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
from prometheus_client.parser import text_string_to_metric_families

from scheduler.config import Config
from tests.conftest import ROOT
from tests.fullpath import FullPath
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode, free_port

pytestmark = pytest.mark.integration

PASSWORD = "ipmiMetricsPw0rd"
WRONG = "notTheMetricsPw0"
RACK = "fpjson"
IDLE = "fpidle"  # a rack in the inventory that no worker serves


@dataclass
class Stack:
    fp: FullPath
    fleet: ipmi_bmc.IpmiFleet
    nodes: list[SimNode]
    url: str
    worker_out: Path
    worker_err: Path
    api_log: Path

    def scrape(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as resp:
            assert resp.status == 200
            text = resp.read().decode()
        assert PASSWORD not in text and WRONG not in text
        return {f.name: f for f in text_string_to_metric_families(text)}


def _start(args: list[str], env: dict[str, str], out: Path, err: Path | None = None) -> subprocess.Popen[bytes]:
    with open(out, "wb") as stdout, open(err or out, "ab") as stderr:
        return subprocess.Popen([sys.executable, "-m", "scheduler.cli", *args], env=env, cwd=ROOT,
                                stdout=stdout, stderr=stderr if err else subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def stack(fullpath: FullPath, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("metrics-stack"))
    nodes = ipmi_bmc.make_nodes(2, RACK, first_address="127.37.0.1", prefix="metnode",
                                password=PASSWORD)
    fleet = ipmi_bmc.start_fleet(nodes, workdir)
    env = {**fullpath.env, "POWERQ_LOG_FORMAT": "json"}
    out, err = workdir / "worker.out", workdir / "worker.err"
    worker = _start(["worker", "--rack", RACK, "--loglevel", "DEBUG"], env, out, err)
    port = free_port()
    api_log = workdir / "api.log"
    api = _start(["api", "--port", str(port)], env, api_log)
    stack = Stack(fullpath, fleet, nodes, f"http://127.0.0.1:{port}", out, err, api_log)
    try:
        deadline = time.monotonic() + 60
        while True:
            listed = fullpath.pq("workers", "--json")
            if listed.returncode == 0 and f"powerq.rack.{RACK}" in json.loads(listed.stdout or "{}"):
                break
            assert worker.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.3)
        while True:
            try:
                stack.scrape()
                break
            except OSError:
                assert api.poll() is None and time.monotonic() < deadline, api_log.read_text()
                time.sleep(0.1)
        yield stack
    finally:
        _stop(api)
        _stop(worker)
        fleet.stop()


def _value(family: Any, sample: str, **labels: str) -> float:
    return sum(s.value for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_every_call_and_code(stack: Stack) -> None:
    fp, nodes = stack.fp, stack.nodes
    good = [n.inventory_entry() for n in nodes]
    wrong = {**good[0], "name": "metwrong",
             "power_parameters": {**good[0]["power_parameters"], "power_pass": WRONG,
                                  "mac_address": "52:54:00:37:00:01"}}
    idle = {**good[1], "name": "metidle", "rack": IDLE,
            "power_parameters": {**good[1]["power_parameters"], "power_address": "127.37.0.9"}}
    fp.load([*good, wrong, idle])
    for node in nodes:
        stack.fleet.set_state(node.name, "off")

    hist = "powerq_driver_call_duration_seconds"
    # Earlier modules share this worker: let counts of their calls (written at the next
    # flush or heartbeat) land before taking the baseline.
    before = stack.scrape()
    for _ in range(6):
        time.sleep(5.5)  # > POWERQ_METRICS_HEARTBEAT (5 s)
        again = stack.scrape()
        if all(_value(again[f], f"{f}_count" if f == hist else "powerq_node_results_total")
               == _value(before[f], f"{f}_count" if f == hist else "powerq_node_results_total")
               for f in (hist, "powerq_node_results")):
            break
        before = again
    calls_before = _value(before[hist], f"{hist}_count", power_type="ipmi")
    results = "powerq_node_results"
    ok_before = _value(before[results], "powerq_node_results_total", power_type="ipmi", outcome="ok")
    auth_before = _value(before[results], "powerq_node_results_total", power_type="ipmi",
                         outcome="error", code="auth_failed")

    names = ",".join(n.name for n in nodes)
    jobs = [fp.run("query", names), fp.run("on", names), fp.run("off", names),
            fp.run("query", "metwrong")]
    attempts = sum(r["attempts"] for job in jobs for r in job["by_node"].values())
    oks = sum(r["outcome"] == "ok" for job in jobs for r in job["by_node"].values())
    assert jobs[-1]["by_node"]["metwrong"]["error"]["code"] == "auth_failed"
    assert oks == 6 and attempts > 6

    # a real chunk message waiting on a rack no worker consumes
    from workers.dispatch import app_for, send_chunks

    config = Config.from_env({k: v for k, v in fp.env.items() if k.startswith("POWERQ_")})
    sent = send_chunks(app_for(config), None, "query", [(IDLE, ["metidle"])], {})
    assert sent == 1
    try:
        after = stack.scrape()
    finally:
        broker = redis.Redis.from_url(fp.redis.url)
        broker.delete(f"powerq.rack.{IDLE}")
        broker.close()

    # every driver call (each attempt, confirmation queries included) is in the histogram
    assert _value(after[hist], f"{hist}_count", power_type="ipmi") - calls_before == attempts
    buckets = sorted((float(s.labels["le"]), s.value) for s in after[hist].samples
                      if s.name == f"{hist}_bucket" and s.labels["power_type"] == "ipmi")
    assert buckets[-1] == (float("inf"), _value(after[hist], f"{hist}_count", power_type="ipmi"))
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:], strict=False))  # cumulative
    assert _value(after[hist], f"{hist}_sum", power_type="ipmi") > 0
    assert _value(after[results], "powerq_node_results_total", power_type="ipmi",
                  outcome="ok") - ok_before == oks
    assert _value(after[results], "powerq_node_results_total", power_type="ipmi",
                  outcome="error", code="auth_failed") - auth_before == 1

    depth = {s.labels["rack"]: s.value for s in after["powerq_queue_depth"].samples}
    assert (depth[RACK], depth[IDLE]) == (0, 1)
    assert not any(v for r, v in depth.items() if r not in (RACK, IDLE))  # racks of earlier tests: empty
    inflight = {s.labels["rack"]: s.value for s in after["powerq_inflight_calls"].samples}
    assert inflight.get(RACK) == 0 and inflight.get(IDLE) == 0
    assert after["powerq_workers_reporting"].samples[0].value >= 1
    ages = {s.labels["quantile"]: s.value for s in after["powerq_state_age_seconds"].samples}
    assert set(ages) == {"0.5", "0.9", "0.99", "1"}
    assert 0 <= ages["0.5"] <= ages["0.9"] <= ages["0.99"] <= ages["1"] < 3600
    assert after["powerq_state_nodes"].samples[0].value >= 2  # metwrong: an error, no state
    assert after["powerq_parked_bmcs"].samples[0].value == 0
    assert after["powerq_redis_up"].samples[0].value == 1
    inventory = {s.labels["rack"]: s.value for s in after["powerq_inventory_nodes"].samples}
    assert inventory == {RACK: 3, IDLE: 1}


def test_worker_logs_are_json_with_context_and_no_secret(stack: Stack) -> None:
    stack.fp.load([n.inventory_entry() for n in stack.nodes] + [
        {**stack.nodes[0].inventory_entry(), "name": "metwrong2",
         "power_parameters": {**stack.nodes[0].power_parameters, "power_pass": WRONG,
                              "mac_address": "52:54:00:37:00:02"}}])
    job = stack.fp.run("query", ",".join(n.name for n in stack.nodes) + ",metwrong2")
    time.sleep(0.5)  # let the worker write its last lines
    err = stack.worker_err.read_text(errors="replace")
    out = stack.worker_out.read_text(errors="replace")
    assert out.strip() == ""  # no banner: everything is a log line on stderr
    entries = []
    for line in err.splitlines():
        if line.strip():
            entries.append(json.loads(line))  # every line is one JSON object
    for text in (err, out, stack.api_log.read_text(errors="replace")):
        assert PASSWORD not in text and WRONG not in text
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    node_lines = [e for e in entries if e["logger"] == "powerq.worker" and e["msg"].startswith("node ")]
    mine = [e for e in node_lines if e.get("job_id") == job["job"]["id"]]
    assert {e["node"] for e in mine} == {n.name for n in stack.nodes} | {"metwrong2"}
    for entry in node_lines:
        assert entry["job_id"] and entry["rack"] == RACK and entry["power_type"] == "ipmi", entry
    wrong = next(e for e in mine if e["node"] == "metwrong2")
    assert wrong["level"] == "INFO" and "auth_failed" in wrong["msg"]
    assert any(e["logger"].startswith("celery") for e in entries)  # Celery's own lines too
    api_lines = [json.loads(line) for line in stack.api_log.read_text().splitlines() if line.strip()]
    assert any(e["logger"] == "powerq.api" for e in api_lines)
