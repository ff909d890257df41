"""The live fleet page in headless Chromium (Debian's ``chromium``, driven over the Chrome
DevTools protocol with websocket-client) against a running stack: the session's Redis and
rack worker (``fullpath``), simulated IPMI BMCs (pyghmi) and a real ``powerq api``.

The page is loaded, given a read token through its form, and must draw one cell per node in
its rack with its state's class; a node powered on through the CLI must turn green without a
reload; a screenshot's pixels must have the page's colours. ``POWERQ_UPDATE_SCREENSHOT=1``
also writes the screenshot to docs/fleet-page.png (for the README)."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import websocket
from PIL import Image

from scheduler.store import Store
from tests.conftest import ROOT
from tests.fullpath import FullPath
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode, free_port

pytestmark = pytest.mark.integration

PASSWORD = "ipmi-fleet-Passw0rd"
CSS = ROOT / "scheduler" / "static" / "fleet.css"
SCREENSHOT = ROOT / "docs" / "fleet-page.png"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0", "--window-size=1000,300", "--hide-scrollbars",
)


def page_colours() -> dict[str, tuple[int, int, int]]:
    """The state colours the page's style sheet declares (``--on: #2e9d4a;``)."""
    found = dict(re.findall(r"--(on|off|unknown|error):\s*#([0-9a-fA-F]{6})", CSS.read_text()))
    assert set(found) == {"on", "off", "unknown", "error"}, found
    return {k: (int(v[0:2], 16), int(v[2:4], 16), int(v[4:6], 16)) for k, v in found.items()}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}: last {value!r}"
        time.sleep(0.1)


class Browser:
    """Headless Chromium with a fresh profile, one page driven over the DevTools protocol."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("chromium")
        assert exe, "Debian's chromium is not installed (deploy/bootstrap.sh installs it)"
        profile = workdir / "profile"
        profile.mkdir()
        self.log = workdir / "chromium.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                          "about:blank"], stdout=logf, stderr=subprocess.STDOUT)
        active = profile / "DevToolsActivePort"
        wait_for("chromium's DevTools port", lambda: active.exists() and active.read_text().strip()
                 or self.proc.poll() is not None, 30)
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        port = active.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30,
                                              suppress_origin=True)
        self.ids = itertools.count(1)
        self.console: list[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1000, height=300,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(message["params"]["exceptionDetails"]))
            if message.get("id") == ident:
                assert "error" not in message, (method, message["error"])
                return dict(message.get("result", {}))

    def js(self, expression: str) -> Any:
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        assert "exceptionDetails" not in out, out["exceptionDetails"]
        return out["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Stack:
    fp: FullPath
    fleet: ipmi_bmc.IpmiFleet
    nodes: list[SimNode]
    url: str
    token: str
    log: Path


@pytest.fixture(scope="module")
def stack(fullpath: FullPath, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("fleet-page"))
    nodes = ipmi_bmc.make_nodes(6, "fp", first_address="127.38.0.1", prefix="fleet",
                                password=PASSWORD)
    fleet = ipmi_bmc.start_fleet(nodes, workdir)
    fullpath.pq("token", "revoke", "fleetview")
    out = fullpath.pq("token", "add", "fleetview", "--scope", "read", "--json")
    assert out.returncode == 0, out.stderr
    token = json.loads(out.stdout)["token"]
    port = free_port()
    log = workdir / "api.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "api", "--port", str(port)],
            env={**fullpath.env, "POWERQ_FLEET_SNAPSHOT_EVERY": "30", "POWERQ_FLEET_FRESH_AGE": "120",
                 "POWERQ_FLEET_STALE_AGE": "600"},
            cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url + "/fleet", timeout=5) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        wait_for("powerq api", up, 30)
        yield Stack(fullpath, fleet, nodes, url, token, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        fleet.stop()
    text = log.read_text(errors="replace")  # the API's own log: no token, no BMC password
    assert token not in text and PASSWORD not in text


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path)
    yield b
    b.close()


def synthetic_racks(fp: FullPath) -> tuple[list[dict[str, Any]], Callable[[], dict[str, str]]]:
    """Five more racks of 40 nodes no worker serves (never contacted), for a fleet-sized
    picture and for age shading: their states are written to the store as a poll would,
    rack r05 read 20 minutes ago (stale), r04 5 minutes ago (aging), the others fresh.
    Returns the inventory entries and a function writing the states (node -> class)."""
    entries = []
    for r, i in itertools.product(range(1, 6), range(1, 41)):
        entries.append({"name": f"r{r:02d}-n{i:02d}", "rack": f"r{r:02d}", "power_type": "ipmi",
                        "power_parameters": {"power_address": f"127.38.{10 + r}.{i}", "power_user": "admin",
                                             "power_pass": PASSWORD}})

    def write() -> dict[str, str]:
        rng = random.Random(7)
        now = time.time()
        client = redis.Redis.from_url(fp.redis.url, decode_responses=True)
        store = Store(client, fp.prefix)
        classes, results = {}, []
        for entry in entries:
            rack = int(entry["rack"][1:])
            at = now - {4: 300, 5: 1200}.get(rack, rng.uniform(0, 20))
            roll = rng.random()
            state = "off" if roll < 0.2 else "unknown" if roll < 0.24 else "on"
            error = {"code": "timeout", "kind": "transient", "message": "no answer in 3 s"} \
                if 0.24 <= roll < 0.27 else None
            results.append({"node": entry["name"], "action": "query", "outcome": "error" if error else "ok",
                            "state_before": None, "state_after": None if error else state, "error": error,
                            "attempts": 1, "started": at, "finished": at, "worker": "test", "note": "",
                            "power_type": "ipmi"})
            shade = {4: "aging", 5: "stale"}.get(rack, "fresh")
            classes[entry["name"]] = ("error" if error else state) + " " + ("" if error else shade)
        store.record_results(None, results)
        client.close()
        return classes

    return entries, write


def cells(browser: Browser) -> dict[str, dict[str, Any]]:
    return {c["node"]: c for c in browser.js("""
        [...document.querySelectorAll('.cell')].map(c => {
          const r = c.getBoundingClientRect();
          return {node: c.dataset.node, rack: c.closest('.rack').dataset.rack,
                  cls: c.className.split(' '), x: r.x + r.width / 2, y: r.y + r.height / 2};
        })""")}


def test_fleet_page_live_in_chromium(stack: Stack, browser: Browser) -> None:
    names = [n.name for n in stack.nodes]
    good = stack.nodes[0].inventory_entry()
    wrong = {**good, "name": "fleet-fp-wrongpw",
             "power_parameters": {**good["power_parameters"], "power_pass": "not-the-password",
                                  "mac_address": "52:54:00:aa:38:01"}}
    never = {**good, "name": "fleet-fp-never",
             "power_parameters": {**good["power_parameters"], "power_address": "127.38.9.9",
                                  "mac_address": "52:54:00:aa:38:02"}}
    extra, write_states = synthetic_racks(stack.fp)
    stack.fp.load([n.inventory_entry() for n in stack.nodes] + [wrong, never] + extra)
    shaded = write_states()
    for i, name in enumerate(names):
        stack.fleet.set_state(name, "on" if i % 2 == 0 else "off")
    job = stack.fp.run("query", ",".join([*names, "fleet-fp-wrongpw"]))
    assert job["by_node"]["fleet-fp-wrongpw"]["error"]["code"] == "auth_failed", job
    want = {n: ("on" if i % 2 == 0 else "off") for i, n in enumerate(names)}
    want["fleet-fp-wrongpw"] = "error"
    want["fleet-fp-never"] = "unknown"

    # The page loads without a token and asks for one.
    browser.call("Page.navigate", url=stack.url + "/fleet")
    wait_for("the token form", lambda: browser.js(
        "document.readyState === 'complete' && !document.getElementById('login').hidden"))
    assert browser.js("document.querySelectorAll('.cell').length") == 0
    browser.js(f"""(() => {{
        document.getElementById('token').value = {json.dumps(stack.token)};
        document.getElementById('login').requestSubmit();
        window.loadedOnce = 'yes';  // gone if the page reloads
    }})()""")
    wait_for("the first snapshot", lambda: browser.js("document.body.dataset.snapshots"))
    assert browser.js("document.getElementById('status').dataset.status") == "live"
    assert browser.js("document.getElementById('token').value") == ""
    assert stack.token not in browser.js("document.documentElement.outerHTML")

    # One cell per node, in its rack, with its state's class and age shade; the header
    # counts them.
    drawn = cells(browser)
    assert set(drawn) == set(want) | set(shaded)
    for name, state in want.items():
        assert drawn[name]["rack"] == "fp"
        assert state in drawn[name]["cls"], (name, drawn[name])
        assert "stale" not in drawn[name]["cls"] and "aging" not in drawn[name]["cls"], drawn[name]
    assert "never" in drawn["fleet-fp-never"]["cls"]
    for name, classes in shaded.items():
        assert drawn[name]["rack"] == name[:3]
        assert set(classes.split()) <= set(drawn[name]["cls"]), (name, classes, drawn[name])
    racks = browser.js("[...document.querySelectorAll('.rack')].map(r => r.dataset.rack)")
    assert racks == ["fp", "r01", "r02", "r03", "r04", "r05"]
    counts = browser.js("""Object.fromEntries(['on', 'off', 'unknown', 'error', 'total'].map(
        k => [k, Number(document.getElementById('count-' + k).textContent)]))""")
    expect = {"on": 3, "off": 3, "unknown": 1, "error": 1, "total": 208}
    for classes in shaded.values():
        expect[classes.split()[0]] += 1
    assert counts == expect
    assert browser.js("document.getElementById('age-max').textContent") == "20 min"

    # Hover shows the state, its age and the last error.
    title = browser.js("""(() => {
        const c = document.querySelector('[data-node="fleet-fp-wrongpw"]');
        c.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
        return c.title; })()""")
    assert "last error: auth_failed" in title and " ago" in title, title
    assert PASSWORD not in title

    # Power a node on through the CLI: its cell turns green live, without a reload.
    target = names[1]
    assert "off" in drawn[target]["cls"]
    changes = int(browser.js("document.body.dataset.changes || 0"))
    job = stack.fp.run("on", target)
    assert job["by_node"][target]["outcome"] == "ok", job
    wait_for(f"{target} drawn on", lambda: "on" in cells(browser)[target]["cls"], 10)
    assert int(browser.js("document.body.dataset.changes || 0")) > changes  # a change event,
    assert browser.js("document.body.dataset.snapshots") == "1"  # not the 30 s snapshot
    assert browser.js("window.loadedOnce") == "yes"
    want[target] = "on"

    # The screenshot has the page's colours where the cells are.
    png = browser.screenshot()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (1000, 300)
    colours = page_colours()
    opacity = {"fresh": 1.0, "aging": 0.6, "stale": 0.3}  # fleet.css, over the white page
    drawn = cells(browser)
    expected = {n: (s, "fresh") for n, s in want.items() if n != "fleet-fp-never"}  # hatched
    expected.update({n: (c.split()[0], c.split()[1] if " " in c.strip() else "fresh")
                     for n, c in shaded.items()})
    for name, (state, shade) in expected.items():
        colour = tuple(round(c * opacity[shade] + 255 * (1 - opacity[shade])) for c in colours[state])
        pixel = image.getpixel((round(drawn[name]["x"]), round(drawn[name]["y"])))
        assert all(abs(a - b) <= 3 for a, b in zip(pixel, colour, strict=True)), \
            (name, state, shade, pixel, colour)
    assert not browser.console, browser.console
    if os.environ.get("POWERQ_UPDATE_SCREENSHOT"):
        SCREENSHOT.write_bytes(png)
