"""The CLI's power commands under arbitrary node sets and options, against a Redis of
this module's own with a loaded inventory and no worker: every request is refused with
exit 2 and a structured message (``error [code]: ...``, ``--json`` ``{"error": {code,
message}}``, or click's own ``Error:`` usage line), never a traceback, and afterwards
Redis holds no job and no rack-queue message. ``--dry-run`` may succeed: it sends nothing.

Runs in-process with click's CliRunner (fast); the Celery app, the Redis store and the
worker inspection are the real ones.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet
from hypothesis import event, given, settings
from hypothesis import strategies as st

from scheduler.cli import main
from tests.conftest import RedisServer
from tests.property.conftest import examples
from tests.property.strategies import names, odd_text

INVENTORY = {
    "budgets": {"rack": {"max_starts": 2, "window": "1s"}},
    "nodes": [
        *({"name": f"n{i}", "rack": f"r{i % 3}", "power_type": "ipmi", "tags": ["gpu"] if i % 4 == 0 else [],
           "power_parameters": {"power_address": f"10.0.0.{i}", "power_pass": "ZkCliSecret01Qx"}}
          for i in range(1, 13)),
        *({"name": f"m{i}", "rack": "lab", "power_type": "manual"} for i in range(1, 4)),
        {"name": "rf1", "rack": "r1", "power_type": "redfish",
         "power_parameters": {"power_address": "https://10.1.0.1", "power_user": "u",
                              "power_pass": "ZkCliSecret02Qx"}},
    ],
}


class Env:
    def __init__(self, server: RedisServer, prefix: str, workdir: Path) -> None:
        self.client = redis.Redis.from_url(server.url, decode_responses=True)
        self.prefix = prefix
        self.workdir = workdir
        self.env = {
            "POWERQ_REDIS_URL": server.url,
            "POWERQ_BROKER_URL": "",
            "POWERQ_KEY_PREFIX": prefix,
            "POWERQ_SECRET_KEY": Fernet.generate_key().decode(),
            "POWERQ_INSPECT_TIMEOUT": "0.05",
            "POWERQ_CONFIRM_THRESHOLD": "3",
            "POWERQ_MAX_NODES": "8",
            "POWERQ_LOG_FORMAT": "text",
        }
        self.runner = CliRunner()

    def invoke(self, args: list[str]) -> Result:
        return self.runner.invoke(main, args, env=self.env, catch_exceptions=True)

    def snapshot(self) -> set[str]:
        return set(self.client.keys("*"))


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("cli-fuzz")
    server = RedisServer(workdir)
    server.start()
    try:
        env = Env(server, f"pqfz-{uuid.uuid4().hex[:6]}", workdir)
        path = workdir / "inventory.yaml"
        path.write_text(yaml.safe_dump(INVENTORY))
        loaded = env.invoke(["inventory", "load", str(path)])
        assert loaded.exit_code == 0, loaded.output
        yield env
        env.client.close()
    finally:
        server.stop()


def _forbidden(env: Env, keys: set[str]) -> list[str]:
    """Keys a refused request must not leave: a job record, the job list, results, or
    anything of a rack queue (its messages, or its kombu binding)."""
    bad = []
    for key in keys:
        if key.startswith(f"{env.prefix}:job") or "powerq.rack" in key:
            bad.append(key)
        elif env.client.type(key) == "list" and env.client.llen(key) and "pidbox" not in key:
            bad.append(key)
    return bad


def check(env: Env, args: list[str]) -> Result:
    before = env.snapshot()
    result = env.invoke(args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{args!r} crashed: {result.exception!r}\n{result.output}"
    )
    assert "Traceback" not in result.output, result.output
    for secret in ("ZkCliSecret01Qx", "ZkCliSecret02Qx"):
        assert secret not in result.output
    dry = "--dry-run" in args
    helped = any(a in ("-h", "--help") for a in args)
    if result.exit_code == 0:
        assert dry or helped, f"{args!r} was accepted with no worker: {result.output}"
    else:
        assert result.exit_code == 2, f"{args!r}: exit {result.exit_code}\n{result.output}"
        _structured(args, result)
    after = env.snapshot()
    assert not _forbidden(env, after), f"{args!r} left {sorted(_forbidden(env, after))}"
    assert not _forbidden(env, after - before)
    return result


def _structured(args: list[str], result: Result) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if lines and (lines[0].startswith("Usage:") or lines[0].startswith("Error: ")):
        assert any(line.startswith("Error: ") for line in lines), result.stderr
        return  # click refused the command line itself (a usage error: exit 2)
    if "--json" in args:
        try:
            body = json.loads(result.stdout)
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" in body:
            error = body["error"]
            assert isinstance(error.get("code"), str) and error["code"]
            assert isinstance(error.get("message"), str) and error["message"]
            return
    assert lines and lines[0].startswith("error ["), (
        f"{args!r}: unstructured refusal\n{result.output}"
    )


VALID_SETS = st.sampled_from(["@all", "n[1-12]", "n1", "rf1", "@rack:r1", "@tag:gpu", "@type:ipmi",
                              "n[1-3],rf1", "@all!@rack:lab", "@rack:r[0-2]"])
nodesets = st.one_of(
    VALID_SETS, VALID_SETS, VALID_SETS,
    st.sampled_from(["@all", "n[1-12]", "n1", "m1", "rf1", "@rack:lab", "@rack:r1", "@tag:gpu",
                     "@type:ipmi", "@type:manual", "n[1-3],m1", "@all!@rack:lab", "n[1-99]",
                     "x", "", " ", "@rack:nope", "n[3-1]", "n[", "@", "n1,,n2", "-n1", "--",
                     "n[1-99999999]", "n1!n1", "@all&@type:redfish"]),
    names, odd_text,
)
ACTIONS = ["on", "off", "cycle", "query", "boot", "enlist"]
values_for = st.one_of(st.sampled_from(["0", "-1", "5", "pxe", "disk", "powerq", "nan", "1e999", "0.01", "x", "", "pxe",
                                        "floppy", "root", "a" * 40, "x.png"]), odd_text)
COMMON = [["--json"], ["--dry-run"], ["--yes"], ["-y"], ["--wait"], ["-w"]]
PER_ACTION = {
    "on": [["--plot"]],
    "off": [["--soft"], ["--force"]],
    "cycle": [["--soft"], ["--force"], ["--plot"]],
    "query": [],
    "boot": [["--device"], ["--efi"], ["--persistent"]],
    "enlist": [["--username"]],
}
TAKES_VALUE = {"--plot", "--device", "--username", "--timeout"}


@st.composite
def options(draw: st.DrawFn, action: str) -> list[str]:
    """Mostly the action's own options (with odd values), sometimes a stray token."""
    units = COMMON + PER_ACTION[action] + [["--timeout"]]
    out: list[str] = []
    for unit in draw(st.lists(st.sampled_from(units), max_size=5)):
        out.extend(unit)
        if unit[0] in TAKES_VALUE:
            out.append(draw(values_for))
    if draw(st.integers(0, 9)) == 0:
        out.insert(draw(st.integers(0, len(out))), draw(st.one_of(
            st.sampled_from(["--nope", "--json=1", "--", "-"]), odd_text)))
    return out


@settings(max_examples=examples(0.75))
@given(data=st.data(), action=st.sampled_from(ACTIONS), nodeset=nodesets, last=st.booleans())
def test_power_commands(cli: Env, data: st.DataObject, action: str, nodeset: str,
                        last: bool) -> None:
    opts = data.draw(options(action), label="options")
    if "--plot" in opts and "--dry-run" in opts:  # drawing a PNG is slow and not bad input
        opts.remove("--dry-run")
    args = [action, *opts, nodeset] if last else [action, nodeset, *opts]
    result = check(cli, args)
    reason = "usage" if "Error: " in result.stderr else "no worker" if "no worker" in result.output \
        else "dry run" if result.exit_code == 0 else "refused"
    event(reason)


@pytest.mark.parametrize("action", ACTIONS)
def test_every_action_is_refused_without_workers(cli: Env, action: str) -> None:
    """Valid requests too: no worker consumes the racks, so nothing is recorded or sent."""
    extra = ["--yes", "--force"] if action in ("off", "cycle") else []
    result = check(cli, [action, "@type:ipmi", *extra, "--json"])
    assert result.exit_code == 2
    body: dict[str, Any] = json.loads(result.stdout)
    assert body["error"]["code"] == "bad_request"
    assert "no worker" in body["error"]["message"]


@pytest.mark.parametrize("args", [
    ["boot", "m1", "--device", "pxe"],
    ["enlist", "@type:manual"],
    ["off", "@all"],
    ["off", "@all", "--yes"],
    ["cycle", "n[1-12]", "--yes", "--json"],
    ["on", "n1", "--plot", "x.png"],
    ["enlist", "n1", "--username", "bad name"],
    ["on", "n[1-5]", "--dry-run", "--json"],
])
def test_refusals(cli: Env, args: list[str]) -> None:
    check(cli, args)
