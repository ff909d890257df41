"""The REST API and the MAAS webhook against a running stack: a real `powerq api` process,
the session's Redis and rack worker (``fullpath``), and simulated IPMI BMCs (pyghmi)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ROOT
from tests.fullpath import FullPath
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode, free_port

pytestmark = pytest.mark.integration

# MAAS's webhook power driver defaults (power_on_regex / power_off_regex), used with re.search
MAAS_ON = re.compile(r"status.*\:.*running")
MAAS_OFF = re.compile(r"status.*\:.*stopped")
MAAS_DELAYS = (1, 2, 2, 4, 6, 8, 12)
"""Seconds MAAS waits between queries after a POST; the test runs them 4 times faster."""

PASSWORD = "ipmi-api-Passw0rd"


@dataclass
class Reply:
    status: int
    body: str
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ApiStack:
    fp: FullPath
    fleet: ipmi_bmc.IpmiFleet
    nodes: list[SimNode]
    url: str
    tokens: dict[str, str]
    log: Path

    def request(self, method: str, path: str, *, token: str | None = None, basic: str | None = None,
                body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        if basic is not None:
            pair = f"{basic}:{self.tokens[basic]}".encode()
            hdrs["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return Reply(resp.status, resp.read().decode(), dict(resp.headers))
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.read().decode(), dict(exc.headers))

    def as_(self, name: str, method: str, path: str, **kw: Any) -> Reply:
        return self.request(method, path, token=self.tokens[name], **kw)

    def load(self) -> None:
        """Load the nodes' inventory through the running API (POST /v1/inventory)."""
        body = {"nodes": [n.inventory_entry() for n in self.nodes]}
        out = self.as_("root", "POST", "/v1/inventory", body=body)
        assert out.status == 200, out.body
        assert out.json() == {"nodes": len(self.nodes), "racks": {"fp": len(self.nodes)},
                              "power_types": {"ipmi": len(self.nodes)}, "stored": True}, out.body

    def wait_job(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            page = self.as_("ops", "GET", f"/v1/jobs/{job_id}").json()
            if page["job"]["status"] in ("done", "failed", "cancelled"):
                return dict(page)
            assert time.monotonic() < deadline, page
            time.sleep(0.1)

    def counts(self, name: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.fleet.node(name).get("counts", {}).items()}


@pytest.fixture(scope="module")
def stack(fullpath: FullPath, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    workdir = Path(tmp_path_factory.mktemp("api-stack"))
    nodes = ipmi_bmc.make_nodes(3, "fp", first_address="127.36.0.1", prefix="apinode",
                                password=PASSWORD)
    fleet = ipmi_bmc.start_fleet(nodes, workdir)
    tokens: dict[str, str] = {}
    for name, scope in (("ops", "operate"), ("maas", "operate"), ("viewer", "read"),
                        ("root", "admin")):
        fullpath.pq("token", "revoke", name)
        out = fullpath.pq("token", "add", name, "--scope", scope, "--json")
        assert out.returncode == 0, out.stderr
        tokens[name] = json.loads(out.stdout)["token"]
    port = free_port()
    log = workdir / "api.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "api", "--port", str(port)],
            env={**fullpath.env, "POWERQ_API_STATE_FRESH": "2"}, cwd=ROOT,
            stdout=logf, stderr=subprocess.STDOUT,
        )
    api = ApiStack(fullpath, fleet, nodes, f"http://127.0.0.1:{port}", tokens, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if api.request("GET", "/openapi.json").status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        api.load()
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        fleet.stop()
    text = log.read_text(errors="replace")  # the API's own log: no token, no BMC password
    assert PASSWORD not in text
    assert not any(t in text for t in tokens.values())


def test_job_over_http_changes_the_peer(stack: ApiStack) -> None:
    stack.load()
    names = [n.name for n in stack.nodes[:2]]
    for name in names:
        stack.fleet.set_state(name, "off")
    out = stack.as_("ops", "POST", "/v1/jobs", body={"action": "on", "nodes": ",".join(names)})
    assert out.status == 202, out.body
    job = out.json()["job"]
    assert job["requested_by"] == "api:ops"
    page = stack.wait_job(job["id"])
    assert page["job"]["ok"] == 2 and page["total"] == 2
    assert {r["node"]: r["state_after"] for r in page["results"]} == dict.fromkeys(names, "on")
    pages = [stack.as_("viewer", "GET", f"/v1/jobs/{job['id']}?limit=1&offset={i}").json()
             for i in range(3)]  # one result a page, then past the end
    assert [len(p["results"]) for p in pages] == [1, 1, 0]
    assert sorted(p["results"][0]["node"] for p in pages[:2]) == sorted(names)
    assert all(p["total"] == 2 and p["limit"] == 1 for p in pages)
    for name in names:
        assert stack.fleet.node(name)["power"] == "on"
    states = stack.as_("viewer", "GET", f"/v1/nodes?nodes={','.join(names)}").json()
    assert {n["node"]: n["state"] for n in states["nodes"]} == dict.fromkeys(names, "on")
    history = stack.as_("viewer", "GET", f"/v1/nodes/{names[0]}/history").json()["events"]
    assert history[0]["kind"] == "state" and history[0]["new"] == "on"

    client = redis.Redis.from_url(stack.fp.redis.url)
    jobs = client.zcard(f"{stack.fp.prefix}:jobs")
    refused = stack.as_("ops", "POST", "/v1/jobs", body={"action": "on", "nodes": "apinode-fp-[0001-0009]"})
    assert refused.status == 400 and refused.json()["error"]["code"] == "bad_request"
    assert {p["node"] for p in refused.json()["error"]["problems"]} >= {"apinode-fp-0004"}
    assert client.zcard(f"{stack.fp.prefix}:jobs") == jobs  # nothing recorded, nothing sent
    client.close()


def maas_drive(stack: ApiStack, name: str, action: str, regex: re.Pattern[str]) -> int:
    """POST the action, then query at MAAS's intervals, re-POSTing while the state does not
    match, as MAAS does. Returns how many POSTs it took."""
    posts = 0
    headers = {"System_Id": "x7kq3p", "Accept": "application/json"}
    for delay in (0, *MAAS_DELAYS):
        time.sleep(delay / 4)
        if posts == 0 or not regex.search(stack.as_("maas", "GET", f"/maas/{name}/query",
                                                    headers=headers).body):
            started = time.monotonic()
            out = stack.as_("maas", "POST", f"/maas/{name}/{action}", headers=headers)
            assert out.status == 202, out.body
            assert time.monotonic() - started < 2.0  # MAAS waits on this call: fast
            posts += 1
        else:
            return posts
    raise AssertionError(f"{name} never reached {action}: {stack.fleet.node(name)}")


def test_maas_webhook_flow_as_maas_drives_it(stack: ApiStack) -> None:
    stack.load()
    name = stack.nodes[2].name
    stack.fleet.set_state(name, "off")
    stack.fleet.reset()
    maas_drive(stack, name, "on", MAAS_ON)
    query = stack.as_("maas", "GET", f"/maas/{name}/query")
    assert MAAS_ON.search(query.body) and not MAAS_OFF.search(query.body)
    assert stack.fleet.node(name)["power"] == "on"

    burst = [stack.as_("maas", "POST", f"/maas/{name}/on").json() for _ in range(5)]
    for reply in burst:
        if reply["job"]:
            stack.wait_job(reply["job"])
    counts = stack.counts(name)
    assert counts.get("on") == 1, counts  # once, however often MAAS POSTs
    assert not any(counts.get(k) for k in ("off", "soft_off", "cycle", "reset")), counts

    stack.fleet.reset()
    maas_drive(stack, name, "off", MAAS_OFF)
    assert stack.fleet.node(name)["power"] == "off"
    counts = stack.counts(name)
    assert counts.get("off", 0) + counts.get("soft_off", 0) == 1, counts
    assert not any(counts.get(k) for k in ("on", "cycle", "reset")), counts

    stack.fleet.set_state(name, "on")  # changed behind powerq's back: a stale state is refreshed
    time.sleep(2.2)
    deadline = time.monotonic() + 10
    while not MAAS_ON.search(stack.as_("maas", "GET", f"/maas/{name}/query").body):
        assert time.monotonic() < deadline
        time.sleep(0.5)

    jobs = stack.as_("viewer", "GET", "/v1/jobs?limit=50").json()["jobs"]
    assert {j["requested_by"] for j in jobs if j["nodeset"] == name} == {"api:maas"}
    # MAAS's System_Id reaches the API's audit stream with the token's name.
    client = redis.Redis.from_url(stack.fp.redis.url, decode_responses=True)
    audit = [f for _, f in client.xrange(f"{stack.fp.prefix}:api:audit")
             if f.get("path", "").startswith(f"/maas/{name}/")]
    client.close()
    from_maas = [f for f in audit if f["system_id"] == "x7kq3p"]  # maas_drive's POSTs
    assert {f["path"] for f in from_maas} == {f"/maas/{name}/on", f"/maas/{name}/off"}, audit
    assert all(f["who"] == "api:maas" and f["status"] == "202" for f in from_maas), from_maas


def test_tokens_on_the_running_api(stack: ApiStack) -> None:
    assert stack.request("GET", "/v1/jobs").status == 401
    assert stack.request("POST", "/maas/x/on").status == 401
    assert stack.request("GET", "/v1/jobs", token="pqt.ops.wrong").status == 401
    assert stack.request("GET", "/v1/jobs", basic="viewer").status == 200
    assert stack.request("GET", f"/maas/{stack.nodes[0].name}/query", basic="maas").status == 200
    assert stack.as_("viewer", "POST", "/maas/x/on").status == 403

    out = stack.fp.pq("token", "add", "shortlived", "--json")
    token = json.loads(out.stdout)["token"]
    assert stack.request("GET", "/v1/jobs", token=token).status == 200
    assert stack.fp.pq("token", "revoke", "shortlived").returncode == 0
    assert stack.request("GET", "/v1/jobs", token=token).status == 401
    listed = stack.fp.pq("token", "list", "--json").stdout
    assert not any(t in listed for t in stack.tokens.values())


def test_every_documented_path_answers_as_documented(stack: ApiStack) -> None:
    stack.load()
    schema = stack.request("GET", "/openapi.json").json()
    node = stack.nodes[0].name
    job = stack.as_("ops", "POST", "/v1/jobs", body={"action": "query", "nodes": node}).json()["job"]
    good = {
        ("post", "/v1/jobs"): ("POST", "/v1/jobs", {"action": "query", "nodes": node, "dry_run": True}),
        ("get", "/v1/jobs"): ("GET", "/v1/jobs?limit=3", None),
        ("get", "/v1/jobs/{job_id}"): ("GET", f"/v1/jobs/{job['id']}?limit=1", None),
        ("post", "/v1/jobs/{job_id}/cancel"): ("POST", f"/v1/jobs/{job['id']}/cancel", None),
        ("get", "/v1/nodes"): ("GET", "/v1/nodes?nodes=@rack:fp", None),
        ("get", "/v1/nodes/{name}/history"): ("GET", f"/v1/nodes/{node}/history", None),
        ("post", "/v1/inventory"): ("POST", "/v1/inventory?check=true",
                                    {"nodes": [n.inventory_entry() for n in stack.nodes]}),
        ("post", "/maas/{node}/on"): ("POST", f"/maas/{node}/on", None),
        ("post", "/maas/{node}/off"): ("POST", f"/maas/{node}/off", None),
        ("get", "/maas/{node}/query"): ("GET", f"/maas/{node}/query", None),
    }
    bad = {
        ("post", "/v1/jobs"): ("POST", "/v1/jobs", {"action": "on", "nodes": "nope"}),
        ("get", "/v1/jobs"): ("GET", "/v1/jobs?limit=-1", None),
        ("get", "/v1/jobs/{job_id}"): ("GET", "/v1/jobs/no-such-job", None),
        ("post", "/v1/jobs/{job_id}/cancel"): ("POST", "/v1/jobs/no-such-job/cancel", None),
        ("get", "/v1/nodes"): ("GET", "/v1/nodes?nodes=x[", None),
        ("get", "/v1/nodes/{name}/history"): ("GET", "/v1/nodes/nope/history", None),
        ("post", "/v1/inventory"): ("POST", "/v1/inventory", {"nodes": [{"name": "x"}]}),
        ("post", "/maas/{node}/on"): ("POST", "/maas/nope/on", None),
        ("post", "/maas/{node}/off"): ("POST", "/maas/nope/off", None),
        ("get", "/maas/{node}/query"): ("GET", "/maas/nope/query", None),
    }
    documented = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    assert documented == set(good) == set(bad)
    before = stack.as_("root", "GET", "/v1/nodes").json()["total"]
    for key in sorted(documented):
        for table, ok in ((good, True), (bad, False)):
            method, path, body = table[key]
            reply = stack.as_("root", method, path, body=body)
            assert str(reply.status) in schema["paths"][key[1]][key[0]]["responses"], (key, reply)
            if ok:
                assert reply.status < 300, (key, reply.body)
            else:
                assert 400 <= reply.status < 500, (key, reply.body)
                assert set(reply.json()["error"]) == {"code", "message", "problems"}
    assert stack.as_("root", "GET", "/v1/nodes").json()["total"] == before  # check=true stored nothing
    stack.wait_job(job["id"])
