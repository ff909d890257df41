"""Never a partial enqueue (issue 5): a job whose chunks could not all be queued acts on no
node, even for the chunks that did reach the broker and a live worker.

The broker failing between two publishes is a fault at an exact instant, so the test's
``send`` publishes the first chunk through the real path and then raises, as a dropped
broker connection would; everything else is real (Redis, a rack worker, simulated BMCs)."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.config import Config
from scheduler.inventory import InventoryStore
from scheduler.planner import Plan, make_plan, submit
from scheduler.secrets import SecretBox
from scheduler.store import Store
from tests.fullpath import FullPath
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FullPath, ipmi_bmc.IpmiFleet,
                                                                      list[SimNode]]]:
    workdir = Path(tmp_path_factory.mktemp("enqueue"))
    nodes = ipmi_bmc.make_nodes(6, "fp", first_address="127.35.1.21", prefix="enq",
                                password="enq-ipmi-Pa55")
    fleet = ipmi_bmc.start_fleet(nodes, workdir / "sim")
    fp = FullPath(workdir)
    try:
        fp.start()
        fp.load(n.inventory_entry() for n in nodes)
        yield fp, fleet, nodes
    finally:
        fp.stop()
        fleet.stop()


def _submit(fp: FullPath, names: list[str], send_first_only: bool) -> tuple[str, Store, Plan]:
    from workers.dispatch import app_for, racks_without_worker, send_plan

    config = Config.from_env(fp.env)
    store = Store.from_config(config)
    inventory = InventoryStore(store.client, config.key_prefix, SecretBox.from_config(config))
    plan = make_plan("on", ",".join(names), inventory.node_index(), chunk_size=2)
    assert len(plan.chunks) == 3
    app = app_for(config)
    sent: list[str] = []

    def send(job_id: str, p: Plan) -> int:
        if not send_first_only:
            return send_plan(app, job_id, p)
        first = copy.copy(p)
        first.chunks = p.chunks[:1]
        send_plan(app, job_id, first)
        sent.append(job_id)
        raise ConnectionError("the broker went away after the first chunk")

    def missing(racks: object) -> list[str]:
        return racks_without_worker(app, racks, 2.0, store.client, config.key_prefix)

    if send_first_only:
        with pytest.raises(ConnectionError):
            submit(plan, store, racks_without_worker=missing, send=send, requested_by="test")
        return sent[0], store, plan
    return submit(plan, store, racks_without_worker=missing, send=send, requested_by="test"), store, plan


def test_a_job_queued_in_part_acts_on_no_node(stack: tuple[FullPath, ipmi_bmc.IpmiFleet,
                                                           list[SimNode]]) -> None:
    fp, fleet, nodes = stack
    names = [n.name for n in nodes]
    for name in names:
        fleet.set_state(name, "off")
    fleet.reset()
    job_id, store, plan = _submit(fp, names, send_first_only=True)
    first = plan.chunks[0][1]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(store.results(job_id)) < len(first):
        time.sleep(0.1)
    results = store.results(job_id)
    assert sorted(results) == sorted(first), results  # the queued chunk ran ...
    assert all(r["outcome"] == "skipped" and r["note"] == "cancelled" for r in results.values()), results
    peers = fleet.nodes()
    for name in names:  # ... and sent nothing to any BMC
        assert peers[name]["power"] == "off", (name, peers[name])
        assert not peers[name]["counts"].get("on"), (name, peers[name]["counts"])
    job = store.job(job_id)
    assert job is not None and job["status"] == "failed", job
    assert "could not queue" in job["failure"]

    # The same request queued whole runs as usual.
    job_id, store, _ = _submit(fp, names, send_first_only=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (store.job(job_id) or {}).get("status") != "done":
        time.sleep(0.1)
    results = store.results(job_id)
    assert sorted(results) == sorted(names), (store.job(job_id), results, fp.worker_log()[-3000:])
    assert all(r["outcome"] == "ok" for r in results.values()), results
    assert all(fleet.nodes()[name]["power"] == "on" for name in names)
