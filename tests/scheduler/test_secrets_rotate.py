"""Key rotation (scheduler/secrets.py): ``powerq keys rotate / prune / status`` against a
real Redis, and through a real worker (its cached keys follow the key file)."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from cryptography.fernet import Fernet, InvalidToken

from drivers.errors import SettingsError
from scheduler.config import Config
from scheduler.inventory import InventoryStore, load_inventory
from scheduler.secrets import (
    SEALED_HASHES,
    SecretBox,
    fingerprint,
    key_status,
    prune,
    reseal,
    rotate,
)
from tests.fullpath import FullPath
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode

PASSWORDS = ("rot-Pa55-one", "rot-Pa55-two")
ENLISTED = "enl-Pa55-three"


def _inventory_file(tmp_path: Path) -> Path:
    nodes = [{"name": f"n{i}", "rack": "r1", "power_type": "ipmi",
              "power_parameters": {"power_address": f"10.0.0.{i}", "power_user": "admin",
                                   "power_pass": PASSWORDS[i]}} for i in range(2)]
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump({"nodes": nodes}))
    return path


def _tokens(client: Any, prefix: str) -> list[str]:
    """Every sealed token stored under ``prefix``."""
    out = []
    for name in SEALED_HASHES:
        for raw in client.hgetall(f"{prefix}:{name}").values():
            out += _find(json.loads(raw))
    return out


def _find(value: Any) -> list[str]:
    if isinstance(value, dict):
        if "$enc" in value:
            return [value["$enc"]]
        return [t for v in value.values() for t in _find(v)]
    return []


def _opens(key: str, token: str) -> bool:
    try:
        Fernet(key.encode()).decrypt(token.encode())
        return True
    except InvalidToken:
        return False


@pytest.fixture()
def seeded(tmp_path: Path, redis_client: redis.Redis, prefix: str) -> tuple[Config, Path]:
    """A key file config, and an inventory plus an enlisted credential sealed with it."""
    key_file = tmp_path / "keys" / "secret.key"
    config = Config(secret_key="", secret_key_file=str(key_file), key_prefix=prefix)
    inventory = InventoryStore(redis_client, prefix, SecretBox.from_config(config))
    inventory.save(load_inventory(_inventory_file(tmp_path)))
    inventory.set_enlisted("n1", "ipmi", {"power_user": "powerq", "power_pass": ENLISTED},
                           ["power_pass"])
    return config, key_file


def test_rotate_reencrypts_everything_and_prune_drops_the_old_key(
    seeded: tuple[Config, Path], redis_client: redis.Redis, prefix: str
) -> None:
    config, key_file = seeded
    old_key = key_file.read_text().strip()
    before = _tokens(redis_client, prefix)
    assert len(before) == 3

    report = rotate(config, redis_client, prefix)
    keys = key_file.read_text().split()
    assert len(keys) == 2 and keys[1] == old_key and report["values"] == 3
    assert report["primary"] == fingerprint(keys[0]) and report["unreadable"] == []
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    after = _tokens(redis_client, prefix)
    assert not set(before) & set(after)
    assert all(_opens(keys[0], t) and not _opens(old_key, t) for t in after)

    # Everything still opens, through the inventory store, with the new key list.
    inventory = InventoryStore(redis_client, prefix, SecretBox.from_config(config))
    nodes = inventory.load_nodes(["n0", "n1"])
    assert nodes["n0"].params["power_pass"] == PASSWORDS[0]
    assert nodes["n1"].params["power_pass"] == ENLISTED

    status = key_status(config, redis_client, prefix)
    assert status["keys"] == 2 and status["sealed"] == {"by_key": [3, 0], "unreadable": 0}
    assert not any(k in json.dumps(status) for k in keys)

    pruned = prune(config, redis_client, prefix)
    assert pruned["dropped"] == [fingerprint(old_key)]
    assert key_file.read_text().split() == keys[:1]
    final = _tokens(redis_client, prefix)
    assert final and not any(_opens(old_key, t) for t in final)
    assert key_status(config, redis_client, prefix)["keys"] == 1


def test_a_box_built_before_the_rotation_follows_the_key_file(
    seeded: tuple[Config, Path], redis_client: redis.Redis, prefix: str
) -> None:
    config, key_file = seeded
    stale = InventoryStore(redis_client, prefix, SecretBox.from_config(config))  # a worker's
    rotate(config, redis_client, prefix)
    prune(config, redis_client, prefix)
    # The stale box held the old key only: it reads the changed file and opens the values.
    assert stale.load_node("n0").params["power_pass"] == PASSWORDS[0]  # type: ignore[union-attr]


def test_prune_refuses_while_a_value_needs_an_old_key(
    seeded: tuple[Config, Path], redis_client: redis.Redis, prefix: str
) -> None:
    config, key_file = seeded
    old_key = key_file.read_text().strip()
    rotate(config, redis_client, prefix)
    keys = key_file.read_text().split()
    # A process that only knows the old key (POWERQ_SECRET_KEY not yet updated) stores a value.
    InventoryStore(redis_client, prefix, SecretBox(old_key)).set_enlisted(
        "n0", "ipmi", {"power_pass": "late-Pa55"}, ["power_pass"])
    # prune re-encrypts it first (the old key is still in the file), then drops the old key.
    assert prune(config, redis_client, prefix)["dropped"] == [fingerprint(old_key)]
    assert all(_opens(keys[0], t) for t in _tokens(redis_client, prefix))



def test_prune_checks_before_it_drops(
    seeded: tuple[Config, Path], redis_client: redis.Redis, prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value only an old key opens, that the re-encryption did not reach (here: the
    re-encryption is skipped), makes prune refuse and keep every key."""
    import scheduler.secrets as secrets

    config, key_file = seeded
    rotate(config, redis_client, prefix)
    keys = key_file.read_text().split()
    InventoryStore(redis_client, prefix, SecretBox(keys[1])).set_enlisted(
        "n0", "ipmi", {"power_pass": "late-Pa55"}, ["power_pass"])
    monkeypatch.setattr(secrets, "reseal", lambda *a, **k: {"values": 0, "unreadable": []})
    with pytest.raises(SettingsError, match="still need an old key") as info:
        prune(config, redis_client, prefix)
    assert "Pa55" not in str(info.value) and keys[1] not in str(info.value)
    assert key_file.read_text().split() == keys  # nothing dropped


def test_reseal_reports_values_no_key_opens(
    seeded: tuple[Config, Path], redis_client: redis.Redis, prefix: str
) -> None:
    InventoryStore(redis_client, prefix, SecretBox(Fernet.generate_key().decode())).set_enlisted(
        "n0", "ipmi", {"power_pass": "lost-Pa55"}, ["power_pass"])
    config, _ = seeded
    report = rotate(config, redis_client, prefix)
    assert report["unreadable"] == ["inventory:enlisted/n0"] and report["values"] == 3


def test_reseal_retries_when_the_inventory_changes_meanwhile(
    seeded: tuple[Config, Path], redis_client: redis.Redis, prefix: str
) -> None:
    config, key_file = seeded
    old_key = key_file.read_text().strip()
    new_key = Fernet.generate_key().decode()
    box = SecretBox([new_key, old_key])
    other = redis.Redis(connection_pool=redis_client.connection_pool)
    writer = InventoryStore(other, prefix, SecretBox(old_key))
    calls = {"n": 0}
    rotate_token = box.rotate_token

    def interfering(token: str) -> str:
        calls["n"] += 1
        if calls["n"] == 1:  # an inventory load lands between the read and the write
            writer.set_enlisted("n0", "ipmi", {"power_pass": "mid-Pa55"}, ["power_pass"])
        return rotate_token(token)

    box.rotate_token = interfering  # type: ignore[method-assign]
    reseal(redis_client, prefix, box)
    tokens = _tokens(redis_client, prefix)
    assert len(tokens) == 4 and all(_opens(new_key, t) and not _opens(old_key, t) for t in tokens)
    assert InventoryStore(redis_client, prefix, SecretBox(new_key)).load_node("n0").params[
        "power_pass"] == "mid-Pa55"  # type: ignore[union-attr]


def test_env_keys_are_not_generated_and_prune_says_what_to_remove(
    tmp_path: Path, redis_client: redis.Redis, prefix: str
) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    InventoryStore(redis_client, prefix, SecretBox(old)).save(load_inventory(_inventory_file(tmp_path)))
    config = Config(secret_key=f"{new},{old}", key_prefix=prefix)
    report = rotate(config, redis_client, prefix)
    assert report["generated"] is False and report["keys"] == 2 and report["values"] == 2
    pruned = prune(config, redis_client, prefix)
    assert pruned["removable"] == [fingerprint(old)] and pruned["dropped"] == []
    assert all(_opens(new, t) for t in _tokens(redis_client, prefix))


def test_rotation_lock_refuses_a_second_rotation(
    seeded: tuple[Config, Path], redis_client: redis.Redis, prefix: str
) -> None:
    config, key_file = seeded
    redis_client.set(f"{prefix}:keys:lock", "someone", ex=30)
    with pytest.raises(SettingsError, match="another key rotation"):
        rotate(config, redis_client, prefix)
    assert len(key_file.read_text().split()) == 1


def test_box_repr_and_fingerprints_hide_keys() -> None:
    key = Fernet.generate_key().decode()
    box = SecretBox(key)
    assert key not in repr(box) and box.fingerprints == [fingerprint(key)]
    assert fingerprint(key) not in key


# -- through a real worker and the CLI --------------------------------------------------------

@pytest.fixture(scope="module")
def ipmi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ipmi_bmc.IpmiFleet, list[SimNode]]]:
    nodes = ipmi_bmc.make_nodes(2, "fp", first_address="127.35.0.1", prefix="rotipmi",
                                password="rot-ipmi-Pa55")
    fleet = ipmi_bmc.start_fleet(nodes, Path(tmp_path_factory.mktemp("rot-ipmi")))
    yield fleet, nodes
    fleet.stop()


@pytest.mark.integration
def test_rotate_and_prune_through_the_cli_and_a_running_worker(
    tmp_path: Path, ipmi: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]
) -> None:
    fleet, nodes = ipmi
    key_file = tmp_path / "worker-keys" / "secret.key"
    fp = FullPath(tmp_path, POWERQ_SECRET_KEY="", POWERQ_SECRET_KEY_FILE=str(key_file))
    try:
        fp.start()
        fp.load(n.inventory_entry() for n in nodes)
        names = ",".join(n.name for n in nodes)
        old_key = key_file.read_text().strip()
        client = redis.Redis.from_url(fp.redis.url, decode_responses=True)
        before = _tokens(client, fp.prefix)
        assert len(before) == 2

        job = fp.run("query", names)
        assert all(r["outcome"] == "ok" for r in job["by_node"].values()), job

        out = fp.pq("keys", "rotate", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        keys = key_file.read_text().split()
        assert len(keys) == 2 and keys[1] == old_key
        after = _tokens(client, fp.prefix)
        assert not set(before) & set(after)

        # The worker built its box with the old key only: it picks the new one up by itself.
        job = fp.run("query", names)
        assert all(r["outcome"] == "ok" for r in job["by_node"].values()), job

        out = fp.pq("keys", "prune")
        assert out.returncode == 0 and "dropped 1 old key" in out.stdout, out.stdout + out.stderr
        assert key_file.read_text().split() == keys[:1]
        assert not any(_opens(old_key, t) for t in _tokens(client, fp.prefix))
        job = fp.run("query", names)
        assert all(r["outcome"] == "ok" for r in job["by_node"].values()), job

        status = fp.pq("keys", "status")
        assert status.returncode == 0 and "1 key(s)" in status.stdout, status.stdout + status.stderr
        shown = "".join([out.stdout, out.stderr, status.stdout, status.stderr, fp.worker_log()])
        assert not any(k in shown for k in keys + [old_key])
        assert "rot-ipmi-Pa55" not in shown
        client.close()
    finally:
        fp.stop()
