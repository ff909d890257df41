"""Prometheus metrics that stay right across processes and hosts.

Workers run in other processes, often on other hosts, than the API that serves
``GET /metrics``; so a worker does not expose anything itself. Each worker process keeps a
:class:`MetricsRecorder` that adds up in memory and writes to Redis in one pipeline each
time the chunk task flushes its results (every 0.25 s while a chunk runs) and on a
heartbeat. The API registers a :class:`RedisCollector` that reads Redis at each scrape.

Redis keys (``P`` is ``key_prefix``):

- ``P:metrics:calls``              hash: ``["<power_type>", "<le>"]`` -> driver calls whose
                                   duration fell in that bucket (not cumulative);
                                   ``["<power_type>", "sum"]`` -> their total seconds
- ``P:metrics:results``            hash: ``["<power_type>", "<outcome>", "<code>"]`` -> results
- ``P:metrics:inflight``           set of the worker processes that publish in-flight counts
- ``P:metrics:inflight:<worker>``  hash: rack -> driver calls running now in that process;
                                   rewritten whole at every flush and heartbeat, expiring
                                   ``3 x metrics_heartbeat`` after the last write, so a
                                   killed worker's calls drop out on their own
- ``P:parked``                     set (or sorted set / hash) of parked BMCs (issue 5's
                                   cool-down; empty until that lands)

Exposed families (labels ``power_type``, ``outcome``, ``code``, ``rack``, ``quantile``;
never a node name, never a secret): see :data:`METRICS`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

log = logging.getLogger("powerq.metrics")

BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the driver call latency histogram; ``+Inf`` is added."""

QUANTILES = ("0.5", "0.9", "0.99", "1")
"""State-age quantiles exposed; ``1`` is the oldest state (the maximum)."""

METRICS: dict[str, str] = {
    "powerq_driver_call_duration_seconds":
        "Duration of one driver call (one attempt: query, on, off, cycle, boot), by power type",
    "powerq_node_results_total":
        "Per-node results by power type, outcome (ok, error, skipped) and error code (none if ok)",
    "powerq_queue_depth": "Chunk messages waiting in a rack's broker queue (Redis broker only)",
    "powerq_inflight_calls": "Driver calls running now, by rack, summed over live workers",
    "powerq_workers_reporting": "Worker processes whose in-flight counts are current",
    "powerq_state_age_seconds":
        "Age of the nodes' latest known power state: quantiles 0.5, 0.9, 0.99 and 1 (oldest)",
    "powerq_state_nodes": "Nodes with a known latest state",
    "powerq_inventory_nodes": "Nodes in the inventory, by rack",
    "powerq_parked_bmcs": "BMCs parked in cool-down after repeated failures, now",
    "powerq_redis_up": "1 when the last scrape could read Redis, else 0",
}

# Kombu's Redis transport keeps priority messages in sibling lists named queue + sep + step.
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def worker_id() -> str:
    """A name for this process: host, pid and a random part (a restarted pid is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------- workers
class MetricsRecorder:
    """What one worker process counts, written to Redis by :meth:`flush`.

    Thread-safe: node threads call :meth:`observe_call`, :meth:`result` and
    :meth:`in_flight`; the chunk task calls :meth:`flush`; :meth:`start` runs a heartbeat
    thread that flushes every ``heartbeat`` seconds (so in-flight counts stay alive while
    calls are long, and go away ``3 x heartbeat`` after the process dies)."""

    def __init__(self, client: Any, prefix: str, *, heartbeat: float = 5.0,
                 buckets: Sequence[float] = BUCKETS, worker: str | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.heartbeat = heartbeat
        self.bounds = tuple(sorted(buckets)) + (float("inf"),)
        self.worker = worker or worker_id()
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str], int] = {}
        self._sums: dict[str, float] = {}
        self._results: dict[tuple[str, str, str], int] = {}
        self._inflight: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, client: Any, config: Any) -> MetricsRecorder:
        return cls(client, config.key_prefix, heartbeat=config.metrics_heartbeat)

    # -- recording (memory only)
    def observe_call(self, power_type: str, seconds: float) -> None:
        """Count one driver call of ``seconds`` in the latency histogram."""
        bound = next(b for b in self.bounds if seconds <= b)
        key = (power_type or "unknown", _le(bound))
        with self._lock:
            self._calls[key] = self._calls.get(key, 0) + 1
            self._sums[key[0]] = self._sums.get(key[0], 0.0) + max(0.0, seconds)

    def result(self, power_type: str, outcome: str, code: str | None) -> None:
        """Count one per-node result."""
        key = (power_type or "unknown", str(outcome), code or "none")
        with self._lock:
            self._results[key] = self._results.get(key, 0) + 1

    @contextlib.contextmanager
    def in_flight(self, rack: str | None) -> Iterator[None]:
        """Count a driver call of ``rack`` as running for the duration of the block."""
        self.call_started(rack)
        try:
            yield
        finally:
            self.call_ended(rack)

    def call_started(self, rack: str | None) -> None:
        """A driver call of ``rack`` is running (:meth:`in_flight` without the context
        manager, for the IPMI batch's coroutines: a hot path)."""
        rack = rack or "unknown"
        with self._lock:
            self._inflight[rack] = self._inflight.get(rack, 0) + 1

    def call_ended(self, rack: str | None) -> None:
        rack = rack or "unknown"
        with self._lock:
            self._inflight[rack] -= 1

    def timed(self, power_type: str, rack: str | None, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (one driver call) counted in flight and timed; returns its value."""
        with self.in_flight(rack):
            started = time.monotonic()
            try:
                return fn()
            finally:
                self.observe_call(power_type, time.monotonic() - started)

    # -- writing
    @property
    def _inflight_key(self) -> str:
        return f"{self.prefix}:metrics:inflight:{self.worker}"

    def flush(self) -> None:
        """Write the counts gathered since the last flush and this process's in-flight
        counts in one pipeline. Never raises: a failed write keeps the counts for the
        next flush and logs a warning (metrics must not fail a chunk)."""
        with self._lock:
            calls, sums, results = self._calls, self._sums, self._results
            self._calls, self._sums, self._results = {}, {}, {}
            inflight = dict(self._inflight)
        try:
            pipe = self.client.pipeline(transaction=False)
            calls_key = f"{self.prefix}:metrics:calls"
            for (ptype, le), n in calls.items():
                pipe.hincrby(calls_key, json.dumps([ptype, le]), n)
            for ptype, total in sums.items():
                pipe.hincrbyfloat(calls_key, json.dumps([ptype, "sum"]), total)
            for key, n in results.items():
                pipe.hincrby(f"{self.prefix}:metrics:results", json.dumps(list(key)), n)
            if inflight:
                pipe.hset(self._inflight_key, mapping=inflight)
                pipe.pexpire(self._inflight_key, max(100, int(self.heartbeat * 3000)))
                pipe.sadd(f"{self.prefix}:metrics:inflight", self.worker)
            pipe.execute()
        except Exception as exc:  # Redis down: keep the counts for the next flush
            log.warning("metrics write failed: %s", type(exc).__name__)
            with self._lock:
                for k, v in calls.items():
                    self._calls[k] = self._calls.get(k, 0) + v
                for p, s in sums.items():
                    self._sums[p] = self._sums.get(p, 0.0) + s
                for r, v in results.items():
                    self._results[r] = self._results.get(r, 0) + v

    def start(self) -> MetricsRecorder:
        """Start the heartbeat thread (a daemon); returns self."""
        if self._thread is None:
            def loop() -> None:
                while not self._stop.wait(self.heartbeat):
                    self.flush()

            self._thread = threading.Thread(target=loop, name="powerq-metrics", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the heartbeat, write what is left and withdraw the in-flight counts."""
        self._stop.set()
        self.flush()
        with contextlib.suppress(Exception):
            self.client.delete(self._inflight_key)
            self.client.srem(f"{self.prefix}:metrics:inflight", self.worker)


# --------------------------------------------------------------------------- the API
def percentiles(values: Iterable[float], quantiles: Sequence[str] = QUANTILES) -> dict[str, float]:
    """Nearest-rank quantiles of ``values`` ({} when empty)."""
    ordered = sorted(values)
    if not ordered:
        return {}
    out = {}
    for q in quantiles:
        rank = min(len(ordered), max(1, math.ceil(float(q) * len(ordered))))
        out[q] = ordered[rank - 1]
    return out


class RedisCollector:
    """A prometheus_client collector reading what workers wrote, the state hash, the
    inventory and the broker queues, at each scrape. Never raises: with Redis down it
    yields ``powerq_redis_up 0`` only."""

    def __init__(self, store: Any, inventory: Any, broker_url: str | None,
                 clock: Callable[[], float] = time.time, *,
                 broker_ssl: dict[str, Any] | None = None) -> None:
        self.store = store
        self.client = store.client
        self.prefix = store.prefix
        self.inventory = inventory
        self.clock = clock
        self._broker: Any = None
        self._ssl = dict(broker_ssl or {})  # rediss:// options of the broker (issue 5)
        self._broker_url = broker_url if broker_url and broker_url.startswith(
            ("redis://", "rediss://", "unix://")) else None
        self._racks: tuple[str | None, dict[str, int]] | None = None
        self._lock = threading.Lock()

    def describe(self) -> list[Any]:
        return []  # families are built at collect time; nothing to check at register time

    def _broker_client(self) -> Any:
        if self._broker is None and self._broker_url:
            import redis

            self._broker = redis.Redis.from_url(self._broker_url, decode_responses=True,
                                                **self._ssl)
        return self._broker

    def _rack_counts(self) -> dict[str, int]:
        """Nodes per rack, read again only when the inventory's stamp changes."""
        stamp_of = getattr(self.inventory, "stamp", None)
        stamp = stamp_of() if stamp_of is not None else None
        with self._lock:
            if self._racks is None or stamp is None or self._racks[0] != stamp:
                counts: dict[str, int] = {}
                for info in self.inventory.node_index().values():
                    counts[info.rack] = counts.get(info.rack, 0) + 1
                self._racks = (stamp, counts)
            return dict(self._racks[1])

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            families = list(self._families())
        except Exception as exc:
            log.warning("metrics scrape failed: %s", type(exc).__name__)
            families = []
            up = 0
        else:
            up = 1
        yield from families
        yield GaugeMetricFamily("powerq_redis_up", METRICS["powerq_redis_up"], value=up)

    def _families(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(f"{self.prefix}:metrics:calls")
        pipe.hgetall(f"{self.prefix}:metrics:results")
        pipe.smembers(f"{self.prefix}:metrics:inflight")
        pipe.type(f"{self.prefix}:parked")
        calls_raw, results_raw, workers, parked_type = pipe.execute()

        # latency histogram
        per_type: dict[str, dict[str, float]] = {}
        for field, value in calls_raw.items():
            ptype, le = json.loads(field)
            per_type.setdefault(ptype, {})[le] = float(value)
        hist = HistogramMetricFamily("powerq_driver_call_duration_seconds",
                                     METRICS["powerq_driver_call_duration_seconds"],
                                     labels=["power_type"])
        for ptype, fields in sorted(per_type.items()):
            total = fields.pop("sum", 0.0)
            bounds = sorted({_le(b) for b in BUCKETS} | set(fields) | {"+Inf"},
                            key=lambda s: float(s))
            running, buckets = 0.0, []
            for le in bounds:
                running += fields.get(le, 0.0)
                buckets.append((le, running))
            hist.add_metric([ptype], buckets, total)
        yield hist

        results = CounterMetricFamily("powerq_node_results", METRICS["powerq_node_results_total"],
                                      labels=["power_type", "outcome", "code"])
        for field, value in sorted(results_raw.items()):
            results.add_metric(json.loads(field), float(value))
        yield results

        # in-flight calls: live workers only (an expired key means a dead worker)
        names = sorted(workers)
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(f"{self.prefix}:metrics:inflight:{name}")
        inflight: dict[str, int] = {}
        live = 0
        dead = []
        for name, counts in zip(names, pipe.execute() if names else [], strict=True):
            if not counts:
                dead.append(name)
                continue
            live += 1
            for rack, n in counts.items():
                inflight[rack] = inflight.get(rack, 0) + int(n)
        if dead:
            self.client.srem(f"{self.prefix}:metrics:inflight", *dead)

        racks = self._rack_counts()
        every_rack = sorted(set(racks) | set(inflight))
        gauge = GaugeMetricFamily("powerq_inflight_calls", METRICS["powerq_inflight_calls"],
                                  labels=["rack"])
        for rack in every_rack:
            gauge.add_metric([rack], inflight.get(rack, 0))
        yield gauge
        yield GaugeMetricFamily("powerq_workers_reporting", METRICS["powerq_workers_reporting"],
                                value=live)

        inv = GaugeMetricFamily("powerq_inventory_nodes", METRICS["powerq_inventory_nodes"],
                                labels=["rack"])
        for rack in sorted(racks):
            inv.add_metric([rack], racks[rack])
        yield inv

        broker = self._broker_client()
        if broker is not None:
            depth = GaugeMetricFamily("powerq_queue_depth", METRICS["powerq_queue_depth"],
                                      labels=["rack"])
            pipe = broker.pipeline(transaction=False)
            for rack in every_rack:
                queue = f"powerq.rack.{rack}"
                pipe.llen(queue)
                for step in _KOMBU_PRIORITY_STEPS:
                    pipe.llen(f"{queue}{_KOMBU_PRIORITY_SEP}{step}")
            lengths = pipe.execute() if every_rack else []
            width = 1 + len(_KOMBU_PRIORITY_STEPS)
            for i, rack in enumerate(every_rack):
                depth.add_metric([rack], sum(lengths[i * width:(i + 1) * width]))
            yield depth

        # poll freshness
        now = self.clock()
        ages = []
        for raw in self.client.hvals(f"{self.prefix}:state"):
            try:
                at = json.loads(raw).get("at")
            except (ValueError, AttributeError):
                continue
            if at:
                ages.append(max(0.0, now - float(at)))
        age = GaugeMetricFamily("powerq_state_age_seconds", METRICS["powerq_state_age_seconds"],
                                labels=["quantile"])
        for q, value in percentiles(ages).items():
            age.add_metric([q], round(value, 3))
        yield age
        yield GaugeMetricFamily("powerq_state_nodes", METRICS["powerq_state_nodes"], value=len(ages))

        size = {"set": "scard", "zset": "zcard", "hash": "hlen", "list": "llen"}.get(parked_type)
        if parked_type == "zset":  # issue 5: scored by when the cool-down ends
            parked = self.client.zcount(f"{self.prefix}:parked", f"({self.clock()}", "+inf")
        else:
            parked = getattr(self.client, size)(f"{self.prefix}:parked") if size else 0
        yield GaugeMetricFamily("powerq_parked_bmcs", METRICS["powerq_parked_bmcs"], value=parked)


def metrics_registry(store: Any, inventory: Any, config: Any) -> Any:
    """A prometheus_client registry holding only powerq's collector."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    from .config import redis_ssl_options

    url = config.effective_broker_url
    registry.register(RedisCollector(store, inventory, url,  # type: ignore[arg-type]
                                     broker_ssl=redis_ssl_options(config, url)))
    return registry


def install(app: Any, store: Any, inventory: Any, config: Any, reader: Any) -> None:
    """Add ``GET /metrics`` (Prometheus text format) to the FastAPI ``app``. With
    ``config.metrics_auth`` it needs a read-scope token (``reader``, a dependency)."""
    from fastapi import Depends, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = metrics_registry(store, inventory, config)
    dependencies = [Depends(reader)] if config.metrics_auth else []

    @app.get("/metrics", include_in_schema=False, dependencies=dependencies)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["BUCKETS", "METRICS", "MetricsRecorder", "RedisCollector", "install",
           "metrics_registry", "percentiles", "worker_id"]
