"""Metrics: workers' recorder -> Redis -> the API's collector -> /metrics, and the Grafana
dashboard only asks for what /metrics exposes. Real Redis, no Celery."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.api import create_app
from scheduler.config import Config
from scheduler.inventory import NodeInfo
from scheduler.logs import current_context, log_context
from scheduler.metrics import BUCKETS, METRICS, MetricsRecorder, metrics_registry, percentiles
from scheduler.store import Store
from scheduler.tokens import TokenStore
from tests.conftest import RedisServer
from workers.policy import BmcLocks, NodeResult, PolicySettings
from workers.tasks import MeteredRunner

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "powerq-dashboard.json"


class Inventory:
    """Stands in for InventoryStore: only node_index() is read."""

    def __init__(self, racks: dict[str, int]) -> None:
        self.index = {f"{rack}-n{i}": NodeInfo(rack, "ipmi", ()) for rack, n in racks.items()
                      for i in range(n)}

    def node_index(self) -> dict[str, NodeInfo]:
        return self.index


def scrape(store: Store, inventory: Any, config: Config) -> dict[str, Any]:
    text = generate_latest(metrics_registry(store, inventory, config)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family: Any, name: str | None = None) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples
            if name is None or s.name == name}


@pytest.fixture()
def setup(redis_server: RedisServer, prefix: str, secret_key: str) -> Iterator[tuple[Store, Config]]:
    config = Config(redis_url=redis_server.url, key_prefix=prefix, secret_key=secret_key)
    store = Store.from_config(config)
    yield store, config
    store.client.close()


def test_percentiles_nearest_rank() -> None:
    assert percentiles([]) == {}
    assert percentiles([5.0]) == {"0.5": 5.0, "0.9": 5.0, "0.99": 5.0, "1": 5.0}
    values = list(range(1, 101))
    assert percentiles(values) == {"0.5": 50, "0.9": 90, "0.99": 99, "1": 100}


def test_histogram_and_results_add_up_across_recorders(setup: tuple[Store, Config]) -> None:
    store, config = setup
    a = MetricsRecorder(store.client, config.key_prefix, worker="a")
    b = MetricsRecorder(store.client, config.key_prefix, worker="b")  # another process / host
    for seconds in (0.005, 0.2, 0.2, 3.0):
        a.observe_call("ipmi", seconds)
    b.observe_call("ipmi", 100.0)  # beyond the last bound: only +Inf
    b.observe_call("redfish", 0.02)
    a.result("ipmi", "ok", None)
    a.result("ipmi", "error", "auth_failed")
    b.result("ipmi", "error", "auth_failed")
    a.flush()
    b.flush()
    fams = scrape(store, Inventory({}), config)
    hist = fams["powerq_driver_call_duration_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples
               if s.name.endswith("_bucket") and s.labels["power_type"] == "ipmi"}
    assert buckets["0.01"] == 1 and buckets["0.25"] == 3 and buckets["5.0"] == 4
    assert buckets["60.0"] == 4 and buckets["+Inf"] == 5
    assert len(buckets) == len(BUCKETS) + 1
    count = samples(hist, "powerq_driver_call_duration_seconds_count")
    assert count[(("power_type", "ipmi"),)] == 5 and count[(("power_type", "redfish"),)] == 1
    total = samples(hist, "powerq_driver_call_duration_seconds_sum")
    assert total[(("power_type", "ipmi"),)] == pytest.approx(103.405)
    results = samples(fams["powerq_node_results"], "powerq_node_results_total")
    assert results[(("code", "auth_failed"), ("outcome", "error"), ("power_type", "ipmi"))] == 2
    assert results[(("code", "none"), ("outcome", "ok"), ("power_type", "ipmi"))] == 1
    a.flush()  # nothing new: counts do not grow
    again = scrape(store, Inventory({}), config)["powerq_driver_call_duration_seconds"]
    assert samples(again, "powerq_driver_call_duration_seconds_count") == count


def test_failed_flush_keeps_the_counts(setup: tuple[Store, Config]) -> None:
    store, config = setup
    dead = redis.Redis(port=1, socket_connect_timeout=0.2)
    rec = MetricsRecorder(dead, config.key_prefix, worker="w")
    rec.observe_call("ipmi", 0.1)
    rec.result("ipmi", "error", "timeout")
    rec.flush()  # Redis unreachable: warns, does not raise
    rec.client = store.client
    rec.flush()
    fams = scrape(store, Inventory({}), config)
    assert samples(fams["powerq_driver_call_duration_seconds"],
                   "powerq_driver_call_duration_seconds_count") == {(("power_type", "ipmi"),): 1}


def test_inflight_per_rack_and_a_dead_worker_drops_out(setup: tuple[Store, Config]) -> None:
    store, config = setup
    inv = Inventory({"r1": 2, "r2": 1})
    live = MetricsRecorder(store.client, config.key_prefix, heartbeat=0.1, worker="live").start()
    dying = MetricsRecorder(store.client, config.key_prefix, heartbeat=0.1, worker="dying")
    try:
        with live.in_flight("r1"), live.in_flight("r1"), dying.in_flight("r2"):
            dying.flush()  # then "killed": it never writes again, its block never ends
            live.flush()
            fams = scrape(store, inv, config)
            assert samples(fams["powerq_inflight_calls"]) == {
                (("rack", "r1"),): 2, (("rack", "r2"),): 1}
            assert fams["powerq_workers_reporting"].samples[0].value == 2
            time.sleep(0.6)  # > 3 heartbeats: dying's key expired; live's heartbeat kept its own
            fams = scrape(store, inv, config)
            assert samples(fams["powerq_inflight_calls"]) == {
                (("rack", "r1"),): 2, (("rack", "r2"),): 0}
            assert fams["powerq_workers_reporting"].samples[0].value == 1
        live.flush()
        fams = scrape(store, inv, config)
        assert samples(fams["powerq_inflight_calls"])[(("rack", "r1"),)] == 0
    finally:
        live.stop()
    assert not store.client.exists(f"{config.key_prefix}:metrics:inflight:live")


def test_queue_depth_state_ages_inventory_parked(setup: tuple[Store, Config]) -> None:
    store, config = setup
    inv = Inventory({"qa": 3, "qb": 1})
    broker = redis.Redis.from_url(config.redis_url)
    try:
        broker.delete("powerq.rack.qa", "powerq.rack.qa\x06\x163", "powerq.rack.qb")
        broker.lpush("powerq.rack.qa", "m1", "m2")
        broker.lpush("powerq.rack.qa\x06\x163", "m3")  # a priority sibling list
        now = time.time()
        store.record_results("job1", [
            {"node": f"qa-n{i}", "action": "query", "outcome": "ok", "state_after": "on",
             "finished": now - age} for i, age in enumerate((10.0, 20.0, 30.0))])
        fams = scrape(store, inv, config)
        assert samples(fams["powerq_queue_depth"]) == {(("rack", "qa"),): 3, (("rack", "qb"),): 0}
        ages = {s.labels["quantile"]: s.value for s in fams["powerq_state_age_seconds"].samples}
        assert set(ages) == {"0.5", "0.9", "0.99", "1"}
        assert 19 < ages["0.5"] < 22 and 29 < ages["1"] < 32
        assert fams["powerq_state_nodes"].samples[0].value == 3
        assert samples(fams["powerq_inventory_nodes"]) == {(("rack", "qa"),): 3, (("rack", "qb"),): 1}
        assert fams["powerq_parked_bmcs"].samples[0].value == 0
        store.client.sadd(f"{config.key_prefix}:parked", "10.0.0.1", "10.0.0.2")
        assert scrape(store, inv, config)["powerq_parked_bmcs"].samples[0].value == 2
        assert scrape(store, inv, config)["powerq_redis_up"].samples[0].value == 1
    finally:
        broker.close()


def test_no_queue_depth_for_a_non_redis_broker(setup: tuple[Store, Config]) -> None:
    store, config = setup
    amqp = Config(redis_url=config.redis_url, key_prefix=config.key_prefix,
                  broker_url="amqp://guest:guest@127.0.0.1:5672//")
    fams = scrape(store, Inventory({"r1": 1}), amqp)
    assert "powerq_queue_depth" not in fams and "powerq_inflight_calls" in fams


def test_redis_down_is_reported_not_raised() -> None:
    config = Config(redis_url="redis://127.0.0.1:1/0", key_prefix="x")
    store = Store(redis.Redis(port=1, socket_connect_timeout=0.2, decode_responses=True), "x")
    fams = scrape(store, Inventory({}), config)
    assert list(fams) == ["powerq_redis_up"] and fams["powerq_redis_up"].samples[0].value == 0


class FakeDriver:
    power_type = "fake"

    def bmc_key(self) -> str:
        return "bmc-1"


def test_metered_runner_times_each_attempt_and_keeps_the_log_context(
        setup: tuple[Store, Config]) -> None:
    store, config = setup
    rec = MetricsRecorder(store.client, config.key_prefix, worker="w")
    runner = MeteredRunner(PolicySettings(call_timeout=2), locks=BmcLocks(), metrics=rec)
    seen: dict[str, Any] = {}

    def call() -> str:
        seen.update(current_context(), thread=threading.current_thread().name)
        with rec._lock:
            seen["inflight"] = dict(rec._inflight)
        return "on"

    result = NodeResult(node="n1", action="query")
    with log_context(job_id="j1", node="n1", rack="r9", power_type="fake"):
        assert runner.call(FakeDriver(), call, result) == "on"  # type: ignore[arg-type]
    assert seen["thread"] == "powerq-call"  # the policy's watchdog thread...
    assert seen["node"] == "n1" and seen["job_id"] == "j1"  # ...with the node's context
    assert seen["inflight"] == {"r9": 1}
    rec.flush()
    fams = scrape(store, Inventory({}), config)
    assert samples(fams["powerq_driver_call_duration_seconds"],
                   "powerq_driver_call_duration_seconds_count") == {(("power_type", "fake"),): 1}
    assert samples(fams["powerq_inflight_calls"]) == {(("rack", "r9"),): 0}


# --------------------------------------------------------------------------- /metrics route
class NoDispatch:
    def missing(self, racks: Any) -> list[str]:
        return []

    def send(self, job_id: str, plan: Any) -> int:
        return 0


def _client(config: Config) -> TestClient:
    return TestClient(create_app(config, dispatcher=NoDispatch()))


def test_metrics_route_open_by_default_and_token_when_asked(setup: tuple[Store, Config]) -> None:
    store, config = setup
    rec = MetricsRecorder(store.client, config.key_prefix, worker="w")
    rec.observe_call("ipmi", 0.3)
    rec.flush()
    with _client(config) as client:
        reply = client.get("/metrics")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(reply.text)}
        assert "powerq_driver_call_duration_seconds" in names
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    token = TokenStore(store.client, config.key_prefix).add("scraper", "read")
    closed = Config(redis_url=config.redis_url, key_prefix=config.key_prefix, metrics_auth=True)
    with _client(closed) as client:
        assert client.get("/metrics").status_code == 401
        reply = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 200 and "powerq_redis_up 1.0" in reply.text


# --------------------------------------------------------------------------- the dashboard
METRIC_RE = re.compile(r"\b(powerq_[a-z0-9_]+)")
BY_RE = re.compile(r"\bby \(([^)]*)\)")


def exprs(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append(target["expr"])
    return out


def test_dashboard_asks_only_for_exposed_metrics(setup: tuple[Store, Config]) -> None:
    store, config = setup
    rec = MetricsRecorder(store.client, config.key_prefix, worker="w")
    with rec.in_flight("d1"):
        rec.observe_call("ipmi", 0.3)
        rec.result("ipmi", "error", "auth_failed")
        rec.flush()
    store.record_results(None, [{"node": "d1-n0", "action": "query", "outcome": "ok",
                                 "state_after": "on", "finished": time.time()}])
    admin = TokenStore(store.client, config.key_prefix).add("admin", "admin")
    inventory = {"nodes": [{"name": "d1-n0", "rack": "d1", "power_type": "ipmi", "power_parameters": {
        "power_address": "127.40.0.1", "power_user": "admin", "power_pass": "pw-Dash-1"}}]}
    with _client(config) as client:
        loaded = client.post("/v1/inventory", json=inventory,
                             headers={"Authorization": f"Bearer {admin}"})
        assert loaded.status_code == 200, loaded.text
        text = client.get("/metrics").text
    assert "pw-Dash-1" not in text and admin not in text
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            exposed.setdefault(s.name, set()).update(s.labels)
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and all(p["datasource"]["uid"] == "${datasource}"
                                       for p in dashboard["panels"])
    wanted = {"powerq_driver_call_duration_seconds_bucket", "powerq_node_results_total",
              "powerq_queue_depth", "powerq_inflight_calls", "powerq_state_age_seconds",
              "powerq_parked_bmcs"}
    used: set[str] = set()
    for expr in exprs(dashboard):
        names = METRIC_RE.findall(expr)
        assert names, expr
        for name in names:
            assert name in exposed, (name, expr, sorted(exposed))
            used.add(name)
            for group in BY_RE.findall(expr):
                for label in (x.strip() for x in group.split(",")):
                    assert label in exposed[name], (label, name, expr)
    assert wanted <= used
    assert set(METRICS) >= {n.removesuffix("_bucket").removesuffix("_count") for n in used}
