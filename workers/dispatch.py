"""What the scheduler asks of Celery: which rack queues have workers, and sending chunks.

The scheduler never imports Celery itself; it calls these.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

from celery import Celery

from scheduler.config import Config
from scheduler.planner import Plan
from workers.app import TASK_RUN_CHUNK, make_app, rack_queue, rack_queue_name

log = logging.getLogger("powerq.worker")


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


# -- worker presence (issue 4): which racks have a live worker, without a broadcast -------------
PRESENCE_EVERY = 2.0
"""Seconds between a worker's presence beats; a beat older than 3 of these is not counted."""

# KEYS: one presence set per rack. ARGV: member. Scored with the Redis server's clock.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - 60)
end
return 1
"""

# KEYS: presence sets. ARGV: window seconds. Returns the live members per set.
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('ZCOUNT', KEYS[i], now - tonumber(ARGV[1]), '+inf')
end
return out
"""


def presence_key(prefix: str, rack: str) -> str:
    return f"{prefix}:rackworkers:{rack}"


class Presence:
    """A worker's beat in ``P:rackworkers:<rack>`` every :data:`PRESENCE_EVERY` seconds,
    so the CLI knows a rack has a live worker at once instead of waiting for the answers
    of a broadcast (``inspect``), which always takes its whole timeout."""

    def __init__(self, client: Any, prefix: str, racks: Sequence[str], member: str) -> None:
        self.client, self.member = client, member
        self.keys = [presence_key(prefix, r) for r in racks]
        self._beat = client.register_script(_BEAT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="powerq-presence", daemon=True)

    def start(self) -> Presence:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            try:
                self._beat(keys=self.keys, args=[self.member])
            except Exception as exc:  # Redis away: the next beat tries again
                log.debug("presence beat failed: %s", type(exc).__name__)
            if self._stop.wait(PRESENCE_EVERY):
                return

    def stop(self) -> None:
        """Stop beating and withdraw (a stopped worker is gone at once, not 6 s later)."""
        self._stop.set()
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in self.keys:
                pipe.zrem(key, self.member)
            pipe.execute()
        except Exception:  # Redis away: the beat ages out by itself
            pass


def racks_with_presence(client: Any, prefix: str, racks: Sequence[str]) -> set[str]:
    """The racks among ``racks`` with a worker that beat within the last 3 beats."""
    if not racks:
        return set()
    counts = client.register_script(_LIVE)(keys=[presence_key(prefix, r) for r in racks],
                                            args=[3 * PRESENCE_EVERY])
    return {r for r, n in zip(racks, counts, strict=True) if int(n)}


def racks_without_worker(app: Celery, racks: Sequence[str], timeout: float,
                         client: Any = None, prefix: str = "powerq") -> list[str]:
    """The racks no worker consumes. Racks with a live presence beat are taken as served
    at once; only the others are asked by broadcast (which waits ``timeout``)."""
    racks = list(racks)
    if client is not None:
        try:
            live = racks_with_presence(client, prefix, racks)
        except Exception:  # no presence to read: ask the workers
            live = set()
        racks = [r for r in racks if r not in live]
        if not racks:
            return []
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
    from scheduler.store import Store

    presence = Presence(Store.from_config(config).client, config.key_prefix, racks, name).start()
    try:
        worker.start()
    finally:
        presence.stop()
