"""The whole job path with RabbitMQ as the broker (POWERQ_BROKER_URL=amqp://...).

Results, job state and the inventory stay in the stack's own Redis; only the chunk
messages and the workers' control traffic (inspect, events) go through RabbitMQ. The
RabbitMQ answering on 127.0.0.1:5672 is shared: this module works in a vhost of its own
when ``rabbitmqctl`` can create one, otherwise in the default vhost with rack names no
other run uses, and it deletes every queue and exchange it made (or its vhost) at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from tests.fullpath import FullPath, exercise
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode

pytestmark = pytest.mark.integration

AMQP_SERVER = "amqp://guest:guest@127.0.0.1:5672"
RUN = uuid.uuid4().hex[:8]
RACK = f"amqp{RUN}"
IDLE_RACK = f"amqp{RUN}idle"
TAP_QUEUE = f"powerq.test.tap.{RUN}"
PASSWORD = f"amqp-secret-{RUN}"


def _rabbitmqctl(*args: str) -> bool:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return False
    try:
        done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


class Broker:
    """Where this module's messages go, and the cleanup of everything put there."""

    def __init__(self) -> None:
        self.vhost = f"powerq-test-{RUN}"
        self.own_vhost = _rabbitmqctl("add_vhost", self.vhost) and _rabbitmqctl(
            "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"
        )
        if not self.own_vhost:
            _rabbitmqctl("delete_vhost", self.vhost)
        self.url = f"{AMQP_SERVER}/{self.vhost}" if self.own_vhost else f"{AMQP_SERVER}//"

    def connection(self) -> Connection:
        return Connection(self.url, connect_timeout=10)

    def cleanup(self) -> None:
        if self.own_vhost and _rabbitmqctl("delete_vhost", self.vhost):
            return
        # Shared vhost: delete what this run declared (queues, their exchanges).
        with self.connection() as conn:
            for name in (f"powerq.rack.{RACK}", f"powerq.rack.{IDLE_RACK}", TAP_QUEUE):
                channel = conn.channel()
                try:
                    channel.queue_delete(name)
                    channel.exchange_delete(name)
                finally:
                    channel.close()
            # Celery's own exchanges, created by this run's workers if nobody had: removed
            # only when nothing is bound to them any more (another Celery may use them).
            for name in ("celery.pidbox", "reply.celery.pidbox", "celeryev"):
                channel = conn.channel()
                try:
                    channel.exchange_delete(name, if_unused=True)
                except Exception:  # in use by someone else: theirs to keep
                    pass
                finally:
                    if channel.is_open:
                        channel.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    b = Broker()
    try:
        with b.connection() as conn:
            conn.ensure_connection(max_retries=3)
        yield b
    finally:
        b.cleanup()


@pytest.fixture(scope="module")
def amqp_fp(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullPath]:
    fp = FullPath(tmp_path_factory.mktemp("fp-amqp"), racks=(RACK,), broker_url=broker.url)
    try:
        fp.start()
        yield fp
    finally:
        fp.stop()


@pytest.fixture(scope="module")
def ipmi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ipmi_bmc.IpmiFleet, list[SimNode]]]:
    nodes = ipmi_bmc.make_nodes(3, RACK, first_address="127.39.0.1", prefix="amqp", password=PASSWORD)
    fleet = ipmi_bmc.start_fleet(nodes, Path(tmp_path_factory.mktemp("amqp-ipmi")))
    yield fleet, nodes
    fleet.stop()


def test_worker_declares_durable_rack_queue(amqp_fp: FullPath, broker: Broker) -> None:
    """The rack's queue lives on RabbitMQ, durable, with the worker consuming it (the
    FullPath only starts once `powerq workers` saw it: inspect works over AMQP)."""
    import amqp

    name = f"powerq.rack.{RACK}"
    assert name in amqp_fp.pq_json("workers")
    with broker.connection() as conn:
        channel = conn.channel()
        _, _, consumers = channel.queue_declare(name, passive=True)
        assert consumers >= 1
        # Re-declaring it non-durable is refused: the queue the worker declared is durable.
        with pytest.raises(amqp.exceptions.PreconditionFailed):
            conn.channel().queue_declare(name, durable=False, auto_delete=False)


def test_job_path_over_amqp(
    amqp_fp: FullPath, ipmi: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]
) -> None:
    fleet, nodes = ipmi
    amqp_fp.load(n.inventory_entry() for n in nodes)
    exercise(amqp_fp, fleet.nodes, fleet.set_state, fleet.reset, [n.name for n in nodes], boot=True)


def test_rack_without_worker_is_refused(
    amqp_fp: FullPath, broker: Broker, ipmi: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]
) -> None:
    import amqp

    fleet, nodes = ipmi
    first = nodes[0].inventory_entry()
    idle = {**first, "name": "amqp-idle-0001", "rack": IDLE_RACK,
            "power_parameters": {**first["power_parameters"], "power_address": "127.39.0.9"}}
    amqp_fp.load([*(n.inventory_entry() for n in nodes), idle])
    fleet.reset()
    out = amqp_fp.pq("on", "amqp-idle-0001", "--yes", "--json")
    assert out.returncode == 2, out.stdout + out.stderr
    assert IDLE_RACK in out.stdout + out.stderr
    # Refused before anything was published: no queue was even declared for that rack.
    with broker.connection() as conn, pytest.raises(amqp.exceptions.NotFound):
        conn.channel().queue_declare(f"powerq.rack.{IDLE_RACK}", passive=True)
    assert not any(fleet.nodes()[n.name]["counts"].get("on") for n in nodes)


def test_chunk_message_is_persistent_json_without_secret(
    amqp_fp: FullPath, broker: Broker, ipmi: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]
) -> None:
    """A copy of a real chunk message, sent by the CLI, read raw from a queue bound to the
    rack's exchange that nobody consumes."""
    fleet, nodes = ipmi
    amqp_fp.load(n.inventory_entry() for n in nodes)
    name = f"powerq.rack.{RACK}"
    with broker.connection() as conn:
        tap = Queue(TAP_QUEUE, Exchange(name, type="direct", durable=True), routing_key=name,
                    durable=False, auto_delete=False)
        bound = tap(conn.channel())
        bound.declare()
        try:
            job = amqp_fp.run("query", nodes[0].name)
            assert job["by_node"][nodes[0].name]["outcome"] == "ok", job
            message: Any = bound.get(no_ack=True)
            assert message is not None, "no copy of the chunk message reached the tap queue"
            assert bound.get(no_ack=True) is None  # one node, one chunk, one message
        finally:
            bound.delete()
    assert message.content_type == "application/json"
    assert message.properties.get("delivery_mode") == 2  # persistent
    args, kwargs, _embed = json.loads(message.body)
    job_id, action, node_names, options = args
    assert (job_id, action, node_names) == (job["job"]["id"], "query", [nodes[0].name])
    assert isinstance(options, dict) and kwargs == {}
    raw = message.body if isinstance(message.body, str) else message.body.decode()
    for text in (raw, json.dumps(message.headers, default=str), json.dumps(message.properties, default=str)):
        assert PASSWORD not in text
        assert "power_pass" not in text
