"""The fleet page's routes in process (FastAPI's TestClient) against a real Redis: the page
and its files load without a token, the event stream needs a read token and sends a layout,
a snapshot and then the changes written to the store while it runs."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from drivers.errors import SettingsError
from scheduler.api import create_app
from scheduler.config import Config
from scheduler.fleetpage import check_fleet_config
from scheduler.store import Store
from scheduler.tokens import TokenStore
from tests.conftest import RedisServer

PASSWORD = "Fleet-page-Passw0rd"


class NoDispatch:
    def missing(self, racks: Any) -> list[str]:
        return []

    def send(self, job_id: str, plan: Any) -> int:
        raise AssertionError("the fleet page never sends work")


@dataclass
class Fleet:
    client: TestClient
    store: Store
    tokens: dict[str, str]

    def bearer(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def events(self, headers: dict[str, str], during: Any = None) -> tuple[list[tuple[str, Any]], str]:
        """Every event of one stream (it ends after fleet_stream_seconds); ``during`` runs
        in a thread once the stream has started."""
        out: list[tuple[str, Any]] = []
        raw: list[str] = []
        with self.client.stream("GET", "/fleet/events", headers=headers) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            started = False
            for line in response.iter_lines():
                raw.append(line)
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    out.append((str(event), json.loads(line.removeprefix("data: "))))
                    if event == "snapshot" and not started and during is not None:
                        started = True
                        threading.Thread(target=during, daemon=True).start()
        return out, "\n".join(raw)


def result(node: str, state: str | None, *, error: dict[str, str] | None = None,
           finished: float | None = None) -> dict[str, Any]:
    now = finished or time.time()
    return {"node": node, "action": "query", "outcome": "error" if error else "ok",
            "state_before": None, "state_after": state, "error": error, "attempts": 1,
            "started": now, "finished": now, "worker": "test", "note": "", "power_type": "ipmi"}


@pytest.fixture()
def fleet(redis_server: RedisServer, prefix: str, secret_key: str) -> Iterator[Fleet]:
    config = Config.from_env({}, redis_url=redis_server.url, key_prefix=prefix, secret_key=secret_key,
                             fleet_stream_seconds=1.5, fleet_snapshot_every=0.6,
                             fleet_fresh_age=30, fleet_stale_age=600)
    store = Store.from_config(config)
    tokens = TokenStore(store.client, prefix)
    issued = {scope: tokens.add(scope, scope) for scope in ("read", "admin")}
    client = TestClient(create_app(config, dispatcher=NoDispatch(), store=store))
    nodes = [{"name": f"n{i}", "rack": "r2" if i > 3 else "r1", "power_type": "ipmi",
              "power_parameters": {"power_address": f"127.40.1.{i}", "power_user": "admin",
                                   "power_pass": PASSWORD}} for i in (10, 2, 1, 4, 5)]
    out = client.post("/v1/inventory", json={"nodes": nodes}, headers={
        "Authorization": f"Bearer {issued['admin']}"})
    assert out.status_code == 200, out.text
    yield Fleet(client, store, issued)
    store.client.close()


def test_page_and_files_load_without_a_token(fleet: Fleet) -> None:
    page = fleet.client.get("/fleet")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    assert '<script src="/fleet/static/fleet.js"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    script = fleet.client.get("/fleet/static/fleet.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    # the token goes in a header through fetch() (EventSource cannot send one), never a URL
    assert "sessionStorage" in script.text and '"Bearer " + token' in script.text
    assert "new EventSource" not in script.text and "?token" not in script.text
    css = fleet.client.get("/fleet/static/fleet.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    missing = fleet.client.get("/fleet/static/../api.py")
    assert missing.status_code == 404
    missing = fleet.client.get("/fleet/static/secret.key")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_fleet_routes_are_not_in_the_schema(fleet: Fleet) -> None:
    paths = fleet.client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/fleet")]


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer pqt.read.wrong"},
    {"Authorization": "Basic " + base64.b64encode(b"read:nope").decode()},
    {"Authorization": "Basic !!!"},
])
def test_events_need_a_token(fleet: Fleet, headers: dict[str, str]) -> None:
    out = fleet.client.get("/fleet/events", headers=headers)
    assert out.status_code == 401
    assert out.json()["error"]["code"] == "unauthorized"
    assert "Bearer" in out.headers["www-authenticate"]


def test_events_with_basic_auth(fleet: Fleet) -> None:
    pair = f"read:{fleet.tokens['read']}".encode()
    events, _ = fleet.events({"Authorization": "Basic " + base64.b64encode(pair).decode()})
    assert events[0][0] == "layout"


def test_stream_sends_layout_snapshot_then_changes(fleet: Fleet) -> None:
    old = time.time() - 100
    fleet.store.record_results(None, [result("n1", "on", finished=old), result("n2", "off")])

    def later() -> None:
        time.sleep(0.2)
        fleet.store.record_results("job-1", [result("n1", "off")])
        fleet.store.record_results(None, [result("n5", None, error={
            "code": "auth_failed", "kind": "fatal", "message": "the BMC refused the credentials"})])

    events, raw = fleet.events(fleet.bearer("read"), during=later)
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["layout", "snapshot"], kinds
    layout = events[0][1]
    assert [r["name"] for r in layout["racks"]] == ["r1", "r2"]
    order = [n[0] for r in layout["racks"] for n in r["nodes"]]
    assert order == ["n1", "n2", "n4", "n5", "n10"]  # natural order, rack by rack
    assert layout["racks"][0]["nodes"][0] == ["n1", "ipmi", ""]
    assert (layout["fresh"], layout["stale"]) == (30, 600)

    snap = events[1][1]
    assert snap["state"] == "nf---"
    assert 99 <= snap["age"][0] <= 102 and 0 <= snap["age"][1] <= 2 and snap["age"][2] == -1
    assert snap["errors"] == {}

    changes: dict[str, Any] = {}
    for kind, data in events[2:]:
        if kind == "change":
            changes.update(data["nodes"])
    assert changes["0"][0] == "f" and changes["0"][1] <= 1, changes  # n1 now off, just read
    assert changes["3"][0] == "-", changes  # n5: never read, but its call failed
    assert changes["3"][2][:2] == ["auth_failed", "the BMC refused the credentials"]
    # the periodic snapshot (every 0.6 s) agrees with the changes
    last = [d for k, d in events if k == "snapshot"][-1]
    assert len([k for k in kinds if k == "snapshot"]) >= 2, kinds
    assert last["state"] == "ff---" and last["errors"]["3"][0] == "auth_failed"
    assert PASSWORD not in raw and not any(t in raw for t in fleet.tokens.values())


def test_a_burst_is_sent_as_a_snapshot(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("scheduler.fleetpage.CHANGE_LIMIT", 2)

    def burst() -> None:  # three events at once (one transaction), as a rack power-on
        time.sleep(0.1)
        pipe = fleet.store.client.pipeline(transaction=True)
        for name in ("n1", "n2", "n4"):
            pipe.hset(f"{fleet.store.prefix}:state", name, json.dumps(
                {"state": "on", "at": time.time(), "job": "j", "error": None}))
            pipe.xadd(f"{fleet.store.prefix}:events", {"kind": "state", "node": name, "new": "on"})
        pipe.execute()

    events, _ = fleet.events(fleet.bearer("read"), during=burst)
    assert not [d for k, d in events if k == "change"], events
    assert [d for k, d in events if k == "snapshot"][1]["state"] == "nnn--"


def test_reloaded_inventory_sends_a_new_layout(fleet: Fleet) -> None:
    def reload() -> None:
        time.sleep(0.2)
        nodes = [{"name": "solo", "rack": "r9", "power_type": "ipmi", "power_parameters": {
            "power_address": "127.40.1.99", "power_user": "admin", "power_pass": PASSWORD}}]
        out = fleet.client.post("/v1/inventory", json={"nodes": nodes},
                                headers=fleet.bearer("admin"))
        assert out.status_code == 200

    events, _ = fleet.events(fleet.bearer("read"), during=reload)
    layouts = [d for k, d in events if k == "layout"]
    assert len(layouts) == 2 and layouts[1]["racks"] == [{"name": "r9", "nodes": [["solo", "ipmi", ""]]}]
    after = events.index(("layout", layouts[1]))
    assert events[after + 1][0] == "snapshot" and events[after + 1][1]["state"] == "-"


def test_page_files_are_package_data() -> None:
    import tomllib

    from scheduler.fleetpage import STATIC_FILES
    from tests.conftest import ROOT

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "static/*" in pyproject["tool"]["setuptools"]["package-data"]["scheduler"]
    for name in [*STATIC_FILES, "fleet.html"]:
        assert (ROOT / "scheduler" / "static" / name).is_file(), name


def test_fleet_options_are_checked() -> None:
    with pytest.raises(SettingsError, match="FLEET_FRESH_AGE"):
        check_fleet_config(Config(fleet_fresh_age=100, fleet_stale_age=10))
    with pytest.raises(SettingsError, match="FLEET_SNAPSHOT_EVERY"):
        check_fleet_config(Config(fleet_snapshot_every=0))
