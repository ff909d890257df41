"""The IPMI fleet hot path (issue 4): a rack chunk's IPMI nodes driven in one batch.

The per-node path (a thread per node, the BMC lease taken and released per action, a
driver built per node, each call handed from the node's thread to the RMCP+ client's
event loop and back, a journal write per phase per node) costs a millisecond or more of
worker CPU per call before a packet is sent; at 5,000 nodes that is most of a core for a
read and several cores' worth of seconds for a cycle. Here, for the IPMI nodes of a chunk
(query, on, off, cycle, boot):

- one script takes the Redis lease of every BMC of the chunk at once (no waiting: a BMC
  whose lease another call holds, and any node the batch cannot take, goes the per-node
  way, which waits for it); parked BMCs fail at once with their parked error; the leases
  are renewed together while the batch runs;
- every node's action runs as a coroutine on the worker's one
  :class:`drivers.rmcpplus.BlockingLanplus` (an asyncio RMCP+ client on its own thread,
  bounded in flight, one request per BMC), whose sessions stay open across jobs, so a
  warm read is one round trip. The steps are the execution policy's own
  (:func:`workers.policy.action_steps`: query, journal, act, confirm), with its retries,
  back-off, confirmation and call timeout;
- the journal entries of exactly-once delivery are written a phase at a time: the nodes
  about to be powered off within a few milliseconds of each other share one script;
- one script releases the leases and clears the failure counts of the BMCs that
  answered; failed calls count towards parking as in the per-node path;
- results go back to the chunk as they end, which writes them in pipelined batches.

Which nodes: power type ``ipmi`` whose settings validate, no power-on gate (a power plan
runs per node), not in doubt after a redelivery, at most one node per BMC in the batch.
``POWERQ_IPMI_FASTPATH=0`` turns it off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from drivers.base import PowerState
from drivers.errors import (
    BusyError,
    CallTimeoutError,
    DeviceError,
    PowerError,
    StateMismatchError,
    TransientError,
    UnreachableError,
    UnsupportedError,
)
from drivers.ipmi import PYGHMI_BOOT_DEVICES, IPMISettings, lean_target

from .bmcguard import COUNTED, parked_error
from .policy import Action, Cancelled, NodeResult, Outcome, Step, action_steps, ended_by

if TYPE_CHECKING:
    from drivers.rmcpplus import BlockingLanplus

log = logging.getLogger("powerq.fastpath")

_targets: dict[str, tuple[Any, str, Any, Any]] = {}
"""node -> (its inventory record, bmc_key, Target, IPMISettings): built once per inventory entry (the
worker's inventory cache hands back the same record object while the entry is unchanged)."""

_client: BlockingLanplus | None = None
_client_lock = threading.Lock()


def fleet_client(config: Any) -> BlockingLanplus:
    """The worker process' one RMCP+ client (built on first use; sessions live as long as
    the process and are logged out when it exits)."""
    global _client
    with _client_lock:
        if _client is None:
            import atexit

            from drivers.rmcpplus import BlockingLanplus

            _client = BlockingLanplus(
                timeout=float(config.ipmi_fleet_timeout),
                max_in_flight=int(config.ipmi_fleet_in_flight),
                max_sessions=int(config.ipmi_fleet_sessions),
                keepalive=float(config.ipmi_fleet_keepalive) or None,
                linger=float(config.ipmi_fleet_linger) or None,
            )
            atexit.register(close_fleet_client)
        return _client


def close_fleet_client() -> None:
    global _client
    with _client_lock:
        client, _client = _client, None
    if client is not None:
        try:
            client.close()
        except Exception:  # logging out at exit is best effort
            log.debug("closing the RMCP+ client failed", exc_info=True)


BATCH_ACTIONS = frozenset({"query", "on", "off", "cycle", "boot"})

JOURNAL_GATHER = 0.003
"""Seconds the journal waits for more of a phase's nodes before writing them together."""


def enabled(config: Any, action: str, gated: bool) -> bool:
    return action in BATCH_ACTIONS and not gated and bool(getattr(config, "ipmi_fastpath", True))


class _Abandoned(Exception):
    """The batch stopped (its journal could not be written): this node was not acted on
    and is left for the chunk's next delivery."""


class _Journal:
    """Journal entries written a phase at a time (:meth:`scheduler.store.Store.journal_many`
    in the loop's executor: the event loop never waits on Redis)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, write: Callable[[list[tuple[str, str]]], None]
                 ) -> None:
        self.loop, self.write = loop, write
        self.waiting: list[tuple[str, str, asyncio.Future[None]]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def sent(self, node: str, phase: str) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        self.waiting.append((node, phase, fut))
        if self.flusher is None:
            self.flusher = self.loop.create_task(self._flush())
        await fut

    async def _flush(self) -> None:
        await asyncio.sleep(JOURNAL_GATHER)
        batch, self.waiting, self.flusher = self.waiting, [], None
        try:
            await self.loop.run_in_executor(None, self.write, [(n, p) for n, p, _ in batch])
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for _, _, fut in batch:
            if not fut.done():
                fut.set_result(None)


class _Batch:
    """One chunk's batch of IPMI nodes, run on the RMCP+ client's loop."""

    def __init__(self, ctx: Any, job_id: str | None, action: str, options: dict[str, Any],
                 worker: str, cancel: Any, emit: Callable[[NodeResult], None]) -> None:
        self.ctx, self.job_id, self.action, self.worker = ctx, job_id, action, worker
        self.options, self.cancel, self.emit = options, cancel, emit
        self.policy = ctx.runner.settings
        self.guard = ctx.runner.guard
        self.metrics = getattr(ctx, "metrics", None)
        self.ok: list[str] = []
        self.failed: list[str] = []
        self.broken: BaseException | None = None  # the journal could not be written
        self.racks: dict[str, str | None] = {}  # node -> rack, for the in-flight gauge

    async def run(self, client: Any, picked: list[tuple[str, str, Any, Any]], limit: float
                  ) -> list[str]:
        """Run every (node, bmc_key, target, settings); emit each result as it ends.
        Returns the nodes still running at ``limit`` seconds (cancelled, reported by the
        caller as timed out)."""
        loop = asyncio.get_running_loop()
        self.client, self.loop = client, loop
        # The client gives up on a BMC after all its retransmissions, within this budget
        # of the call timeout ...
        own = client.timeout * (client.retries + 1)
        self.budget = min(self.policy.call_timeout, own)
        # ... so a call needs no timer of its own when that is within the call timeout.
        # (Its time then starts when its request may be sent: a wait for one of the
        # client's POWERQ_IPMI_FLEET_IN_FLIGHT slots is the worker's queue, not the BMC's
        # slowness; the chunk time limit bounds it.)
        self.bounded = own <= self.policy.call_timeout
        self.journal = (_Journal(loop, lambda entries: self.ctx.store.journal_many(
            self.job_id, entries, self.worker)) if self.job_id else None)
        tasks = {loop.create_task(self._node(*entry)): entry for entry in picked}
        if not tasks:
            return []
        timeout = None if limit == float("inf") else max(0.0, limit)
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        late = []
        for task in pending:
            node, key = tasks[task][0], tasks[task][1]
            self.failed.append(key)
            late.append(node)
        return late

    async def _node(self, node: str, key: str, target: Any, settings: Any) -> None:
        result = NodeResult(node=node, action=self.action, started=time.time(),
                            worker=self.worker, power_type="ipmi")
        options = self.options
        if settings.power_off_mode == "soft" and "soft" not in options:
            options = {**options, "soft": True}
        steps = action_steps(Action(self.action), options, result, queryable=True, gated=False,
                             cycle_mode=self.policy.cycle_mode)
        state = {"acted": False}
        try:
            reply: Any = None
            while True:
                try:
                    step = steps.send(reply)
                except StopIteration:
                    break
                reply = await self._step(step, node, key, target, settings, result, state)
        except _Abandoned:
            self.failed.append(key)
            return
        except (Cancelled, PowerError, ValueError) as exc:
            ended_by(result, exc)
        except Exception as exc:  # a bug here must not leave the node without a result
            log.error("IPMI batch: %s on %s failed inside powerq", self.action, node, exc_info=True)
            result.outcome = Outcome.ERROR
            result.error = DeviceError(f"ipmi: internal error ({type(exc).__name__})").to_dict()
        result.finished = time.time()
        (self.ok if result.outcome == Outcome.OK else self.failed).append(key)
        self.emit(result)

    async def _step(self, step: Step, node: str, key: str, target: Any, settings: Any,
                    result: NodeResult, state: dict[str, bool]) -> Any:
        kind = step[0]
        client = self.client
        if kind == "query":
            # A read is sent once (the client retransmits within it): a dead BMC costs a
            # poll one timeout, not three. A power action's first read is retried.
            return PowerState(await self._call(key, node, result, lambda: client.query(target),
                                               retry=self.action != "query"))
        if kind == "journal":
            if not state["acted"]:  # before the first call that may change the node
                if self.broken is not None:
                    raise _Abandoned()
                if self.cancel is not None and self.cancel.event.is_set():
                    raise Cancelled()
            state["acted"] = True
            if self.journal is not None:
                try:
                    await self.journal.sent(node, step[1])
                except Exception as exc:  # Redis: nothing is sent; the chunk goes back
                    if self.broken is None:
                        self.broken = exc
                    raise _Abandoned() from None
            return None
        if kind == "off":
            how = "soft" if step[1] else "off"
            return await self._call(key, node, result, lambda: client.chassis_control(target, how))
        if kind == "on":
            if step[1]:  # a native cycle: not idempotent, never retried blindly
                return await self._call(key, node, result,
                                        lambda: client.chassis_control(target, "cycle"), retry=False)
            return await self._call(key, node, result, lambda: client.chassis_control(target, "on"))
        if kind == "settle":
            return await self._settle(key, node, target, step[1], result)
        if kind == "boot":
            device, efi, persistent = step[1], step[2], step[3]
            if device not in PYGHMI_BOOT_DEVICES:
                raise UnsupportedError(f"ipmi cannot boot from {device}")
            efi = efi or settings.power_boot_type == "efi"
            return await self._call(key, node, result, lambda: client.set_boot_device(
                target, str(device), efi=efi, persistent=persistent))
        raise UnsupportedError(f"step {kind}")  # pragma: no cover - action_steps is exhaustive

    async def _call(self, key: str, node: str, result: NodeResult,
                    make: Callable[[], Awaitable[Any]], *, retry: bool = True) -> Any:
        """One call with the policy's retries (as :meth:`NodeRunner.call`): transient
        errors retried after a full-jitter back-off, a call that spent its whole timeout
        not asked again, a failure after the retries counted towards parking."""
        policy = self.policy
        attempts = policy.max_attempts if retry else 1
        loop = self.loop
        for attempt in range(1, attempts + 1):
            result.attempts += 1
            began = loop.time()
            metrics = self.metrics  # issue 7: calls in flight by rack, and their latency
            rack = self.racks.get(node)
            if metrics is not None:
                metrics.call_started(rack)
            try:
                try:
                    if self.bounded:  # the client ends the call within the call timeout
                        return await make()
                    async with asyncio.timeout(policy.call_timeout):
                        return await make()
                except TimeoutError:
                    raise CallTimeoutError(
                        f"ipmi {node}: no answer within {policy.call_timeout:g} s") from None
                finally:
                    if metrics is not None:
                        metrics.call_ended(rack)
                        metrics.observe_call("ipmi", loop.time() - began)
            except TransientError as exc:
                # A BMC that did not answer within the whole call timeout, or within all
                # the client's retransmissions (POWERQ_IPMI_FLEET_TIMEOUT x 4, 8 s by
                # default), is not asked again in this job: a dead BMC costs one timeout.
                spent_it_all = (isinstance(exc, CallTimeoutError | UnreachableError)
                                and loop.time() - began >= self.budget)
                if attempt >= attempts or spent_it_all:
                    if self.guard is not None and exc.code in COUNTED:
                        await loop.run_in_executor(None, self.guard.failed, key, exc, node)
                    raise
                await asyncio.sleep(self.ctx.runner.backoff(attempt, busy=isinstance(exc, BusyError)))
            except PowerError:
                raise
            except Exception as exc:  # a client bug must not take the other nodes down
                raise DeviceError(f"ipmi: unexpected {type(exc).__name__} in the RMCP+ client") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _settle(self, key: str, node: str, target: Any, wanted: PowerState,
                      result: NodeResult) -> None:
        """Query until the node shows ``wanted`` (as :meth:`NodeRunner.confirm`)."""
        policy = self.policy
        deadline = self.loop.time() + policy.confirm_timeout
        seen = PowerState.UNKNOWN
        last_error: PowerError | None = None
        while True:
            try:
                seen = PowerState(await self._call(key, node, result,
                                                   lambda: self.client.query(target), retry=False))
                last_error = None
                if seen is wanted:
                    result.state_after = str(seen)
                    return
            except TransientError as exc:
                last_error = exc
            if self.loop.time() >= deadline:
                break
            await asyncio.sleep(policy.confirm_interval)
        if last_error is not None:
            raise last_error
        result.state_after = str(seen)
        raise StateMismatchError(
            f"wanted {wanted}, still {seen} after {policy.confirm_timeout:g} s",
            wanted=str(wanted), seen=str(seen))


def run_batch(ctx: Any, job_id: str | None, action: str, names: list[str], records: dict[str, Any],
              options: dict[str, Any], worker: str, *, cancel: Any = None, deadline: float | None = None,
              emit: Callable[[NodeResult], None], skip: Iterable[str] = (), every: float = 0.25,
              tick: Callable[[], None] | None = None) -> list[str]:
    """Run ``action`` on the IPMI nodes among ``names`` in one batch, calling ``emit`` (in
    this thread) with each node's result as it ends and ``tick`` every ``every`` seconds
    while the batch runs. Returns the names left for the per-node path (other power
    types, bad settings, ``skip`` (in doubt), a BMC busy with another call, a batch that
    could not start). ``deadline`` (monotonic): nodes still running then are cancelled
    and reported as timed out. Raises a Redis error if the batch's journal could not be
    written: the nodes it did not act on are neither reported nor left."""
    skipped = set(skip)
    picked: dict[str, tuple[str, Any, Any]] = {}  # bmc_key -> (node, target, settings)
    rest: list[str] = []
    for name in names:
        record = records.get(name)
        if record is None or record.power_type != "ipmi" or name in skipped:
            rest.append(name)
            continue
        known = _targets.get(name)
        if known is not None and known[0] is record:  # same inventory entry as last time
            key, target, settings = known[1], known[2], known[3]
        else:
            try:
                settings = IPMISettings.model_validate(record.params)
                target = lean_target(settings)
            except Exception:  # the per-node path reports bad settings with its own error
                rest.append(name)
                continue
            key = f"ipmi:{settings.power_address}:{settings.power_port}"
            if len(_targets) >= 50_000:
                _targets.clear()
            _targets[name] = (record, key, target, settings)
        if key in picked:  # two nodes behind one BMC: one call at a time, the slow way
            rest.append(name)
            continue
        picked[key] = (name, target, settings)
    if not picked:
        return rest
    guard = ctx.runner.guard
    token = uuid.uuid4().hex
    keys = list(picked)
    try:
        statuses = guard.take_many(keys, token) if guard is not None else dict.fromkeys(keys, 1)
    except Exception as exc:  # Redis trouble: let the per-node path (and its retries) cope
        log.warning("batch BMC lease failed (%s): %d node(s) go one by one", type(exc).__name__,
                    len(keys))
        return rest + [picked[k][0] for k in keys]
    run_keys = [k for k in keys if statuses[k] == 1]
    rest += [picked[k][0] for k in keys if statuses[k] == 0]
    now = time.time()
    for key in (k for k in keys if statuses[k] == -1):
        info = guard.info(key) if guard is not None else None
        error = parked_error(key, info or {})
        emit(NodeResult(node=picked[key][0], action=action, outcome=Outcome.ERROR,
                        error=error.to_dict(), started=now, finished=now, worker=worker,
                        power_type="ipmi"))
    if not run_keys:
        return rest
    if guard is not None:
        guard.hold_many(run_keys, token)
    done: queue.SimpleQueue[NodeResult] = queue.SimpleQueue()
    batch = _Batch(ctx, job_id, action, options, worker, cancel, done.put)
    batch.racks = {picked[k][0]: getattr(records.get(picked[k][0]), "rack", None) for k in run_keys}
    limit = (deadline - time.monotonic()) if deadline is not None else float("inf")
    entries = [(picked[k][0], k, picked[k][1], picked[k][2]) for k in run_keys]
    late: list[str] = []
    try:
        future = fleet_client(ctx.config).submit(lambda client: batch.run(client, entries, limit))
        try:
            while True:
                try:
                    late = future.result(timeout=every)
                    break
                except concurrent.futures.TimeoutError:
                    pass
                finally:
                    while not done.empty():
                        emit(done.get())
                if tick is not None:
                    tick()
        except BaseException:
            # The chunk is going back (or the worker stops): no node starts acting now,
            # and the calls under way end before the chunk can be delivered again.
            if cancel is not None:
                cancel.event.set()
            with contextlib.suppress(BaseException):
                future.result()
            raise
    finally:
        if guard is not None:
            guard.unhold_many(run_keys)
            guard.release_many(batch.ok, batch.failed, token)
    now = time.time()
    for node in late:
        emit(NodeResult(node=node, action=action, outcome=Outcome.ERROR, started=now, finished=now,
                        worker=worker, power_type="ipmi",
                        error=CallTimeoutError(f"chunk time limit of {ctx.config.task_time_limit:g} s "
                                               "reached").to_dict()))
    if batch.broken is not None:
        raise batch.broken
    return rest


__all__ = ["BATCH_ACTIONS", "close_fleet_client", "enabled", "fleet_client", "run_batch"]
