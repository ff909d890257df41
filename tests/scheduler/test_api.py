"""The REST API and MAAS webhook in process (FastAPI's TestClient) against a real Redis.

The dispatcher is a recorder standing in for Celery: every test that sends bad input checks
that it was asked to send nothing and that no job was recorded.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import schemathesis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from scheduler.api import create_app
from scheduler.cli import main as cli_main
from scheduler.config import Config
from scheduler.planner import Plan
from scheduler.store import Store
from scheduler.tokens import TokenStore
from tests.conftest import RedisServer

PASSWORD = "S3cret-api-Passw0rd"
MAAS_ON = re.compile(r"status.*\:.*running")
MAAS_OFF = re.compile(r"status.*\:.*stopped")

OPERATION_IDS = {
    ("post", "/v1/jobs"): "createJob",
    ("get", "/v1/jobs"): "listJobs",
    ("get", "/v1/jobs/{job_id}"): "getJob",
    ("post", "/v1/jobs/{job_id}/cancel"): "cancelJob",
    ("get", "/v1/nodes"): "listNodes",
    ("get", "/v1/nodes/{name}/history"): "getNodeHistory",
    ("post", "/v1/inventory"): "loadInventory",
    ("post", "/maas/{node}/on"): "maasPowerOn",
    ("post", "/maas/{node}/off"): "maasPowerOff",
    ("get", "/maas/{node}/query"): "maasPowerQuery",
}


@dataclass
class Recorder:
    """Stands in for Celery: records sends; may play a worker that answers at once."""

    store: Store
    without: set[str] = field(default_factory=set)
    sent: list[tuple[str, Plan]] = field(default_factory=list)
    answer: str | None = None
    """When set, every job finishes at once with this power state."""

    def missing(self, racks: Any) -> list[str]:
        return [r for r in racks if r in self.without]

    def send(self, job_id: str, plan: Plan) -> int:
        self.sent.append((job_id, plan))
        if self.answer is not None:
            now = time.time()
            self.store.record_results(job_id, [
                {"node": n, "action": plan.action, "outcome": "ok", "state_before": None,
                 "state_after": self.answer, "error": None, "attempts": 1, "started": now,
                 "finished": now, "worker": "test", "note": "", "power_type": "ipmi"}
                for n in plan.nodes])
            for _ in plan.chunks:
                self.store.chunk_finished(job_id)
        return len(plan.chunks)


@dataclass
class Api:
    client: TestClient
    store: Store
    redis: redis.Redis
    recorder: Recorder
    tokens: dict[str, str]
    prefix: str
    rack: str
    seen: list[str] = field(default_factory=list)

    def h(self, name: str = "admin", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}", **extra}

    def call(self, method: str, path: str, who: str = "admin", **kw: Any) -> Any:
        headers = {**self.h(who), **kw.pop("headers", {})}
        response = self.client.request(method, path, headers=headers, **kw)
        self.seen.append(response.text + json.dumps(dict(response.headers)))
        return response

    def jobs(self) -> int:
        return int(self.redis.zcard(f"{self.prefix}:jobs"))


def inventory_yaml(rack: str, count: int = 4) -> str:
    nodes = [{"name": f"n{i}", "rack": rack, "power_type": "ipmi", "tags": ["t"],
              "power_parameters": {"power_address": f"127.40.0.{i}", "power_user": "admin",
                                   "power_pass": PASSWORD}} for i in range(1, count + 1)]
    return json.dumps({"nodes": nodes})


@pytest.fixture()
def api(redis_server: RedisServer, prefix: str, secret_key: str) -> Iterator[Api]:
    config = Config.from_env({}, redis_url=redis_server.url, key_prefix=prefix,
                             secret_key=secret_key, confirm_threshold=3, api_query_wait=1.0)
    store = Store.from_config(config)
    recorder = Recorder(store)
    tokens = TokenStore(store.client, prefix)
    issued = {scope: tokens.add(scope, scope) for scope in ("read", "operate", "admin")}
    client = TestClient(create_app(config, dispatcher=recorder, store=store))
    a = Api(client, store, store.client, recorder, issued, prefix, rack=prefix)
    out = a.call("POST", "/v1/inventory", content=inventory_yaml(a.rack),
                 headers={"Content-Type": "application/json"})
    assert out.status_code == 200, out.text
    yield a
    for text in a.seen:  # no response ever carried a BMC password or a token
        assert PASSWORD not in text
        assert not any(t in text for t in issued.values())
    store.client.close()


def assert_refused(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "problems"}, body
    assert isinstance(body["error"]["problems"], list) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return dict(body["error"])


# -- schema --------------------------------------------------------------------------------
def test_schema_is_published_with_stable_operation_ids(api: Api) -> None:
    out = api.client.get("/openapi.json")  # no token needed
    assert out.status_code == 200
    schema = out.json()
    found = {(m, p): op["operationId"] for p, ops in schema["paths"].items() for m, op in ops.items()}
    assert found == OPERATION_IDS
    for (method, path), _ in OPERATION_IDS.items():
        op = schema["paths"][path][method]
        assert {"400", "401", "403", "404"} <= set(op["responses"]), (path, op["responses"])
        assert op.get("security"), path  # every operation needs a token
    assert {"HTTPBearer", "HTTPBasic"} <= set(schema["components"]["securitySchemes"])
    loaded = schemathesis.openapi.from_dict(schema)  # refuses a schema that is not valid OpenAPI
    assert len(list(loaded.get_all_operations())) == len(OPERATION_IDS)


# -- tokens ----------------------------------------------------------------------------------
def test_tokens_bearer_basic_wrong_revoked_and_scopes(api: Api) -> None:
    assert_refused(api.client.get("/v1/jobs"), 401, "unauthorized")
    out = api.client.get("/v1/jobs", headers={"Authorization": "Bearer pqt.admin.nope"})
    assert_refused(out, 401, "unauthorized")
    assert "Bearer" in out.headers["www-authenticate"]
    assert_refused(api.client.get("/v1/jobs", headers={"Authorization": "Bearer x"}), 401)
    assert_refused(api.client.get("/v1/jobs", headers={"Authorization": "Basic !!!"}), 401)
    assert api.call("GET", "/v1/jobs", who="read").status_code == 200

    basic = base64.b64encode(f"operate:{api.tokens['operate']}".encode()).decode()
    assert api.client.get("/v1/jobs", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    wrong_user = base64.b64encode(f"admin:{api.tokens['operate']}".encode()).decode()
    assert_refused(api.client.get("/v1/jobs", headers={"Authorization": f"Basic {wrong_user}"}), 401)

    assert_refused(api.call("POST", "/v1/jobs", who="read", json={"action": "on", "nodes": "n1"}),
                   403, "forbidden")
    assert_refused(api.call("POST", "/v1/inventory?check=true", who="operate",
                            content=inventory_yaml(api.rack)), 403, "forbidden")
    assert_refused(api.call("POST", "/maas/n1/on", who="read"), 403)
    assert api.jobs() == 0 and not api.recorder.sent

    TokenStore(api.redis, api.prefix).revoke("operate")
    assert_refused(api.call("GET", "/v1/jobs", who="operate"), 401)
    stored = json.dumps(api.redis.hgetall(f"{api.prefix}:api:tokens"))
    assert not any(t in stored for t in api.tokens.values())  # hashed, never in clear


def test_token_cli_add_list_revoke(redis_server: RedisServer, prefix: str, secret_key: str) -> None:
    env = {"POWERQ_REDIS_URL": redis_server.url, "POWERQ_KEY_PREFIX": prefix,
           "POWERQ_SECRET_KEY": secret_key}
    runner = CliRunner()
    out = runner.invoke(cli_main, ["token", "add", "maas", "--json"], env=env)
    assert out.exit_code == 0, out.output
    token = json.loads(out.output)["token"]
    assert TokenStore(redis.Redis.from_url(redis_server.url), prefix).verify(token) is not None
    again = runner.invoke(cli_main, ["token", "add", "maas"], env=env)
    assert again.exit_code == 2 and token not in again.output
    listed = runner.invoke(cli_main, ["token", "list", "--json"], env=env)
    assert listed.exit_code == 0 and token not in listed.output
    assert [t["name"] for t in json.loads(listed.output)] == ["maas"]
    assert runner.invoke(cli_main, ["token", "add", "bad name!"], env=env).exit_code == 2
    assert runner.invoke(cli_main, ["token", "revoke", "maas"], env=env).exit_code == 0
    assert runner.invoke(cli_main, ["token", "revoke", "maas"], env=env).exit_code == 2
    assert TokenStore(redis.Redis.from_url(redis_server.url), prefix).verify(token) is None


# -- jobs ------------------------------------------------------------------------------------
def test_create_job_read_it_paginated(api: Api) -> None:
    out = api.call("POST", "/v1/jobs", who="operate", json={"action": "on", "nodes": "n[1-4]"})
    assert out.status_code == 202, out.text
    body = out.json()
    job_id = body["job"]["id"]
    assert body["job"]["requested_by"] == "api:operate" and body["job"]["status"] == "queued"
    assert body["plan"]["queues"] == [{"queue": f"powerq.rack.{api.rack}", "rack": api.rack,
                                       "nodes": "n[1-4]", "count": 4}]
    assert [j for j, _ in api.recorder.sent] == [job_id]

    now = time.time()
    api.store.record_results(job_id, [
        {"node": f"n{i}", "action": "on", "outcome": "ok", "state_before": "off",
         "state_after": "on", "error": None, "attempts": 1, "started": now, "finished": now,
         "worker": "w", "note": "", "power_type": "ipmi"} for i in (4, 1, 3, 2)])
    page = api.call("GET", f"/v1/jobs/{job_id}?offset=1&limit=2", who="read").json()
    assert [r["node"] for r in page["results"]] == ["n2", "n3"]
    assert page["total"] == 4 and page["job"]["done"] == 4
    listed = api.call("GET", "/v1/jobs?limit=5", who="read").json()
    assert [j["id"] for j in listed["jobs"]] == [job_id]
    assert_refused(api.call("GET", "/v1/jobs/nope"), 404, "not_found")
    assert_refused(api.call("GET", f"/v1/jobs/{job_id}?limit=0"), 400, "bad_request")

    dry = api.call("POST", "/v1/jobs", json={"action": "cycle", "nodes": "@all", "dry_run": True})
    assert dry.status_code == 200 and dry.json()["job"] is None and dry.json()["plan"]["nodes"] == 4
    confirmed = api.call("POST", "/v1/jobs", json={"action": "off", "nodes": "@all", "confirm": True,
                                                   "options": {"soft": True}})
    assert confirmed.status_code == 202 and confirmed.json()["plan"]["options"] == {"soft": True}
    assert api.jobs() == 2 and len(api.recorder.sent) == 2


BAD_JOBS: list[tuple[Any, int, str]] = [
    ({"action": "jump", "nodes": "n1"}, 400, "bad_request"),
    ({"action": "on"}, 400, "bad_request"),
    ({"action": "on", "nodes": ""}, 400, "bad_request"),
    ({"action": "on", "nodes": "n1", "extra": 1}, 400, "bad_request"),
    ({"action": "on", "nodes": "n[1-9]"}, 400, "bad_request"),
    ({"action": "on", "nodes": "n[1-"}, 400, "bad_nodeset"),
    ({"action": "on", "nodes": "@rack:nowhere"}, 400, "bad_nodeset"),
    ({"action": "on", "nodes": "n1", "options": {"soft": True}}, 400, "bad_request"),
    ({"action": "boot", "nodes": "n1", "options": {"device": "floppy"}}, 400, "bad_request"),
    ({"action": "off", "nodes": "n1", "options": {"soft": "maybe"}}, 400, "bad_request"),
    ({"action": "off", "nodes": "@all"}, 400, "confirmation_required"),  # 4 > threshold, no confirm
    ("not json", 400, "bad_request"),
    ([1, 2], 400, "bad_request"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_JOBS)
def test_bad_job_requests_queue_nothing(api: Api, body: Any, status: int, code: str) -> None:
    kw: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
    assert_refused(api.call("POST", "/v1/jobs", **kw), status, code)
    assert api.jobs() == 0 and not api.recorder.sent


def test_no_worker_for_the_rack_is_refused(api: Api) -> None:
    api.recorder.without.add(api.rack)
    err = assert_refused(api.call("POST", "/v1/jobs", json={"action": "on", "nodes": "n1"}), 503)
    assert err["problems"] == [{"rack": api.rack, "reason": "no worker"}]
    assert_refused(api.call("POST", "/maas/n1/on"), 503)
    assert api.jobs() == 0 and not api.recorder.sent
    api.recorder.without.clear()  # the claim was released: the next POST starts a job
    assert api.call("POST", "/maas/n1/on").json()["already_running"] is False


# -- nodes -----------------------------------------------------------------------------------
def test_nodes_state_and_history(api: Api) -> None:
    now = time.time()

    def result(node: str, state: str | None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"node": node, "action": "query", "outcome": "error" if error else "ok",
                "state_after": state, "error": error, "finished": now}

    api.store.record_results(None, [result("n1", "off"), result("n2", "on")])
    api.store.record_results(None, [result("n1", "on")])
    api.store.record_results(None, [result("n1", None, {"code": "timeout", "message": "slow"})])
    out = api.call("GET", "/v1/nodes?nodes=n[1-3]", who="read").json()
    assert out["total"] == 3 and out["summary"] == {"on": 2, "never read": 1}
    by = {n["node"]: n for n in out["nodes"]}
    assert by["n1"]["state"] == "on" and by["n1"]["error"]["code"] == "timeout"
    assert by["n1"]["age"] is not None and by["n3"]["state"] is None
    assert api.call("GET", "/v1/nodes?nodes=@all&offset=3&limit=5").json()["nodes"][0]["node"] == "n4"

    history = api.call("GET", "/v1/nodes/n1/history", who="read").json()["events"]
    assert [(e["kind"], e.get("new"), e.get("code")) for e in history] == [
        ("error", None, "timeout"), ("state", "on", None), ("state", "off", None)]
    assert len(api.call("GET", "/v1/nodes/n1/history?limit=1").json()["events"]) == 1
    assert_refused(api.call("GET", "/v1/nodes/zz9/history"), 404, "not_found")
    assert_refused(api.call("GET", "/v1/nodes?nodes=n[1-"), 400, "bad_nodeset")
    assert_refused(api.call("GET", "/v1/nodes?nodes=@tag:none"), 400, "bad_nodeset")
    assert_refused(api.call("GET", "/v1/nodes/n1/history?limit=99999"), 400, "bad_request")


# -- inventory -------------------------------------------------------------------------------
def test_inventory_check_load_and_refusals(api: Api) -> None:
    inv_key = f"{api.prefix}:inventory"
    before = api.redis.hgetall(inv_key)
    assert PASSWORD not in json.dumps(before)  # sealed at rest
    yaml_body = "nodes:\n" + "".join(
        f"- name: m{i}\n  rack: {api.rack}\n  power_type: ipmi\n  power_parameters:\n"
        f"    power_address: 127.41.0.{i}\n    power_user: admin\n    power_pass: {PASSWORD}\n"
        for i in (1, 2))
    checked = api.call("POST", "/v1/inventory?check=true", content=yaml_body,
                       headers={"Content-Type": "application/yaml"})
    assert checked.json() == {"nodes": 2, "racks": {api.rack: 2}, "power_types": {"ipmi": 2},
                              "stored": False}
    assert api.redis.hgetall(inv_key) == before

    bad = [
        ("nodes: [", "application/yaml"),
        ("{not json", "application/json"),
        (json.dumps({"nodes": [{"name": "x"}]}), "application/json"),
        (json.dumps({"nodes": "x"}), "application/json"),
        ("[1, 2]", "application/json"),
        (yaml_body.replace("127.41.0.2", "127.41.0.1"), "application/yaml"),  # same BMC twice
        (yaml_body.replace(PASSWORD, "{env: HOME}"), "application/yaml"),
        (yaml_body.replace(PASSWORD, "{file: pw}"), "application/yaml"),
        ("secrets_file: /etc/shadow\n" + yaml_body, "application/yaml"),
        (b"\xff\xfe", "application/yaml"),
    ]
    for body, ctype in bad:
        err = assert_refused(api.call("POST", "/v1/inventory", content=body,
                                      headers={"Content-Type": ctype}), 400, "bad_inventory")
        assert "/proc/self" not in json.dumps(err)
    assert api.redis.hgetall(inv_key) == before

    loaded = api.call("POST", "/v1/inventory", content=yaml_body)
    assert loaded.status_code == 200 and loaded.json()["stored"] is True
    stored = api.redis.hgetall(inv_key)
    assert set(stored) == {"m1", "m2"} and PASSWORD not in json.dumps(stored)
    assert api.redis.hget(f"{api.prefix}:inventory:meta", "source") == "api:admin"
    assert api.jobs() == 0 and not api.recorder.sent


# -- MAAS webhook ----------------------------------------------------------------------------
def test_maas_on_off_are_idempotent_while_a_job_runs(api: Api) -> None:
    first = api.call("POST", "/maas/n1/on", who="operate", headers={"System_Id": "abc123"})
    assert first.status_code == 202, first.text
    job = first.json()["job"]
    for _ in range(3):
        again = api.call("POST", "/maas/n1/on", who="operate")
        assert again.json() == {"node": "n1", "action": "on", "job": job, "already_running": True}
    assert len(api.recorder.sent) == 1
    off = api.call("POST", "/maas/n1/off", who="operate").json()
    assert off["job"] != job and len(api.recorder.sent) == 2

    api.store.mark_job(job, "done")  # finished: a new POST starts a new job
    assert api.call("POST", "/maas/n1/on").json()["already_running"] is False
    assert len(api.recorder.sent) == 3
    record = api.store.job(job) or {}
    assert record["requested_by"] == "api:operate" and record["nodeset"] == "n1"

    audit = api.redis.xrange(f"{api.prefix}:api:audit")
    assert any(e["system_id"] == "abc123" and e["job"] == job for _, e in audit)
    for name in ("n1,n2", "n[1-2]", "@all", "zz9", "n1!n2"):
        assert_refused(api.call("POST", f"/maas/{name}/on"), 404, "not_found")
    assert_refused(api.call("GET", "/maas/zz9/query"), 404, "not_found")
    assert len(api.recorder.sent) == 3


def test_maas_query_answers_maas_regexes_and_refreshes_stale_state(api: Api) -> None:
    api.recorder.answer = "on"  # the "worker" finds the node on
    out = api.call("GET", "/maas/n2/query", who="operate")
    assert out.status_code == 200 and out.json() == {"status": "running"}
    assert MAAS_ON.search(out.text) and not MAAS_OFF.search(out.text)
    assert [p.action for _, p in api.recorder.sent] == ["query"]

    again = api.call("GET", "/maas/n2/query")  # fresh: no new job
    assert again.json() == {"status": "running"} and len(api.recorder.sent) == 1

    api.store.record_results(None, [{"node": "n3", "outcome": "ok", "state_after": "off",
                                     "finished": time.time()}])
    stopped = api.call("GET", "/maas/n3/query")
    assert MAAS_OFF.search(stopped.text) and not MAAS_ON.search(stopped.text)
    assert len(api.recorder.sent) == 1

    api.recorder.answer = None  # a slow worker: the stale state is answered after the wait
    api.store.record_results(None, [{"node": "n4", "outcome": "ok", "state_after": "off",
                                     "finished": time.time() - 60}])
    api.call("POST", "/maas/n4/on")
    assert api.call("GET", "/maas/n4/query").json() == {"status": "stopped"}
    assert [p.action for _, p in api.recorder.sent] == ["query", "on"]  # no query while on runs


# -- fuzzing the schema ----------------------------------------------------------------------
def test_fuzzed_requests_get_structured_answers(api: Api) -> None:
    """schemathesis draws requests from the published schema (valid and not): no server
    error, every error in the one shape, nothing sent on refusal, every response as
    documented."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(OPERATION_IDS)
    calls: dict[int, int] = {}
    for operation in operations:

        @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            sent = len(api.recorder.sent)
            response = case.call(headers=api.h("admin"))
            calls[response.status_code] = calls.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.path, response.text)
            assert PASSWORD not in response.text
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"code", "message", "problems"}
                assert len(api.recorder.sent) == sent
            # A schema-valid node set may still name no node: refused (400) by design.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        check()
    assert sum(calls.values()) >= 5 * len(operations), calls
    assert any(200 <= code < 300 for code in calls) and 400 in calls, calls


def test_a_broker_failure_is_a_structured_500_and_marks_the_job_failed(api: Api) -> None:
    def broken(job_id: str, plan: Plan) -> int:
        raise ConnectionRefusedError("amqp://user:hunter2@broker")  # a message with a secret

    api.recorder.send = broken  # type: ignore[method-assign]
    client = TestClient(api.client.app, raise_server_exceptions=False)
    out = client.post("/v1/jobs", json={"action": "on", "nodes": "n1"}, headers=api.h())
    err = assert_refused(out, 500, "internal")
    assert "hunter2" not in out.text and "ConnectionRefusedError" in err["message"]
    job_id = api.redis.zrange(f"{api.prefix}:jobs", 0, -1)[0]
    assert (api.store.job(job_id) or {})["status"] == "failed"
    maas = client.post("/maas/n1/on", headers=api.h())
    assert_refused(maas, 500, "internal")
    api.recorder.send = Recorder.send.__get__(api.recorder)  # type: ignore[method-assign]
    assert api.call("POST", "/maas/n1/on").json()["already_running"] is False  # claim released
