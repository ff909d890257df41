"""The result store against a real Redis (the test session's own server)."""

from __future__ import annotations

import json

import redis

from scheduler.store import Store


def make(client: redis.Redis, prefix: str) -> Store:
    return Store(client, prefix, result_ttl=60, events_maxlen=1000)


def result(node: str, outcome: str = "ok", after: str | None = "on", error: dict | None = None) -> dict:
    return {"node": node, "action": "on", "outcome": outcome, "state_before": "off",
            "state_after": after, "error": error, "attempts": 1, "started": 1.0, "finished": 2.0,
            "worker": "w1", "note": ""}


def test_job_lifecycle_counts_and_finish(redis_client: redis.Redis, prefix: str) -> None:
    store = make(redis_client, prefix)
    store.create_job("j1", action="on", nodeset="n[1-3]", nodes=3, chunks=2, options={},
                     requested_by="cli:test")
    store.record_results("j1", [result("n1"), result("n2")])
    assert store.chunk_finished("j1") is False
    store.record_results("j1", [result("n3", "error", None, {"code": "auth_failed", "message": "no"})])
    assert store.chunk_finished("j1") is True
    job = store.job("j1")
    assert job is not None
    assert (job["done"], job["ok"], job["error"], job["status"]) == (3, 2, 1, "done")
    assert job["finished"] is not None
    assert set(store.results("j1")) == {"n1", "n2", "n3"}
    assert 0 < redis_client.ttl(f"{prefix}:job:j1") <= 60


def test_latest_state_and_events_only_on_change(redis_client: redis.Redis, prefix: str) -> None:
    store = make(redis_client, prefix)
    store.record_results(None, [result("n1", after="on")])
    store.record_results(None, [result("n1", after="on")])
    store.record_results(None, [result("n1", after="off")])
    events = [e for e in store.events(10) if e["kind"] == "state"]
    assert [(e["old"], e["new"]) for e in reversed(events)] == [("", "on"), ("on", "off")]
    assert store.states(["n1"])["n1"]["state"] == "off"


def test_an_error_keeps_the_last_known_state(redis_client: redis.Redis, prefix: str) -> None:
    store = make(redis_client, prefix)
    store.record_results(None, [result("n1", after="on")])
    store.record_results(None, [result("n1", "error", None, {"code": "timeout", "message": "slow"})])
    latest = store.states(["n1"])["n1"]
    assert latest["state"] == "on"
    assert latest["error"]["code"] == "timeout"
    assert any(e["kind"] == "error" and e["code"] == "timeout" for e in store.events(10))


def test_results_are_json(redis_client: redis.Redis, prefix: str) -> None:
    store = make(redis_client, prefix)
    store.create_job("j2", action="on", nodeset="n1", nodes=1, chunks=1, options={"soft": True},
                     requested_by="x")
    store.record_results("j2", [result("n1")])
    raw = redis_client.hget(f"{prefix}:job:j2:results", "n1")
    assert json.loads(raw)["outcome"] == "ok"
    assert store.job("j2")["options"] == {"soft": True}
