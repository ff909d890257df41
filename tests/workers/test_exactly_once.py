"""Exactly-once node actions over at-least-once chunk delivery (workers/tasks.py and the
journal in scheduler/store.py), against a real Redis, with a device of the test's own."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
import yaml

from drivers import registry
from drivers.base import Capabilities, DriverSettings, PowerDriver, PowerState, param
from scheduler.config import Config
from scheduler.inventory import InventoryStore, load_inventory
from scheduler.secrets import SecretBox
from scheduler.store import Store
from workers import tasks


class LedgerSettings(DriverSettings):
    power_id: str = param(description="which simulated machine", scope="node")


@registry.register
class LedgerDevice(PowerDriver):
    """Machines held in this module; every call is counted."""

    power_type = "test-ledger"
    description = "in-process machines for exactly-once tests"
    settings_model = LedgerSettings
    capabilities = Capabilities(power_query=True)
    power: ClassVar[dict[str, str]] = {}
    calls: ClassVar[Counter[tuple[str, str]]] = Counter()
    lock = threading.Lock()

    @property
    def me(self) -> str:
        return str(self.settings.power_id)  # type: ignore[attr-defined]

    def bmc_key(self) -> str:
        return f"ledger:{self.me}"

    def _set(self, what: str, power: str | None) -> None:
        with self.lock:
            self.calls[(self.me, what)] += 1
            if power:
                self.power[self.me] = power

    def power_on(self) -> None:
        self._set("on", "on")

    def power_off(self, soft: bool = False) -> None:
        self._set("off", "off")

    def power_cycle(self) -> None:
        self._set("cycle", "on")

    def query(self) -> PowerState:
        self._set("query", None)
        return PowerState(self.power[self.me])


@pytest.fixture()
def ctx(redis_server: Any, prefix: str, secret_key: str, tmp_path: Path) -> Any:
    names = ["m1", "m2", "m3", "m4"]
    doc = {"nodes": [{"name": n, "rack": "r1", "power_type": "test-ledger",
                      "power_parameters": {"power_id": n}} for n in names]}
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(doc))
    config = Config.from_env({"POWERQ_REDIS_URL": redis_server.url, "POWERQ_KEY_PREFIX": prefix,
                              "POWERQ_SECRET_KEY": secret_key, "POWERQ_CONFIRM_INTERVAL": "0.01",
                              "POWERQ_BACKOFF_BASE": "0.01"})
    store = Store.from_config(config)
    InventoryStore(store.client, prefix, SecretBox.from_config(config)).save(load_inventory(tmp_path / "inv.yaml"))
    LedgerDevice.power.clear()
    LedgerDevice.calls.clear()
    context = tasks.context_for(config)
    yield context
    tasks._contexts.pop(id(config), None)


def new_job(store: Store, job_id: str, action: str, nodes: int, chunks: int = 1) -> None:
    store.create_job(job_id, action=action, nodeset="x", nodes=nodes, chunks=chunks, options={},
                     requested_by="test")


def test_a_redelivered_chunk_skips_done_nodes_and_never_cycles_twice(ctx: Any) -> None:
    store: Store = ctx.store
    LedgerDevice.power.update(m1="on", m2="on", m3="on", m4="off")
    new_job(store, "j1", "cycle", 4)
    # The first delivery: m1 was reported; m2's cycle was journaled (sent), then the
    # worker died before reporting; m3, m4 were not reached.
    store.record_results("j1", [{"node": "m1", "action": "cycle", "outcome": "ok", "state_after": "on"}])
    store.journal_sent("j1", "m2", "cycle:on", "dead-worker")  # it reached the power-on
    counts = tasks.execute_chunk(ctx, "j1", "cycle", ["m1", "m2", "m3", "m4"], {"chunk": 0}, "w2")
    assert counts["ok"] == 3  # m1 is not run again
    results = store.results("j1")
    assert results["m2"]["note"].startswith("in doubt") and results["m2"]["outcome"] == "ok"
    calls = LedgerDevice.calls
    assert calls[("m1", "query")] == 0 and calls[("m1", "off")] == 0  # m1: untouched
    assert calls[("m2", "off")] == 0 and calls[("m2", "on")] == 0  # m2: found on, not cycled again
    assert (calls[("m3", "off")], calls[("m3", "on")]) == (1, 1)  # m3: cycled once
    assert (calls[("m4", "off")], calls[("m4", "on")]) == (0, 1)  # m4 was off: powered on
    job = store.job("j1")
    assert job is not None and (job["done"], job["ok"], job["status"]) == (4, 4, "done")


def test_an_in_doubt_node_found_off_is_powered_back_on(ctx: Any) -> None:
    store: Store = ctx.store
    LedgerDevice.power.update(m1="off", m2="on", m3="on", m4="on")
    new_job(store, "j2", "cycle", 1)
    store.journal_sent("j2", "m1", "cycle:off", "dead-worker")  # the off went out, then the crash
    tasks.execute_chunk(ctx, "j2", "cycle", ["m1"], {"chunk": 0}, "w2")
    assert LedgerDevice.power["m1"] == "on"
    assert (LedgerDevice.calls[("m1", "off")], LedgerDevice.calls[("m1", "on")]) == (0, 1)


def test_an_in_doubt_power_off_that_never_took_effect_is_cycled_once_now(ctx: Any) -> None:
    store: Store = ctx.store
    LedgerDevice.power.update(m1="on", m2="on", m3="on", m4="on")
    new_job(store, "j5", "cycle", 1)
    store.journal_sent("j5", "m1", "cycle:off", "dead-worker")  # killed before the off left
    tasks.execute_chunk(ctx, "j5", "cycle", ["m1"], {"chunk": 0}, "w2")
    assert (LedgerDevice.calls[("m1", "off")], LedgerDevice.calls[("m1", "on")]) == (1, 1)
    entry = json.loads(store.client.hget(f"{store.prefix}:job:j5:journal", "m1"))
    assert entry["action"] == "cycle:on"  # the journal follows the phases
    # (job, node, action, attempt): the dead worker's off, then this delivery's off and on
    assert entry["attempt"] == 3 and entry["worker"] == "w2", entry


def test_every_action_is_journaled_before_it_is_sent(ctx: Any) -> None:
    store: Store = ctx.store
    LedgerDevice.power.update(m1="on", m2="off", m3="on", m4="off")
    new_job(store, "j3", "off", 4)
    tasks.execute_chunk(ctx, "j3", "off", ["m1", "m2", "m3", "m4"], {"chunk": 0}, "w1")
    journal = store.client.hgetall(f"{store.prefix}:job:j3:journal")
    assert set(journal) == {"m1", "m3"}  # the two that were on; nothing sent to the others
    assert all(json.loads(v)["attempt"] == 1 and json.loads(v)["action"] == "off"
               for v in journal.values()), journal
    assert store.delivery_state("j3", ["m1", "m2", "m3", "m4"]) == ({"m1", "m2", "m3", "m4"}, {})


def test_results_and_chunks_count_once_however_often_written(ctx: Any) -> None:
    store: Store = ctx.store
    new_job(store, "j4", "query", 2, chunks=2)
    result = {"node": "m1", "action": "query", "outcome": "ok", "state_after": "on"}
    store.record_results("j4", [result])
    store.record_results("j4", [result, {**result, "node": "m2", "outcome": "error"}])
    job = store.job("j4")
    assert job is not None and (job["done"], job["ok"], job["error"]) == (2, 1, 1)
    assert not store.chunk_finished("j4", 0)
    assert not store.chunk_finished("j4", 0)  # the same chunk again: still one of two
    assert store.chunk_finished("j4", 1)
    assert store.job("j4")["chunks_done"] == 2  # type: ignore[index]


def test_a_store_outage_hands_the_chunk_back_to_the_broker(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.exceptions import Reject

    def down(*_: Any, **__: Any) -> Any:
        raise redis.ConnectionError("down")

    monkeypatch.setattr(tasks, "execute_chunk", down)  # a fault at an exact instant
    task = tasks.run_chunk
    with pytest.raises(Reject) as info:
        task.run(None, "query", ["m1"], {})
    assert info.value.requeue


def test_a_chunk_handed_back_waits_for_its_calls_under_way(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a chunk goes back to the broker, no node call of it may still be running:
    otherwise its next delivery would act on the same node at the same time."""
    store: Store = ctx.store
    LedgerDevice.power.update(m1="on", m2="on", m3="on", m4="on")
    new_job(store, "j6", "off", 4)
    slow = threading.Event()
    real_off = LedgerDevice.power_off

    def slow_off(self: LedgerDevice, soft: bool = False) -> None:
        if self.me == "m2":
            slow.wait(0.8)
        real_off(self, soft)

    def store_down(*_: Any, **__: Any) -> None:
        raise redis.ConnectionError("store down")  # a fault at an exact instant

    monkeypatch.setattr(LedgerDevice, "power_off", slow_off)
    monkeypatch.setattr(store, "record_results", store_down)
    with pytest.raises(redis.ConnectionError):
        tasks.execute_chunk(ctx, "j6", "off", ["m1", "m2", "m3", "m4"], {"chunk": 0}, "w1")
    # when the error surfaced, m2's slow power-off had finished: nothing still running
    assert LedgerDevice.calls[("m2", "off")] == 1
    assert LedgerDevice.power["m2"] == "off"
