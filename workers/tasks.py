"""The chunk task: one broker message carries one rack chunk (node names only).

For each node: load its settings from the inventory store, look its driver up, run the
action through the execution policy, store a plain result. Nodes run side by side in a
bounded thread pool; the policy keeps one call in flight per BMC.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from celery import shared_task

from drivers import registry
from drivers.errors import CallTimeoutError, PowerError, SettingsError
from scheduler.config import Config
from scheduler.inventory import InventoryNode, InventoryStore
from scheduler.secrets import SecretBox
from scheduler.store import Store
from workers.app import TASK_RUN_CHUNK, config_of
from workers.policy import NodeResult, NodeRunner, Outcome, PolicySettings

log = logging.getLogger("powerq.worker")

FLUSH_EVERY = 0.25  # seconds between result writes while a chunk runs
FLUSH_SIZE = 200  # results per pipelined write at most


@dataclass
class WorkerContext:
    """What a worker process builds once and reuses for every chunk."""

    config: Config
    store: Store
    inventory: InventoryStore
    runner: NodeRunner


_contexts: dict[int, WorkerContext] = {}
_contexts_lock = threading.Lock()


def context_for(config: Config) -> WorkerContext:
    with _contexts_lock:
        ctx = _contexts.get(id(config))
        if ctx is None:
            store = Store.from_config(config)
            inventory = InventoryStore(store.client, config.key_prefix, SecretBox.from_config(config))
            runner = NodeRunner(PolicySettings.from_config(config))
            ctx = _contexts[id(config)] = WorkerContext(config, store, inventory, runner)
        return ctx


def run_node(
    ctx: WorkerContext, name: str, record: InventoryNode | None, action: str,
    options: dict[str, Any], worker: str,
) -> NodeResult:
    """Load the driver for one node and run the action. Never raises."""
    if record is None:
        result = NodeResult(node=name, action=action, outcome=Outcome.ERROR, worker=worker,
                            started=time.time())
        result.error = SettingsError(f"node {name} is not in the inventory").to_dict()
        result.finished = time.time()
        return result
    try:
        driver_cls = registry.get(record.power_type)
        settings = driver_cls.validate(record.params)
        driver = driver_cls(settings, timeout=ctx.config.call_timeout)
    except PowerError as exc:
        result = NodeResult(node=name, action=action, outcome=Outcome.ERROR, worker=worker,
                            started=time.time(), power_type=record.power_type)
        result.error = exc.to_dict()
        result.finished = time.time()
        return result
    node_options = dict(options)
    if "soft" not in node_options and getattr(settings, "power_off_mode", None) == "soft":
        node_options["soft"] = True
    try:
        return ctx.runner.run(name, driver, action, node_options, worker)
    finally:
        try:
            driver.close()
        except Exception:  # close() must never raise; a driver bug must not kill the chunk
            log.warning("driver close failed for %s", name)


def execute_chunk(
    ctx: WorkerContext, job_id: str | None, action: str, nodes: list[str],
    options: dict[str, Any], worker: str,
) -> dict[str, int]:
    """Run one chunk and write its results as they come. Returns counts by outcome."""
    if job_id:
        ctx.store.chunk_started(job_id)
    records = ctx.inventory.load_nodes(nodes)
    counts = {str(o): 0 for o in Outcome}
    pending: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    deadline = time.monotonic() + ctx.config.task_time_limit

    def flush() -> None:
        nonlocal pending, last_flush
        if pending:
            ctx.store.record_results(job_id, pending)
            pending = []
        last_flush = time.monotonic()

    pool = ThreadPoolExecutor(
        max_workers=max(1, min(ctx.config.node_concurrency, len(nodes))),
        thread_name_prefix="powerq-node",
    )
    futures: dict[Future[NodeResult], str] = {
        pool.submit(run_node, ctx, name, records.get(name), action, options, worker): name
        for name in nodes
    }
    try:
        remaining = set(futures)
        while remaining:
            timeout = min(FLUSH_EVERY, max(0.0, deadline - time.monotonic()))
            done, remaining = wait(remaining, timeout=timeout, return_when=FIRST_COMPLETED)
            for fut in done:
                result = fut.result()
                counts[result.outcome] += 1
                pending.append(result.to_dict())
            if len(pending) >= FLUSH_SIZE or time.monotonic() - last_flush >= FLUSH_EVERY:
                flush()
            if remaining and time.monotonic() >= deadline:
                for fut in remaining:
                    late = NodeResult(node=futures[fut], action=action, outcome=Outcome.ERROR,
                                      worker=worker, started=time.time(), finished=time.time())
                    late.error = CallTimeoutError(
                        f"chunk time limit of {ctx.config.task_time_limit:g} s reached"
                    ).to_dict()
                    counts[late.outcome] += 1
                    pending.append(late.to_dict())
                break
        flush()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if job_id:
        ctx.store.chunk_finished(job_id)
    return counts


@shared_task(name=TASK_RUN_CHUNK, bind=True, ignore_result=True)
def run_chunk(
    self: Any, job_id: str | None, action: str, nodes: list[str], options: dict[str, Any]
) -> dict[str, int]:
    """Celery entry point. Arguments are node names and plain options, never secrets."""
    config = config_of(self.app)
    worker = self.request.hostname or ""
    ctx = context_for(config)
    counts = execute_chunk(ctx, job_id, action, list(nodes), dict(options or {}), worker)
    log.info("chunk %s %s: %d nodes, %s", job_id or "poll", action, len(nodes), counts)
    return counts
