"""The inventory file, its secrets, and its Redis store (scheduler/inventory.py, secrets.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from drivers import registry
from drivers.base import Capabilities, DriverSettings, PowerDriver, PowerState, param
from drivers.errors import SettingsError
from scheduler.budget import Budget, Budgets
from scheduler.config import Config
from scheduler.inventory import (
    Inventory,
    InventoryError,
    InventoryNode,
    InventoryStore,
    NodeInfo,
    load_inventory,
)
from scheduler.nodeset import NodeSetError
from scheduler.secrets import SecretBox, generate_key, load_keys
from tests.conftest import RedisServer

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "inventory.example.yaml"

# Values that must never be seen in clear outside memory.
SECRETS = ("inline-Pa55", "env-Pa55", "file-Pa55", "kg-Pa55", "def-Pa55")


# --------------------------------------------------------------------------- test drivers


class _Bmc(DriverSettings):
    power_address: str = param(description="BMC address")
    power_user: str = param("", description="user")
    power_pass: SecretStr = param(description="password", secret=True)
    k_g: SecretStr | None = param(None, description="BMC key", secret=True)
    slot: int = param(0, description="slot in the chassis", scope="node")


class _NoDevice(PowerDriver):
    def power_on(self) -> None: ...

    def power_off(self, soft: bool = False) -> None: ...

    def power_cycle(self) -> None: ...

    def query(self) -> PowerState:
        return PowerState.UNKNOWN


@registry.register
class InvBmcDriver(_NoDevice):
    power_type = "test-inv-bmc"
    description = "test-only BMC with a secret and a node-scoped field"
    settings_model = _Bmc
    capabilities = Capabilities(power_query=True)


class _Buggy(DriverSettings):
    power_address: str = param(description="address")


@registry.register
class InvBuggyDriver(_NoDevice):
    power_type = "test-inv-buggy"
    description = "test-only driver whose validate has a bug"
    settings_model = _Buggy

    @classmethod
    def validate(cls, params: Any) -> DriverSettings:
        raise ZeroDivisionError("secret-in-bug-text")


@pytest.fixture(autouse=True)
def _builtins_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drivers written alongside may not import yet: fall back to manual + test drivers."""
    import drivers.manual  # noqa: F401

    try:
        registry.all_drivers()
    except ImportError:
        monkeypatch.setattr(registry, "_loaded", True)


# --------------------------------------------------------------------------- helpers


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def env() -> dict[str, str]:
    return {"BMC_PASS": "env-Pa55", "DEF_PASS": "def-Pa55"}


@pytest.fixture
def good(tmp_path: Path) -> Path:
    write(tmp_path / "secrets.yaml", 'n3-pass: "file-Pa55"\nkg: kg-Pa55\n')
    return write(
        tmp_path / "inventory.yaml",
        """\
        secrets_file: secrets.yaml
        defaults:
          test-inv-bmc:
            power_user: admin
            power_pass: {env: DEF_PASS}
        nodes:
          - name: n1
            rack: r1
            power_type: test-inv-bmc
            power_parameters: {power_address: 10.0.0.1, power_pass: inline-Pa55, slot: 1}
            tags: [gpu, prod]
          - name: n2
            rack: r1
            power_type: test-inv-bmc
            power_parameters: {power_address: 10.0.0.2, power_pass: {env: BMC_PASS}}
          - name: n3
            rack: r2
            power_type: test-inv-bmc
            power_parameters:
              power_address: 10.0.0.3
              power_pass: {file: n3-pass}
              k_g: {file: kg}
            tags: [prod]
          - name: n4
            rack: r2
            power_type: test-inv-bmc
            power_parameters: {power_address: 10.0.0.4}
          - name: m1
            rack: r2
            power_type: manual
        """,
    )


@pytest.fixture
def inventory(good: Path, env: dict[str, str]) -> Inventory:
    return load_inventory(good, environ=env)


def problem_keys(err: InventoryError) -> set[tuple[str, str]]:
    return {(p["node"], p["field"]) for p in err.problems}


def assert_no_secret(text: str) -> None:
    for value in SECRETS:
        assert value not in text


# --------------------------------------------------------------------------- loading


def test_load_resolves_inline_env_file_and_default_secrets(inventory: Inventory) -> None:
    n1, n2, n3, n4 = (inventory.nodes[n] for n in ("n1", "n2", "n3", "n4"))
    assert n1.params == {
        "power_address": "10.0.0.1",
        "power_user": "admin",
        "power_pass": "inline-Pa55",
        "slot": 1,
    }
    assert n1.tags == ("gpu", "prod") and n1.rack == "r1"
    assert n2.params["power_pass"] == "env-Pa55"
    assert n3.params["power_pass"] == "file-Pa55" and n3.params["k_g"] == "kg-Pa55"
    assert n4.params["power_pass"] == "def-Pa55"  # from defaults, via the environment
    assert n3.secret_fields == {"power_pass", "k_g"}
    assert inventory.nodes["m1"].params == {}
    assert isinstance(n3.settings(), _Bmc)  # the worker's path: params validate again
    for node in inventory.nodes.values():
        assert_no_secret(repr(node))
        assert_no_secret(json.dumps(node.public_dict()))
    assert n3.public_params()["k_g"] == "***"


def test_inventory_groups(inventory: Inventory) -> None:
    assert inventory.racks() == ["r1", "r2"]
    assert inventory.nodes_by_rack() == {"r1": ["n1", "n2"], "r2": ["m1", "n3", "n4"]}
    assert inventory.resolver("rack", "r1") == {"n1", "n2"}
    assert inventory.resolver("type", "manual") == {"m1"}
    assert inventory.resolver("tag", "prod") == {"n1", "n3"}
    assert inventory.resolver("all", "") == {"n1", "n2", "n3", "n4", "m1"}
    assert inventory.expand("@tag:prod,@rack:r[1-2]!@type:test-inv-bmc") == ["m1"]
    assert inventory.expand("@all!n[2-3]") == ["m1", "n1", "n4"]
    with pytest.raises(NodeSetError, match="no node has rack 'r1x'"):
        inventory.expand("@all!@rack:r1x")  # a typo must never mean "everything"
    with pytest.raises(NodeSetError, match="unknown group kind 'pdu'"):
        inventory.expand("@pdu:p1")
    with pytest.raises(NodeSetError, match="needs a value"):
        inventory.expand("@rack")


def test_cli_secrets_path_wins_over_secrets_file(
    good: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    other = write(tmp_path / "other.yaml", "n3-pass: other-Pa55\nkg: k\n")
    inv = load_inventory(good, secrets_path=other, environ=env)
    assert inv.nodes["n3"].params["power_pass"] == "other-Pa55"


def test_secrets_file_values_are_strings(tmp_path: Path) -> None:
    write(tmp_path / "s.yaml", "pw: 0123\n")
    path = write(
        tmp_path / "inv.yaml",
        """\
        secrets_file: s.yaml
        nodes:
          - {name: a, rack: r, power_type: test-inv-bmc,
             power_parameters: {power_address: h, power_pass: {file: pw}}}
        """,
    )
    assert load_inventory(path, environ={}).nodes["a"].params["power_pass"] == "0123"


def test_every_invalid_node_is_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path / "s.yaml", "present: file-Pa55\n")
    path = write(
        tmp_path / "inv.yaml",
        """\
        secrets_file: s.yaml
        nodes:
          - {name: ok1, rack: r1, power_type: test-inv-bmc,
             power_parameters: {power_address: h1, power_pass: inline-Pa55}}
          - {name: "bad name", rack: r1, power_type: manual}
          - {name: dup, rack: r1, power_type: manual}
          - {name: dup, rack: r1, power_type: manual}
          - {name: norack, power_type: manual}
          - {name: badrack, rack: "r/1", power_type: manual}
          - {name: unknowntype, rack: r1, power_type: no-such-type}
          - {name: missing, rack: r1, power_type: test-inv-bmc, power_parameters: {power_user: u}}
          - {name: extra, rack: r1, power_type: test-inv-bmc,
             power_parameters: {power_address: h2, power_pass: inline-Pa55, colour: red}}
          - {name: noenv, rack: r1, power_type: test-inv-bmc,
             power_parameters: {power_address: h3, power_pass: {env: NOT_SET_ANYWHERE}}}
          - {name: nokey, rack: r1, power_type: test-inv-bmc,
             power_parameters: {power_address: h4, power_pass: {file: absent}}}
          - {name: badref, rack: r1, power_type: test-inv-bmc,
             power_parameters: {power_address: h5, power_pass: {vault: x}}}
          - {name: badtype, rack: r1, power_type: test-inv-bmc,
             power_parameters: {power_address: h6, power_pass: inline-Pa55, slot: many}}
          - {name: badtags, rack: r1, power_type: manual, tags: ["ok", "no way"]}
          - {name: typo, rack: r1, power_type: manual, power_paramters: {}}
          - {name: 123, rack: r1, power_type: manual}
          - just a string
          - {name: buggy, rack: r1, power_type: test-inv-buggy, power_parameters: {power_address: x}}
          - {name: ok2, rack: r1, power_type: manual}
        """,
    )
    with pytest.raises(InventoryError) as err:
        load_inventory(path, environ={})
    assert problem_keys(err.value) == {
        ("#2", "name"),
        ("dup", "name"),
        ("norack", "rack"),
        ("badrack", "rack"),
        ("unknowntype", "power_type"),
        ("missing", "power_address"),
        ("missing", "power_pass"),
        ("extra", "colour"),
        ("noenv", "power_pass"),
        ("nokey", "power_pass"),
        ("badref", "power_pass"),
        ("badtype", "slot"),
        ("badtags", "tags"),
        ("typo", "power_paramters"),
        ("#16", "name"),
        ("#17", ""),
        ("buggy", "power_parameters"),
    }
    reasons = {(p["node"], p["field"]): p["reason"] for p in err.value.problems}
    assert "NOT_SET_ANYWHERE" in reasons[("noenv", "power_pass")]
    assert "'absent' not found" in reasons[("nokey", "power_pass")]
    assert "entry #3" in reasons[("dup", "name")]
    assert "quote it" in reasons[("#16", "name")]
    assert "ZeroDivisionError" in reasons[("buggy", "power_parameters")]
    assert err.value.code == "bad_inventory"
    assert isinstance(err.value, SettingsError)
    text = str(err.value) + json.dumps(err.value.to_dict())
    assert "nothing loaded" in text and "17 problems" in text
    assert_no_secret(text)
    assert "secret-in-bug-text" not in text


def test_nothing_is_saved_when_any_node_is_invalid(
    good: Path, env: dict[str, str], tmp_path: Path, store: InventoryStore
) -> None:
    store.save(load_inventory(good, environ=env))
    before = store.node_index()
    with pytest.raises(InventoryError):
        store.save(load_inventory(good, environ={"BMC_PASS": "x"}))  # DEF_PASS missing
    assert store.node_index() == before


def test_defaults_are_checked(tmp_path: Path) -> None:
    path = write(
        tmp_path / "inv.yaml",
        """\
        defaults:
          test-inv-bmc: {slot: 3, colour: red, power_address: shared}
          no-such-type: {x: 1}
          manual: [1, 2]
        nodes:
          - {name: a, rack: r, power_type: test-inv-bmc, power_parameters: {power_pass: p}}
        """,
    )
    with pytest.raises(InventoryError) as err:
        load_inventory(path, environ={})
    assert problem_keys(err.value) == {
        ("(defaults)", "defaults.test-inv-bmc.slot"),
        ("(defaults)", "defaults.test-inv-bmc.colour"),
        ("(defaults)", "defaults.no-such-type"),
        ("(defaults)", "defaults.manual"),
    }
    reasons = [p["reason"] for p in err.value.problems]
    assert "a per-node parameter cannot be a default" in reasons


def test_two_nodes_controlling_one_machine_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path / "inv.yaml",
        """\
        nodes:
          - {name: a, rack: r, power_type: test-inv-bmc,
             power_parameters: {power_address: h, power_pass: p1, slot: 1}}
          - {name: b, rack: r, power_type: test-inv-bmc,
             power_parameters: {power_address: h, power_pass: p2, slot: 1}}
          - {name: c, rack: r, power_type: test-inv-bmc,
             power_parameters: {power_address: h, power_pass: p1, slot: 2}}
          - {name: d, rack: r, power_type: manual}
          - {name: e, rack: r, power_type: manual}
        """,
    )
    with pytest.raises(InventoryError) as err:
        load_inventory(path, environ={})
    assert problem_keys(err.value) == {("b", "power_parameters")}
    assert "node a" in err.value.problems[0]["reason"]


def test_file_reference_without_secrets_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "inv.yaml",
        """\
        nodes:
          - {name: a, rack: r, power_type: test-inv-bmc,
             power_parameters: {power_address: h, power_pass: {file: k}}}
        """,
    )
    with pytest.raises(InventoryError) as err:
        load_inventory(path, environ={})
    assert problem_keys(err.value) == {("a", "power_pass")}
    assert "no secrets file" in err.value.problems[0]["reason"]


def test_unreadable_secrets_file_is_reported_once_per_use(tmp_path: Path) -> None:
    path = write(
        tmp_path / "inv.yaml",
        """\
        secrets_file: missing.yaml
        nodes:
          - {name: a, rack: r, power_type: test-inv-bmc,
             power_parameters: {power_address: h, power_pass: {file: k}}}
        """,
    )
    with pytest.raises(InventoryError) as err:
        load_inventory(path, environ={})
    assert problem_keys(err.value) == {("(inventory)", "secrets_file"), ("a", "power_pass")}
    assert "missing.yaml" in err.value.problems[0]["reason"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "is empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("nodes: {a: 1}\n", "must be a list"),
        ("other: 1\n", "must be a list"),
        ("nodes:\n  - name: a\n    power_pass: inline-Pa55\n   bad: [\n", "line "),
        ("nodes: [\n  {name: a, power_parameters: {power_pass: inline-Pa55}\n", "line "),
        ("nodes: !!python/object:os.system x\n", "line "),
        ("\x00", "character 0: special characters are not allowed"),
        ("nodes: " + "[" * 5000 + "]" * 5000, "not valid YAML"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError) as err:
        load_inventory(path, environ={})
    assert words in err.value.message
    assert str(path) in err.value.message
    assert_no_secret(err.value.message)


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cannot read inventory .*No such file"):
        load_inventory(tmp_path / "nope.yaml")
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"nodes: [\xff]\n")
    with pytest.raises(InventoryError, match="not UTF-8"):
        load_inventory(path)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path / "inv.yaml", "nodes: []\nnode: []\n")
    with pytest.raises(InventoryError) as err:
        load_inventory(path)
    assert problem_keys(err.value) == {("(inventory)", "node")}


def test_empty_node_list_is_an_empty_inventory(tmp_path: Path) -> None:
    assert len(load_inventory(write(tmp_path / "inv.yaml", "nodes: []\n"))) == 0


def test_the_example_inventory_loads(tmp_path: Path) -> None:
    secrets = write(tmp_path / "s.yaml", "r12-bmc: a\nhv01: b\n")
    inv = load_inventory(
        EXAMPLE,
        secrets_path=secrets,
        environ={"POWERQ_IPMI_PASS": "c", "POWERQ_REDFISH_PASS": "d"},
    )
    assert inv.racks() == ["lab", "r12", "r13"]
    assert {n.power_type for n in inv.nodes.values()} >= {"manual"}
    assert inv.budgets and inv.budgets.for_pdu("r12-pdu-a") is not None
    assert inv.nodes["node001"].pdu == "r12-pdu-a"


# --------------------------------------------------------------------------- secrets


def test_secret_box_round_trip_and_wrong_key() -> None:
    box = SecretBox(generate_key())
    token = box.encrypt("env-Pa55")
    assert "env-Pa55" not in token and box.decrypt(token) == "env-Pa55"
    assert box.encrypt("é∂") != box.encrypt("é∂") and box.decrypt(box.encrypt("é∂")) == "é∂"
    with pytest.raises(SettingsError) as err:
        SecretBox(generate_key()).decrypt(token)
    assert err.value.message == "secret cannot be decrypted with the configured key"
    for garbage in ("", "not a token", "ü", token[:-3]):
        with pytest.raises(SettingsError, match="cannot be decrypted"):
            box.decrypt(garbage)
    assert "Pa55" not in repr(box) and generate_key()[:8] not in repr(box)


def test_key_rotation() -> None:
    old, new = generate_key(), generate_key()
    token = SecretBox(old).encrypt("x")
    rotated = SecretBox(f"{new},{old}")
    assert rotated.decrypt(token) == "x"
    assert SecretBox(new).decrypt(rotated.encrypt("y")) == "y"


def test_keys_from_config(tmp_path: Path) -> None:
    key = generate_key()
    assert load_keys(Config(secret_key=key)) == [key]
    with pytest.raises(SettingsError, match="POWERQ_SECRET_KEY is not a valid key") as err:
        load_keys(Config(secret_key="too-short-Pa55"))
    assert "Pa55" not in err.value.message
    with pytest.raises(SettingsError, match="no key configured"):
        load_keys(Config(secret_key="", secret_key_file=""))


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "powerq" / "secret.key"
    config = Config(secret_key_file=str(path))
    keys = load_keys(config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keys(config) == keys
    box = SecretBox.from_config(config)
    assert SecretBox(keys).decrypt(box.encrypt("z")) == "z"


def test_key_file_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    load_keys(Config(secret_key_file="~/k/secret.key"))
    assert (tmp_path / "k" / "secret.key").exists()


def test_world_readable_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    key = generate_key()
    path.write_text(key + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(SettingsError, match="accessible to every user.*chmod 600") as err:
        load_keys(Config(secret_key_file=str(path)))
    assert key not in err.value.message
    os.chmod(path, 0o640)  # a service group may share it
    assert load_keys(Config(secret_key_file=str(path))) == [key]
    path.write_text("garbage")
    with pytest.raises(SettingsError, match="not a valid key"):
        load_keys(Config(secret_key_file=str(path)))
    path.write_text("")
    with pytest.raises(SettingsError, match="holds no key"):
        load_keys(Config(secret_key_file=str(path)))


# --------------------------------------------------------------------------- store


class CountingRedis:
    """A Redis client that counts the commands a store sends."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self._client, name)


class NoDecryptBox(SecretBox):
    def decrypt(self, token: str) -> str:
        raise AssertionError("decrypted")


@pytest.fixture(scope="module")
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the test session's own Redis server (tests/conftest.py)."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"powerq-test-{uuid.uuid4().hex}"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}:*"))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
def store(redis_client: redis.Redis, prefix: str, key: str) -> InventoryStore:
    return InventoryStore(redis_client, prefix, SecretBox(key), clock=lambda: 1700000000.5)


def dump_keys(client: redis.Redis, prefix: str) -> str:
    """Every key and value under ``prefix``, as one text."""
    out: list[str] = []
    name: bytes
    for name in client.scan_iter(match=f"{prefix}:*"):
        assert client.type(name) == b"hash"
        out.append(name.decode())
        fields: dict[bytes, bytes] = client.hgetall(name)  # type: ignore[assignment]
        out.extend(f"{k.decode()}={v.decode()}" for k, v in fields.items())
    return "\n".join(out)


def test_save_never_stores_a_secret_in_clear(
    store: InventoryStore, inventory: Inventory, redis_client: redis.Redis, prefix: str
) -> None:
    store.save(inventory)
    everything = dump_keys(redis_client, prefix)
    assert_no_secret(everything)
    assert "10.0.0.3" in everything  # non-secret parameters are plain
    assert {k.decode() for k in redis_client.scan_iter(match=f"{prefix}:*")} == {
        f"{prefix}:inventory",
        f"{prefix}:inventory:index",
        f"{prefix}:inventory:meta",
    }
    stored = json.loads(redis_client.hget(f"{prefix}:inventory", "n3") or b"")
    assert set(stored["params"]["power_pass"]) == {"$enc"}
    meta = store.meta()
    assert meta.pop("stamp") == store.stamp()
    assert meta == {"loaded_at": "1700000000.5", "count": "5", "source": inventory.source}


def test_load_node_decrypts(store: InventoryStore, inventory: Inventory) -> None:
    store.save(inventory)
    n3 = store.load_node("n3")
    assert n3 is not None
    assert n3.params == inventory.nodes["n3"].params
    assert n3.secret_fields == {"power_pass", "k_g"}
    assert (n3.rack, n3.power_type, n3.tags) == ("r2", "test-inv-bmc", ("prod",))
    assert store.load_node("nope") is None
    assert store.load_node("m1") == inventory.nodes["m1"]


def test_load_nodes_is_one_round_trip(
    redis_client: redis.Redis, prefix: str, key: str, inventory: Inventory
) -> None:
    counting = CountingRedis(redis_client)
    store = InventoryStore(counting, prefix, SecretBox(key))
    store.save(inventory)
    counting.calls.clear()
    nodes = store.load_nodes(["n1", "n2", "ghost", "n1"])
    assert counting.calls == ["pipeline"]  # the inventory and the enlisted credentials, together
    assert sorted(nodes) == ["n1", "n2"]
    assert nodes["n2"].params["power_pass"] == "env-Pa55"
    assert store.load_nodes([]) == {}


def test_index_and_public_view_decrypt_nothing(
    redis_client: redis.Redis, prefix: str, key: str, inventory: Inventory
) -> None:
    InventoryStore(redis_client, prefix, SecretBox(key)).save(inventory)
    store = InventoryStore(redis_client, prefix, NoDecryptBox(key))
    index = store.node_index()
    assert index == inventory.index()
    assert index["n1"] == NodeInfo("r1", "test-inv-bmc", ("gpu", "prod"))
    # positions 0-2 stay rack, power type, tags; later fields are added at the end
    assert tuple(index["n1"])[:3] == ("r1", "test-inv-bmc", ("gpu", "prod"))
    assert (index["n1"].pdu, index["n1"].priority) == (None, 100)
    assert store.resolver()("rack", "r2") == {"m1", "n3", "n4"}
    view = store.public_view("n3")
    assert view is not None
    assert view["params"] == {
        "power_address": "10.0.0.3",
        "power_user": "admin",
        "power_pass": "***",
        "k_g": "***",
    }
    assert view == inventory.nodes["n3"].public_dict()
    assert store.public_view("nope") is None


def test_save_replaces_the_previous_inventory(
    store: InventoryStore, inventory: Inventory, redis_client: redis.Redis, prefix: str
) -> None:
    assert store.stamp() is None
    store.save(inventory)
    stamp = store.stamp()
    smaller = Inventory(nodes={"n1": inventory.nodes["n1"]}, source="x")
    store.save(smaller)
    assert store.stamp() not in (None, stamp)  # same clock, still a new stamp
    assert set(store.node_index()) == {"n1"}
    assert store.load_node("n2") is None
    assert store.meta()["count"] == "1"
    store.save(Inventory(nodes={}))
    assert store.node_index() == {}
    assert store.meta()["count"] == "0"
    store.clear()
    assert list(redis_client.scan_iter(match=f"{prefix}:*")) == []


def test_wrong_key_gives_the_clear_error(
    store: InventoryStore, inventory: Inventory, redis_client: redis.Redis, prefix: str
) -> None:
    store.save(inventory)
    other = InventoryStore(redis_client, prefix, SecretBox(generate_key()))
    with pytest.raises(SettingsError) as err:
        other.load_node("n3")
    assert "secret cannot be decrypted with the configured key" in err.value.message
    assert "n3" in err.value.message
    assert_no_secret(err.value.message)
    with pytest.raises(SettingsError):
        other.load_nodes(["n1"])
    assert other.load_node("m1") is not None  # no secrets, nothing to decrypt


def test_damaged_entry(store: InventoryStore, redis_client: redis.Redis, prefix: str) -> None:
    redis_client.hset(f"{prefix}:inventory", "bad", "{not json")
    with pytest.raises(SettingsError, match="damaged"):
        store.load_node("bad")


def test_store_with_decoded_responses(prefix: str, key: str, inventory: Inventory) -> None:
    client = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
    try:
        store = InventoryStore(client, prefix, SecretBox(key))
        store.save(inventory)
        assert store.load_node("n2") == inventory.nodes["n2"]
        assert store.node_index() == inventory.index()
    finally:
        client.close()


def test_non_string_secret_keeps_its_type(store: InventoryStore) -> None:
    node = InventoryNode(
        "x", "r", "manual", {"pin": 1234, "empty": ""}, secret_fields=frozenset({"pin", "empty"})
    )
    store.save(Inventory(nodes={"x": node}))
    loaded = store.load_node("x")
    assert loaded is not None and loaded.params == {"pin": 1234, "empty": ""}
    assert store.public_view("x") == {**node.public_dict(), "params": {"pin": "***", "empty": ""}}


# --------------------------------------------------------------------------- power budgets


@pytest.fixture
def budgeted(tmp_path: Path) -> Path:
    return write(
        tmp_path / "inv.yaml",
        """\
        budgets:
          pdu: {max_starts: 8, window: 10s}
          pdus: {pdu-a1: {max_starts: 4, window: 500ms}}
          rack: {max_starts: 20, window: 2m}
          racks: {r2: {max_starts: 10, window: 5}}
          global: {max_starts: 100, window: 10s}
        nodes:
          - {name: s1, rack: r1, power_type: manual, pdu: pdu-a1, priority: 10}
          - {name: c1, rack: r1, power_type: manual, pdu: pdu-a2}
          - {name: c2, rack: r2, power_type: manual}
        """,
    )


def test_pdu_priority_and_budgets_load(budgeted: Path) -> None:
    inv = load_inventory(budgeted)
    assert (inv.nodes["s1"].pdu, inv.nodes["s1"].priority) == ("pdu-a1", 10)
    assert (inv.nodes["c2"].pdu, inv.nodes["c2"].priority) == (None, 100)
    assert inv.index()["c1"] == NodeInfo("r1", "manual", (), "pdu-a2", 100)
    assert inv.budgets == Budgets(
        pdu=Budget(8, 10.0),
        pdus={"pdu-a1": Budget(4, 0.5)},
        rack=Budget(20, 120.0),
        racks={"r2": Budget(10, 5.0)},
        fleet=Budget(100, 10.0),
    )
    assert inv.nodes["s1"].public_dict()["pdu"] == "pdu-a1"


def test_no_budgets_section_means_no_budgets(good: Path, env: dict[str, str]) -> None:
    inv = load_inventory(good, environ=env)
    assert inv.budgets == Budgets() and not inv.budgets


def test_every_budget_and_node_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path / "inv.yaml",
        """\
        budgets:
          pdu: {max_starts: 0, window: 10s}
          pdus:
            pdu-a1: {max_starts: 4, window: soon}
            pdu-zz: {max_starts: 4, window: 1s}
          rack: {max_starts: 2}
          racks: {r9: {max_starts: 1, window: 1s}, r1: {max_starts: 1, window: -1}}
          global: {max_starts: 5, window: 1s, burst: 2}
          fleet: {}
        nodes:
          - {name: a, rack: r1, power_type: manual, pdu: pdu-a1, priority: high}
          - {name: b, rack: r1, power_type: manual, pdu: "p/1", priority: true}
          - {name: c, rack: r1, power_type: manual, pdu: 7, priority: 1.5}
          - {name: d, rack: r1, power_type: manual, priority: 2000000}
        """,
    )
    with pytest.raises(InventoryError) as err:
        load_inventory(path)
    assert problem_keys(err.value) == {
        ("(budgets)", "budgets.pdu.max_starts"),
        ("(budgets)", "budgets.pdus.pdu-a1.window"),
        ("(budgets)", "budgets.rack.window"),
        ("(budgets)", "budgets.racks.r1.window"),
        ("(budgets)", "budgets.global.burst"),
        ("(budgets)", "budgets.fleet"),
        ("(budgets)", "budgets.pdus.pdu-zz"),  # no node names them: reported as well
        ("(budgets)", "budgets.racks.r9"),
        ("a", "priority"),
        ("b", "pdu"),
        ("b", "priority"),
        ("c", "pdu"),
        ("c", "priority"),
        ("d", "priority"),
    }
    reasons = {(p["node"], p["field"]): p["reason"] for p in err.value.problems}
    assert "'soon'" in reasons[("(budgets)", "budgets.pdus.pdu-a1.window")]
    assert reasons[("(budgets)", "budgets.rack.window")] == "required"


def test_a_budget_must_name_a_rack_or_pdu_some_node_has(tmp_path: Path) -> None:
    path = write(
        tmp_path / "inv.yaml",
        """\
        budgets:
          pdus: {pdu-a1: {max_starts: 4, window: 1s}, pdu-zz: {max_starts: 4, window: 1s}}
          racks: {r1: {max_starts: 1, window: 1s}, r9: {max_starts: 1, window: 1s}}
        nodes:
          - {name: a, rack: r1, power_type: manual, pdu: pdu-a1}
          - {name: b, rack: r2, power_type: no-such-type, pdu: pdu-b1}
        """,
    )
    with pytest.raises(InventoryError) as err:
        load_inventory(path)
    # b is invalid, but its rack and PDU still count as named: no spurious budget problem
    assert problem_keys(err.value) == {
        ("b", "power_type"),
        ("(budgets)", "budgets.pdus.pdu-zz"),
        ("(budgets)", "budgets.racks.r9"),
    }
    reasons = {(p["node"], p["field"]): p["reason"] for p in err.value.problems}
    assert reasons[("(budgets)", "budgets.racks.r9")] == "no node is in rack 'r9'"
    assert reasons[("(budgets)", "budgets.pdus.pdu-zz")] == "no node draws from PDU 'pdu-zz'"


def test_budgets_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "inv.yaml", "budgets: [1]\nnodes: []\n")
    with pytest.raises(InventoryError) as err:
        load_inventory(path)
    assert problem_keys(err.value) == {("(budgets)", "budgets")}


def test_store_keeps_pdu_priority_and_budgets_without_decrypting(
    redis_client: redis.Redis, prefix: str, key: str, budgeted: Path
) -> None:
    inv = load_inventory(budgeted)
    InventoryStore(redis_client, prefix, SecretBox(key)).save(inv)
    store = InventoryStore(redis_client, prefix, NoDecryptBox(key))
    index = store.node_index()
    assert index == inv.index()
    assert (index["s1"].pdu, index["s1"].priority) == ("pdu-a1", 10)
    assert store.budgets() == inv.budgets
    assert json.loads(store.meta()["budgets"])["global"] == {"max_starts": 100, "window": 10.0}
    assert store.load_node("s1") == inv.nodes["s1"]
    view = store.public_view("s1")
    assert view is not None and view == inv.nodes["s1"].public_dict()


def test_store_without_budgets_and_old_entries(
    store: InventoryStore, redis_client: redis.Redis, prefix: str
) -> None:
    assert store.budgets() == Budgets()  # nothing stored
    # an index entry written before pdu/priority existed still reads, with the defaults
    redis_client.hset(
        f"{prefix}:inventory:index", "old", json.dumps({"rack": "r", "power_type": "manual"})
    )
    assert store.node_index()["old"] == NodeInfo("r", "manual", (), None, 100)
    redis_client.hset(f"{prefix}:inventory:meta", "budgets", "{not json")
    with pytest.raises(SettingsError, match="budgets are damaged"):
        store.budgets()


# --------------------------------------------------------------------------- isolation


def test_scheduler_imports_without_driver_libraries(tmp_path: Path) -> None:
    inv = write(tmp_path / "inv.yaml", "nodes:\n  - {name: a, rack: r, power_type: manual}\n")
    script = textwrap.dedent(
        f"""\
        import sys
        sys.modules['pyghmi'] = sys.modules['sushy'] = sys.modules['libvirt'] = None
        import scheduler.inventory, scheduler.nodeset, scheduler.secrets
        from drivers import registry
        try:
            registry.all_drivers()
        except ModuleNotFoundError as exc:
            if not (exc.name or '').startswith('drivers.'):
                raise
            import drivers.manual
            registry._loaded = True  # built-in driver modules not written yet
        inv = scheduler.inventory.load_inventory({str(inv)!r}, environ={{}})
        assert inv.expand('@all') == ['a']
        assert not any(sys.modules.get(m) for m in ('pyghmi', 'sushy', 'libvirt'))
        print('ok')
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_enlisted_credentials_win_over_the_inventory_across_reloads(
    redis_client: redis.Redis, prefix: str, key: str, inventory: Inventory
) -> None:
    store = InventoryStore(redis_client, prefix, SecretBox(key))
    store.save(inventory)
    node = store.load_node("n2")
    assert node is not None
    store.set_enlisted("n2", node.power_type, {"power_user": "powerq", "power_pass": "Enl1sted-Pw"},
                       {"power_pass"})
    raw = redis_client.hget(store.enlisted_key, "n2")
    assert raw is not None and "Enl1sted-Pw" not in str(raw)  # sealed at rest
    store.save(inventory)  # an inventory reload keeps them
    again = store.load_nodes(["n2"])["n2"]
    assert (again.params["power_user"], again.params["power_pass"]) == ("powerq", "Enl1sted-Pw")
    assert "power_pass" in again.secret_fields
    view = store.public_view("n2")
    assert view is not None and view["params"]["power_pass"] == "***" and view["enlisted_at"]
    assert store.enlisted(["n2", "n1"]) == {"n2": {"at": view["enlisted_at"], "power_type": node.power_type,
                                                    "fields": ["power_pass", "power_user"]}}
    # another power type for the node: the old account no longer applies
    store.set_enlisted("n2", "something-else", {"power_user": "x"}, set())
    assert store.load_node("n2").params["power_user"] != "x"  # type: ignore[union-attr]
    assert store.forget_enlisted(["n2", "n1"]) == 1
    assert store.load_node("n2").params["power_pass"] == "env-Pa55"  # type: ignore[union-attr]
