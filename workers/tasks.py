"""The chunk task: one broker message carries one rack chunk (node names only).

For each node: load its settings from the inventory store, look its driver up, run the
action through the execution policy, store a plain result. Nodes run side by side in a
bounded thread pool; the policy keeps one call in flight per BMC.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import redis
from celery import shared_task
from celery.exceptions import Reject

from drivers import registry
from drivers.errors import CallTimeoutError, DeviceError, PowerError, SettingsError
from scheduler.config import Config
from scheduler.inventory import InventoryNode, InventoryStore
from scheduler.logs import current_context, log_context
from scheduler.metrics import MetricsRecorder
from scheduler.secrets import SecretBox
from scheduler.store import Store
from workers import fastpath
from workers.app import TASK_RUN_CHUNK, config_of
from workers.bmcguard import BmcGuard
from workers.policy import NodeResult, NodeRunner, Outcome, PolicySettings
from workers.release import Admission, CancelWatch, Release

log = logging.getLogger("powerq.worker")

FLUSH_EVERY = 0.25  # seconds between result writes while a chunk runs
FLUSH_SIZE = 200  # results per pipelined write at most
METRICS_EVERY = 1.0  # seconds between a running chunk's metric writes


@dataclass
class WorkerContext:
    """What a worker process builds once and reuses for every chunk."""

    config: Config
    store: Store
    inventory: InventoryStore
    runner: NodeRunner
    admission: Admission
    metrics: MetricsRecorder | None = None  # observability (issue 7)


# --- observability hooks (issue 7): driver call latency, in-flight calls, log context ------
@dataclass
class MeteredRunner(NodeRunner):
    """A :class:`NodeRunner` whose every driver call attempt is timed and counted in
    flight for its rack (scheduler/metrics.py), and runs with the caller's log context
    (the policy runs calls in a watchdog thread, which would otherwise start empty)."""

    metrics: MetricsRecorder | None = None

    def call(self, driver: Any, fn: Any, result: NodeResult, *, retry: bool = True) -> Any:
        parent = contextvars.copy_context()
        metrics, rack = self.metrics, current_context().get("rack")

        def wrapped() -> Any:
            if metrics is None:
                return parent.copy().run(fn)
            return parent.copy().run(metrics.timed, driver.power_type, rack, fn)

        return super().call(driver, wrapped, result, retry=retry)


def _count_result(ctx: WorkerContext, result: NodeResult) -> None:
    if ctx.metrics is not None:
        ctx.metrics.result(result.power_type, result.outcome, (result.error or {}).get("code"))
# --- end of observability hooks -------------------------------------------------------------


_contexts: dict[int, WorkerContext] = {}
_contexts_lock = threading.Lock()


def context_for(config: Config) -> WorkerContext:
    with _contexts_lock:
        ctx = _contexts.get(id(config))
        if ctx is None:
            store = Store.from_config(config)
            inventory = InventoryStore(store.client, config.key_prefix, SecretBox.from_config(config))
            metrics = MetricsRecorder.from_config(store.client, config).start()  # issue 7
            runner = MeteredRunner(PolicySettings.from_config(config), metrics=metrics,
                                   guard=BmcGuard.from_config(store.client, config))  # issue 5
            admission = Admission(store.client, config.key_prefix)
            ctx = _contexts[id(config)] = WorkerContext(config, store, inventory, runner, admission,
                                                        metrics)
        return ctx


def _skipped(name: str, action: str, worker: str, note: str) -> NodeResult:
    now = time.time()
    return NodeResult(node=name, action=action, outcome=Outcome.SKIPPED, worker=worker,
                      started=now, finished=now, note=note)


def run_node(
    ctx: WorkerContext, name: str, record: InventoryNode | None, action: str,
    options: dict[str, Any], worker: str, cancel: CancelWatch | None = None,
    gate: Release | None = None, on_act: Callable[[str], None] | None = None,
) -> NodeResult:
    """Load the driver for one node and run the action. Never raises. ``on_act`` (the
    journal) is called right before the first call that may change the node."""
    # observability (issue 7): this node's log lines carry node, rack and power type
    with log_context(node=name, rack=record.rack if record else None,
                     power_type=record.power_type if record else None):
        result = _run_node(ctx, name, record, action, options, worker, cancel, gate, on_act)
        code = (result.error or {}).get("code")
        log.log(logging.INFO if code else logging.DEBUG, "node %s %s: %s%s (%d call(s))", name,
                action, result.outcome, f" {code}" if code else "", result.attempts)
        return result


def _run_node(
    ctx: WorkerContext, name: str, record: InventoryNode | None, action: str,
    options: dict[str, Any], worker: str, cancel: CancelWatch | None,
    gate: Release | None, on_act: Callable[[str], None] | None = None,
) -> NodeResult:
    if cancel is not None and cancel.event.is_set():
        return _skipped(name, action, worker, "cancelled")
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
        if action == "enlist":
            from workers.enlist import enlist

            return enlist(ctx.runner, ctx.inventory, record, driver, str(options.get("username")),
                          ctx.config.call_timeout, worker, on_act=on_act)
        return ctx.runner.run(name, driver, action, node_options, worker, gate=gate, on_act=on_act)
    finally:
        try:
            driver.close()
        except Exception:  # close() must never raise; a driver bug must not kill the chunk
            log.warning("driver close failed for %s", name)


ENQUEUE_WAIT = 30.0
"""Seconds a chunk waits for its submitter to finish queuing the job's other chunks."""


def _await_whole_enqueue(ctx: WorkerContext, job_id: str, cancel: CancelWatch) -> None:
    """Hold the chunk until every chunk of its job is on the broker (issue 5: never a
    partial enqueue). If the submitter failed part-way, the job carries a cancel flag and
    every node of this chunk is skipped as cancelled; if it went silent for
    :data:`ENQUEUE_WAIT` seconds (killed half-way), this chunk fails the job the same way."""
    deadline = time.monotonic() + ENQUEUE_WAIT
    while True:
        # Redis unreachable past the store's own retries raises, and the chunk is handed
        # back to the broker like any chunk that cannot reach its store.
        state = ctx.store.enqueue_state(job_id)
        if state == "whole":
            return
        if state == "failed":
            cancel.event.set()
            log.warning("job %s was not queued whole: its chunk acts on no node", job_id)
            return
        if time.monotonic() > deadline:
            ctx.store.fail_enqueue(job_id, "the submitter stopped before queuing every chunk")
            cancel.event.set()
            log.warning("job %s was never queued whole: its chunk acts on no node", job_id)
            return
        time.sleep(0.02)


def execute_chunk(
    ctx: WorkerContext, job_id: str | None, action: str, nodes: list[str],
    options: dict[str, Any], worker: str,
) -> dict[str, int]:
    """Run one chunk and write its results as they come. Returns counts by outcome."""
    with log_context(job_id=job_id, action=action):  # observability (issue 7)
        return _execute_chunk(ctx, job_id, action, nodes, options, worker)


def _execute_chunk(
    ctx: WorkerContext, job_id: str | None, action: str, nodes: list[str],
    options: dict[str, Any], worker: str,
) -> dict[str, int]:
    options = dict(options)
    release = options.pop("release", None)
    chunk = options.pop("chunk", None)
    in_doubt: dict[str, str] = {}
    if job_id:
        ctx.store.chunk_started(job_id)
        # Exactly once over at-least-once delivery: a redelivered chunk skips the nodes
        # already reported and marks those acted on but not reported as in doubt.
        reported, in_doubt = ctx.store.delivery_state(job_id, nodes)
        if reported or in_doubt:
            log.warning("chunk delivered again: %d node(s) already done, %d in doubt",
                        len(reported), len(in_doubt))
            nodes = [n for n in nodes if n not in reported]
    records = ctx.inventory.load_nodes(nodes)
    counts = {str(o): 0 for o in Outcome}
    pending: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    cancel = CancelWatch(ctx.store.client, ctx.store.job_key(job_id) if job_id else None).start()
    if job_id:
        try:
            _await_whole_enqueue(ctx, job_id, cancel)
        except BaseException:
            cancel.stop()
            raise
    gates = _gates(ctx, release, nodes, records, cancel) if release else {}
    if gates:
        # Nodes go to the pool in timeline order, so the threads wait on the earliest.
        nodes = sorted(nodes, key=lambda n: gates[n].not_before if n in gates else 0.0)
    last_start = max((g.not_before for g in gates.values()), default=0.0)
    wait_for_plan = last_start - ctx.admission.now() if gates else 0.0
    deadline = time.monotonic() + ctx.config.task_time_limit + max(0.0, wait_for_plan)

    last_metrics = time.monotonic()

    def flush(final: bool = False) -> None:
        nonlocal pending, last_flush, last_metrics
        if pending:
            ctx.store.record_results(job_id, pending)
            pending = []
        now = last_flush = time.monotonic()
        # observability (issue 7): at most once a second while the chunk runs (the
        # worker's heartbeat writes them too), and when it ends
        if ctx.metrics is not None and (final or now - last_metrics >= METRICS_EVERY):
            ctx.metrics.flush()
            last_metrics = now

    if fastpath.enabled(ctx.config, action, bool(gates)) and not cancel.event.is_set():
        # The IPMI fleet hot path (issue 4): this chunk's IPMI nodes in one batch.
        emitted: set[str] = set()

        def emit(result: NodeResult) -> None:
            emitted.add(result.node)
            counts[result.outcome] += 1
            _count_result(ctx, result)  # issue 7
            _log_fast(records.get(result.node), result)
            pending.append(result.to_dict())
            if len(pending) >= FLUSH_SIZE:
                flush()

        def tick() -> None:
            if pending and time.monotonic() - last_flush >= FLUSH_EVERY:
                flush()

        try:
            nodes = fastpath.run_batch(ctx, job_id, action, nodes, records, options, worker,
                                       cancel=cancel, deadline=deadline, emit=emit,
                                       skip=in_doubt, every=FLUSH_EVERY, tick=tick)
        except redis.RedisError:
            # The batch's journal could not be written: it stopped. Keep the results of
            # the nodes that finished if the store takes them; the chunk goes back.
            cancel.stop()
            with contextlib.suppress(redis.RedisError):
                flush()
            raise
        except Exception:
            # A bug: nodes it reported are done; a read goes again one by one, but an
            # action that may have been sent is not sent twice.
            log.error("IPMI batch failed inside powerq", exc_info=True)
            left = [n for n in nodes if n not in emitted]
            nodes = [n for n in left if action == "query" or
                     getattr(records.get(n), "power_type", None) != "ipmi"]
            for name in left:
                if name not in nodes:
                    failed = _skipped(name, action, worker, "")
                    failed.outcome, failed.power_type = Outcome.ERROR, "ipmi"
                    failed.error = DeviceError("ipmi: the batch failed inside powerq; "
                                               "the node's state is not known").to_dict()
                    emit(failed)
        flush()
    pool = ThreadPoolExecutor(
        max_workers=max(1, min(ctx.config.node_concurrency, len(nodes))),
        thread_name_prefix="powerq-node",
    )
    futures: dict[Future[NodeResult], str] = {
        # copy_context: the node thread keeps this chunk's log context (issue 7)
        pool.submit(contextvars.copy_context().run, run_node, ctx, name, records.get(name), action,
                    {**options, "in_doubt": in_doubt[name]} if name in in_doubt else options, worker, cancel,
                    gates.get(name), _journal(ctx, job_id, name, worker)): name
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
                _count_result(ctx, result)  # issue 7
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
                    _count_result(ctx, late)  # issue 7
                    pending.append(late.to_dict())
                break
        flush(final=True)
    except BaseException:
        # The chunk is going back to the broker (or the worker is stopping): let no node
        # start, and wait for the calls under way to end before the chunk can be delivered
        # again, so two deliveries never act on one node at the same time. Their results
        # are not recorded; the journal makes them "in doubt" for the next delivery.
        cancel.event.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        cancel.stop()
        pool.shutdown(wait=False, cancel_futures=True)
    if job_id:
        ctx.store.chunk_finished(job_id, chunk if isinstance(chunk, int) else None)
    return counts


def _log_fast(record: InventoryNode | None, result: NodeResult) -> None:
    """The line :func:`run_node` writes per node, for a node run in the IPMI batch."""
    code = (result.error or {}).get("code")
    level = logging.INFO if code else logging.DEBUG
    if not log.isEnabledFor(level):
        return
    with log_context(node=result.node, rack=record.rack if record else None, power_type="ipmi"):
        log.log(level, "node %s %s: %s%s (%d call(s), batch)", result.node, result.action,
                result.outcome, f" {code}" if code else "", result.attempts)


def _journal(ctx: WorkerContext, job_id: str | None, node: str, worker: str) -> Callable[[str], None] | None:
    if job_id is None:
        return None  # a poll only reads: nothing to journal
    return lambda action: ctx.store.journal_sent(job_id, node, action, worker)


def _gates(
    ctx: WorkerContext, release: Any, nodes: list[str], records: dict[str, InventoryNode],
    cancel: CancelWatch,
) -> dict[str, Release]:
    """One :class:`Release` per node of a timeline chunk (``{"origin", "offsets"}``).
    A malformed release section is ignored with a warning: the nodes then run at once,
    still within the budgets (admission does not depend on the plan)."""
    try:
        origin = float(release["origin"])
        offsets = {str(k): float(v) for k, v in dict(release["offsets"]).items()}
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring a malformed release section in a chunk")
        origin, offsets = 0.0, {}
    budgets = ctx.inventory.budgets()
    offset = ctx.admission.now() - time.time()
    gates = {}
    for name in nodes:
        record = records.get(name)
        if record is None:
            continue
        slots = ctx.admission.slots(budgets, record.rack, record.pdu)
        gates[name] = Release(ctx.admission, slots, name, origin + offsets.get(name, 0.0), cancel,
                              clock_offset=offset)
    return gates


@shared_task(name=TASK_RUN_CHUNK, bind=True, ignore_result=True)
def run_chunk(
    self: Any, job_id: str | None, action: str, nodes: list[str], options: dict[str, Any]
) -> dict[str, int]:
    """Celery entry point. Arguments are node names and plain options, never secrets."""
    config = config_of(self.app)
    worker = self.request.hostname or ""
    ctx = context_for(config)
    try:
        counts = execute_chunk(ctx, job_id, action, list(nodes), dict(options or {}), worker)
    except redis.RedisError as exc:
        # The store stayed unreachable past the client's retries: hand the chunk back to
        # the broker (it is acknowledged late) instead of losing it; its next delivery
        # skips the nodes already reported and treats the journal's as in doubt.
        log.error("chunk %s %s handed back: Redis unreachable (%s)", job_id or "poll", action,
                  type(exc).__name__)
        raise Reject(f"store unreachable: {type(exc).__name__}", requeue=True) from None
    log.info("chunk %s %s: %d nodes, %s", job_id or "poll", action, len(nodes), counts,
             extra={"job_id": job_id, "action": action})
    return counts
