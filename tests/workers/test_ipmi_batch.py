"""The IPMI batch of a chunk (workers/fastpath.py, issue 4) for power actions: the
policy's own steps (query, journal, act, confirm) run as coroutines on the worker's RMCP+
client, against pyghmi's BMC server (tests/peers/ipmi_bmc.py) and a real Redis, with the
same exactly-once guarantees as the per-node path."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from scheduler.config import Config
from scheduler.inventory import InventoryStore, load_inventory
from scheduler.secrets import SecretBox
from scheduler.store import Store
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode
from workers import fastpath, tasks

pytestmark = pytest.mark.integration

N = 12


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ipmi_bmc.IpmiFleet, list[SimNode]]]:
    nodes = ipmi_bmc.make_nodes(N, "rb", first_address="127.62.0.1", prefix="batch", power="on")
    sim = ipmi_bmc.start_fleet(nodes, Path(tmp_path_factory.mktemp("batch")), shard_size=N)
    yield sim, nodes
    sim.stop()


def make_ctx(redis_server: Any, prefix: str, secret_key: str, tmp_path: Path, nodes: list[SimNode],
             **env: str) -> Any:
    doc = {"nodes": [n.inventory_entry() for n in nodes]}
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(doc))
    config = Config.from_env({
        "POWERQ_REDIS_URL": redis_server.url, "POWERQ_KEY_PREFIX": prefix,
        "POWERQ_SECRET_KEY": secret_key, "POWERQ_CONFIRM_INTERVAL": "0.05",
        "POWERQ_BACKOFF_BASE": "0.01", "POWERQ_MAX_ATTEMPTS": "2", "POWERQ_CALL_TIMEOUT": "3",
        "POWERQ_IPMI_FLEET_TIMEOUT": "0.5", **env})
    store = Store.from_config(config)
    InventoryStore(store.client, prefix, SecretBox.from_config(config)).save(load_inventory(tmp_path / "inv.yaml"))
    fastpath.close_fleet_client()  # this test's client settings, not an earlier test's
    return tasks.context_for(config)


@pytest.fixture()
def sim(fleet: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]) -> Iterator[tuple[ipmi_bmc.IpmiFleet, list[str]]]:
    peer, nodes = fleet
    names = [n.name for n in nodes]
    for name in names:
        peer.fault(name, "none")
        peer.set_state(name, "on")
    peer.reset()
    yield peer, names
    for name in names:
        peer.fault(name, "none")


@pytest.fixture()
def ctx(redis_server: Any, prefix: str, secret_key: str, tmp_path: Path,
        fleet: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]) -> Iterator[Any]:
    context = make_ctx(redis_server, prefix, secret_key, tmp_path, fleet[1])
    yield context
    tasks._contexts.pop(id(context.config), None)
    fastpath.close_fleet_client()


class Spy:
    """Counts the journal writes, passing them on (the per-node path writes one entry per
    call through ``journal_sent``; the batch writes a phase through ``journal_many``)."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.single = 0
        self.batches: list[list[tuple[str, str]]] = []
        real_many, real_one = store.journal_many, store.journal_sent

        def many(job_id: str, entries: Any, worker: str) -> None:
            entries = list(entries)
            self.batches.append(entries)
            real_many(job_id, entries, worker)

        def one(job_id: str, node: str, action: str, worker: str) -> None:
            self.single += 1
            real_one(job_id, node, action, worker)

        monkeypatch.setattr(store, "journal_many", many)
        monkeypatch.setattr(store, "journal_sent", one)


def new_job(store: Store, job_id: str, action: str, nodes: int) -> None:
    store.create_job(job_id, action=action, nodeset="x", nodes=nodes, chunks=1, options={},
                     requested_by="test")


def journal(store: Store, job_id: str) -> dict[str, dict[str, Any]]:
    return {k: json.loads(v) for k, v in store.client.hgetall(f"{store.prefix}:job:{job_id}:journal").items()}


def test_a_cycle_runs_in_the_batch_and_journals_each_phase_together(
    ctx: Any, sim: tuple[ipmi_bmc.IpmiFleet, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    peer, names = sim
    was_off = set(names[::3])
    for name in was_off:
        peer.set_state(name, "off")
    store: Store = ctx.store
    spy = Spy(store, monkeypatch)
    new_job(store, "c1", "cycle", N)
    counts = tasks.execute_chunk(ctx, "c1", "cycle", names, {"chunk": 0}, "w1")
    assert counts["ok"] == N, store.results("c1")
    results = store.results("c1")
    peers = peer.nodes()
    for name in names:
        assert results[name]["state_after"] == "on" == peers[name]["power"], name
        got = (peers[name]["counts"]["off"], peers[name]["counts"]["on"])
        assert got == ((0, 1) if name in was_off else (1, 1)), (name, peers[name]["counts"])
        assert results[name]["note"] == ("was off: powered on" if name in was_off else "")
    # Every node journaled before each call that may change it, by the batch ...
    entries = journal(store, "c1")
    for name in names:
        assert entries[name]["action"] == "cycle:on" and entries[name]["worker"] == "w1"
        assert entries[name]["attempt"] == (1 if name in was_off else 2), (name, entries[name])
    assert spy.single == 0  # ... none of them one by one
    written = sum(len(b) for b in spy.batches)
    assert written == 2 * N - len(was_off)
    assert len(spy.batches) < written  # nodes of one phase share a write
    job = store.job("c1")
    assert job is not None and (job["done"], job["ok"], job["status"]) == (N, N, "done")


def test_a_redelivered_chunk_in_the_batch_never_cycles_twice(
    ctx: Any, sim: tuple[ipmi_bmc.IpmiFleet, list[str]]
) -> None:
    peer, names = sim
    m1, m2, m3, m4 = names[:4]
    peer.set_state(m4, "off")
    store: Store = ctx.store
    new_job(store, "c2", "cycle", 4)
    # The first delivery reported m1, journaled m2's power-on and died.
    store.record_results("c2", [{"node": m1, "action": "cycle", "outcome": "ok", "state_after": "on"}])
    store.journal_sent("c2", m2, "cycle:on", "dead-worker")
    counts = tasks.execute_chunk(ctx, "c2", "cycle", [m1, m2, m3, m4], {"chunk": 0}, "w2")
    assert counts["ok"] == 3
    results = store.results("c2")
    assert results[m2]["note"].startswith("in doubt"), results[m2]
    peers = peer.nodes()
    count = {n: (peers[n]["counts"]["off"], peers[n]["counts"]["on"]) for n in (m1, m2, m3, m4)}
    assert count == {m1: (0, 0), m2: (0, 0), m3: (1, 1), m4: (0, 1)}, count
    assert peers[m1]["counts"]["query"] == 0  # m1: untouched


def test_a_journal_that_cannot_be_written_sends_nothing_more_and_the_next_delivery_finishes(
    redis_server: Any, prefix: str, secret_key: str, tmp_path: Path,
    fleet: tuple[ipmi_bmc.IpmiFleet, list[SimNode]], sim: tuple[ipmi_bmc.IpmiFleet, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    peer, names = sim
    nodes = names[:6]
    late = nodes[0]
    peer.fault(late, "slow", 0.3)  # its power-on phase comes well after the others finished
    context = make_ctx(redis_server, prefix, secret_key, tmp_path, fleet[1],
                       POWERQ_IPMI_FLEET_TIMEOUT="3")
    store: Store = context.store
    new_job(store, "c3", "cycle", len(nodes))
    real = store.journal_many

    def down_at_its_power_on(job_id: str, entries: Any, worker: str) -> None:
        entries = list(entries)
        if (late, "cycle:on") in entries:  # a fault at an exact instant
            raise redis.ConnectionError("store down")
        real(job_id, entries, worker)

    monkeypatch.setattr(store, "journal_many", down_at_its_power_on)
    try:
        with pytest.raises(redis.ConnectionError):
            tasks.execute_chunk(context, "c3", "cycle", nodes, {"chunk": 0}, "w1")
        peers = peer.nodes()
        # powered off (journaled), never powered on (not journaled), not reported
        assert peers[late]["power"] == "off" and peers[late]["counts"]["on"] == 0
        # the others finished before the store broke: their results were kept
        assert sorted(store.results("c3")) == sorted(nodes[1:])
        monkeypatch.setattr(store, "journal_many", real)
        counts = tasks.execute_chunk(context, "c3", "cycle", nodes, {"chunk": 0}, "w2")  # again
    finally:
        tasks._contexts.pop(id(context.config), None)
        fastpath.close_fleet_client()
    assert counts["ok"] == 1  # only the node left over
    peers = peer.nodes()
    for name in nodes:
        assert peers[name]["power"] == "on", name
        # in doubt after "cycle:off" and found off: powered on; cycled exactly once in all
        assert (peers[name]["counts"]["off"], peers[name]["counts"]["on"]) == (1, 1), name
    assert store.results("c3")[late]["note"] == "was off: powered on"


def test_a_busy_bmc_is_retried_then_reported_and_the_others_go_on(
    ctx: Any, sim: tuple[ipmi_bmc.IpmiFleet, list[str]]
) -> None:
    peer, names = sim
    busy = names[1]
    peer.fault(busy, "busy")
    store: Store = ctx.store
    new_job(store, "c4", "off", N)
    counts = tasks.execute_chunk(ctx, "c4", "off", names, {"chunk": 0}, "w1")
    assert (counts["ok"], counts["error"]) == (N - 1, 1)
    result = store.results("c4")[busy]
    assert result["error"]["code"] == "busy" and result["error"]["attempt"] == 2, result
    peers = peer.nodes()
    assert peers[busy]["power"] == "on" and peers[busy]["counts"]["off"] == 0
    assert all(peers[n]["power"] == "off" for n in names if n != busy)


def test_soft_off_and_next_boot_go_through_the_batch(
    ctx: Any, sim: tuple[ipmi_bmc.IpmiFleet, list[str]]
) -> None:
    peer, names = sim
    store: Store = ctx.store
    new_job(store, "c5", "off", N)
    tasks.execute_chunk(ctx, "c5", "off", names, {"chunk": 0, "soft": True}, "w1")
    new_job(store, "c6", "boot", N)
    counts = tasks.execute_chunk(ctx, "c6", "boot", names, {"chunk": 0, "device": "pxe", "efi": True}, "w1")
    assert counts["ok"] == N
    peers = peer.nodes()
    for name in names:
        assert (peers[name]["counts"]["soft_off"], peers[name]["counts"]["off"]) == (1, 0), name
        assert (peers[name]["boot"], peers[name]["boot_efi"]) == ("pxe", True), name
    assert store.results("c6")[names[0]]["note"] == "next boot: pxe (EFI)"


def test_a_cancel_before_the_first_power_call_leaves_the_nodes_untouched(
    redis_server: Any, prefix: str, secret_key: str, tmp_path: Path,
    fleet: tuple[ipmi_bmc.IpmiFleet, list[SimNode]], sim: tuple[ipmi_bmc.IpmiFleet, list[str]]
) -> None:
    peer, names = sim
    for name in names:
        peer.fault(name, "slow", 0.3)  # a fresh login and a read take 1.5 s: time to cancel
    context = make_ctx(redis_server, prefix, secret_key, tmp_path, fleet[1],
                       POWERQ_IPMI_FLEET_TIMEOUT="3")
    store: Store = context.store
    try:
        new_job(store, "c7", "cycle", N)
        threading.Timer(0.05, store.cancel, ("c7", "test")).start()
        counts = tasks.execute_chunk(context, "c7", "cycle", names, {"chunk": 0}, "w1")
    finally:
        tasks._contexts.pop(id(context.config), None)
        fastpath.close_fleet_client()
    assert counts["skipped"] == N, [r["error"] for r in store.results("c7").values()][:2]
    assert {r["note"] for r in store.results("c7").values()} == {"cancelled"}
    assert all(c["counts"]["off"] == 0 for c in peer.nodes().values())
    assert journal(store, "c7") == {}


def test_nodes_still_running_at_the_chunk_time_limit_are_reported_as_timed_out(
    redis_server: Any, prefix: str, secret_key: str, tmp_path: Path,
    fleet: tuple[ipmi_bmc.IpmiFleet, list[SimNode]], sim: tuple[ipmi_bmc.IpmiFleet, list[str]]
) -> None:
    peer, names = sim
    slow = names[:3]
    for name in slow:
        peer.fault(name, "slow", 2.5)
    context = make_ctx(redis_server, prefix, secret_key, tmp_path, fleet[1], POWERQ_TASK_TIME_LIMIT="1",
                       POWERQ_IPMI_FLEET_TIMEOUT="3")
    try:
        new_job(context.store, "c8", "query", N)
        seen: dict[str, int] = {}
        # Half way, the three slow reads are the rack's calls in flight (issue 7's gauge).
        threading.Timer(0.6, lambda: seen.update(context.metrics._inflight)).start()
        began = time.monotonic()
        counts = tasks.execute_chunk(context, "c8", "query", names, {"chunk": 0}, "w1")
        took = time.monotonic() - began
    finally:
        tasks._contexts.pop(id(context.config), None)
        fastpath.close_fleet_client()
    assert (counts["ok"], counts["error"]) == (N - 3, 3)
    results = context.store.results("c8")
    for name in slow:
        assert results[name]["error"]["code"] == "timeout", results[name]
        assert "chunk time limit" in results[name]["error"]["message"], results[name]
    assert took < 2.5  # the slow reads were given up at the limit, not waited for
    assert seen.get("rb") == 3, seen
    assert context.metrics._inflight.get("rb") == 0  # and counted out when cancelled


def test_a_dead_bmc_costs_one_timeout_not_one_per_attempt(
    ctx: Any, sim: tuple[ipmi_bmc.IpmiFleet, list[str]]
) -> None:
    """The client gave up after all its retransmissions (4 x 0.5 s here), short of the
    call timeout (3 s): the BMC is not asked again in this job."""
    peer, names = sim
    dead = names[2]
    peer.fault(dead, "no_answer")
    store: Store = ctx.store
    new_job(store, "c9", "off", 3)
    began = time.monotonic()
    counts = tasks.execute_chunk(ctx, "c9", "off", names[:3], {"chunk": 0}, "w1")
    took = time.monotonic() - began
    assert (counts["ok"], counts["error"]) == (2, 1)
    error = store.results("c9")[dead]["error"]
    assert error["code"] in ("timeout", "unreachable") and error["attempt"] == 1, error
    assert took < 3.5, took  # one client budget (2 s), not two attempts and a back-off
