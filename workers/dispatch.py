"""What the scheduler asks of Celery: which rack queues have workers, and sending chunks.

The scheduler never imports Celery itself; it calls these.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from celery import Celery

from scheduler.config import Config
from scheduler.planner import Plan
from workers.app import TASK_RUN_CHUNK, make_app, rack_queue, rack_queue_name


def app_for(config: Config) -> Celery:
    return make_app(config)


def consumed_queues(app: Celery, timeout: float) -> dict[str, list[str]]:
    """Queue name -> the workers consuming it, as the workers answer within ``timeout``."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    out: dict[str, list[str]] = {}
    for worker, queues in replies.items():
        for q in queues or []:
            out.setdefault(q.get("name", ""), []).append(worker)
    return out


def racks_without_worker(app: Celery, racks: Sequence[str], timeout: float) -> list[str]:
    queues = consumed_queues(app, timeout)
    return [r for r in racks if rack_queue_name(r) not in queues]


def _publish(app: Celery, producer: Any, rack: str, args: list[Any]) -> None:
    """One chunk message, routed through the rack's direct exchange (declared with its
    queue and binding on the way, as the rack's workers declare them), persistent."""
    queue = rack_queue(rack)
    app.send_task(
        TASK_RUN_CHUNK,
        args=args,
        queue=queue,
        exchange=queue.exchange.name,
        routing_key=queue.routing_key,
        producer=producer,
    )


def send_chunks(
    app: Celery,
    job_id: str | None,
    action: str,
    chunks: Sequence[tuple[str, list[str]]],
    options: dict[str, Any],
) -> int:
    """Publish one message per (rack, node names) chunk over one connection. Returns the
    number sent; raises the broker's error if a publish fails."""
    sent = 0
    with app.producer_or_acquire() as producer:
        for index, (rack, nodes) in enumerate(chunks):
            opts = dict(options) if job_id is None else {**options, "chunk": index}
            _publish(app, producer, rack, [job_id, action, list(nodes), opts])
            sent += 1
    return sent


def send_plan(app: Celery, job_id: str, plan: Plan) -> int:
    """Publish a submitted plan's chunks, each with its part of the timeline."""
    sent = 0
    with app.producer_or_acquire() as producer:
        for index, (rack, nodes) in enumerate(plan.chunks):
            # "chunk": its index, so the job counts each chunk once however often delivered
            _publish(app, producer, rack, [job_id, plan.action, list(nodes),
                                           {**plan.options_for(nodes), "chunk": index}])
            sent += 1
    return sent


def run_worker(
    config: Config, racks: Sequence[str], *, concurrency: int = 2, loglevel: str = "INFO",
    hostname: str | None = None,
) -> None:
    """Run a rack worker in this process until it is stopped."""
    if config.ipmi_fastpath:
        # Issue 4: this process' IPMI power calls go over its one RMCP+ client, whose
        # sessions stay open across chunks and jobs (workers/fastpath.py).
        from drivers.ipmi import use_lanplus
        from workers.fastpath import fleet_client

        use_lanplus(fleet_client(config))
    app = make_app(config)
    queues = [rack_queue(r) for r in racks]
    app.conf.task_queues = queues
    name = hostname or f"rack-{'+'.join(racks)}@{socket.gethostname()}"
    worker = app.Worker(
        queues=[q.name for q in queues],
        hostname=name,
        # Threads: the consumer keeps answering control messages (inspect, Flower) while
        # chunks run, and each chunk fans out to its own bounded node pool.
        pool="threads",
        concurrency=concurrency,
        without_gossip=True,
        without_mingle=True,
        loglevel=loglevel,
        send_events=True,
    )
    worker.start()
