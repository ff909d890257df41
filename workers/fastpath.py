"""The IPMI fleet hot path (issue 4): a rack chunk's queries read in one batch.

A poll reads every node of a rack chunk. The per-node path (a thread per node, the BMC
lease taken and released per call, a driver built per node) costs about a millisecond of
worker CPU per node before a packet is sent; at 5,000 nodes a minute that is most of a
core. Here, for the ``query`` of IPMI nodes:

- one script takes the Redis lease of every BMC of the chunk at once (no waiting: a BMC
  whose lease another call holds, and any node the batch cannot take, goes the per-node
  way, which waits for it); parked BMCs fail at once with their parked error;
- the reads go out together on the worker's one :class:`drivers.rmcpplus.BlockingLanplus`
  (an asyncio RMCP+ client on its own thread, bounded in flight, one request per BMC):
  its sessions stay open across jobs, so a warm read is one round trip;
- one script releases the leases and clears the failure counts of the BMCs that
  answered; failed reads count towards parking as in the per-node path;
- the results go back to the chunk, which writes them in pipelined batches.

Which nodes: power type ``ipmi`` whose settings validate, action ``query``, no power-on
gate, at most one node per BMC in the batch. ``POWERQ_IPMI_FASTPATH=0`` turns it off.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from drivers.errors import PowerError, TransientError

from .bmcguard import COUNTED, parked_error
from .policy import NodeResult, Outcome

if TYPE_CHECKING:
    from drivers.rmcpplus import BlockingLanplus, Target

log = logging.getLogger("powerq.fastpath")

_targets: dict[str, tuple[Any, str, Any]] = {}
"""node -> (its inventory record, bmc_key, Target): built once per inventory entry (the
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


async def _timed_reads(client: Any, targets: list[Target]) -> list[tuple[str | PowerError, float]]:
    """Every target's state (or its error) and how long its read took, in order."""
    import asyncio

    loop = asyncio.get_running_loop()

    async def one(target: Target) -> tuple[str | PowerError, float]:
        began = loop.time()
        answer = await client.query_or_error(target)
        return answer, loop.time() - began

    return list(await asyncio.gather(*(one(t) for t in targets)))


def enabled(config: Any, action: str, gated: bool) -> bool:
    return action == "query" and not gated and bool(getattr(config, "ipmi_fastpath", True))


def run_queries(ctx: Any, names: list[str], records: dict[str, Any], worker: str
                ) -> tuple[list[NodeResult], list[str]]:
    """Read the IPMI nodes among ``names`` in one batch. Returns their results and the
    names left for the per-node path (other power types, bad settings, a BMC busy with
    another call, a batch that could not start)."""
    from drivers.ipmi import IPMISettings, lean_target

    picked: dict[str, tuple[str, Any]] = {}  # bmc_key -> (node, target)
    rest: list[str] = []
    for name in names:
        record = records.get(name)
        if record is None or record.power_type != "ipmi":
            rest.append(name)
            continue
        known = _targets.get(name)
        if known is not None and known[0] is record:  # same inventory entry as last time
            key, target = known[1], known[2]
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
            _targets[name] = (record, key, target)
        if key in picked:  # two nodes behind one BMC: one call at a time, the slow way
            rest.append(name)
            continue
        picked[key] = (name, target)
    if not picked:
        return [], rest
    guard = ctx.runner.guard
    token = uuid.uuid4().hex
    keys = list(picked)
    try:
        statuses = guard.take_many(keys, token) if guard is not None else dict.fromkeys(keys, 1)
    except Exception as exc:  # Redis trouble: let the per-node path (and its retries) cope
        log.warning("batch BMC lease failed (%s): %d node(s) go one by one", type(exc).__name__,
                    len(keys))
        return [], rest + [picked[k][0] for k in keys]
    started = time.time()
    results: list[NodeResult] = []
    run_keys = [k for k in keys if statuses[k] == 1]
    rest += [picked[k][0] for k in keys if statuses[k] == 0]
    for key in (k for k in keys if statuses[k] == -1):
        node = picked[key][0]
        info = guard.info(key) if guard is not None else None
        error = parked_error(key, info or {})
        results.append(NodeResult(node=node, action="query", outcome=Outcome.ERROR,
                                  error=error.to_dict(), started=started, finished=started,
                                  worker=worker, power_type="ipmi"))
    if not run_keys:
        return results, rest
    try:
        answers = fleet_client(ctx.config).call(
            lambda client: _timed_reads(client, [picked[k][1] for k in run_keys]))
    except BaseException:
        if guard is not None:
            guard.release_many([], run_keys, token)
        raise
    ok: list[str] = []
    failed: list[str] = []
    metrics = getattr(ctx, "metrics", None)
    for key, (answer, took) in zip(run_keys, answers, strict=True):
        node = picked[key][0]
        if metrics is not None:  # the driver call latency histogram (issue 7)
            metrics.observe_call("ipmi", took)
        result = NodeResult(node=node, action="query", attempts=1, started=started,
                            finished=started + took, worker=worker, power_type="ipmi")
        if isinstance(answer, PowerError):
            result.outcome = Outcome.ERROR
            result.error = answer.to_dict()
            result.error["attempt"] = 1
            failed.append(key)
            if guard is not None and isinstance(answer, TransientError) and answer.code in COUNTED:
                guard.failed(key, answer, node)
        else:
            result.state_before = result.state_after = str(answer)
            ok.append(key)
        results.append(result)
    if guard is not None:
        guard.release_many(ok, failed, token)
    return results, rest


__all__ = ["close_fleet_client", "enabled", "fleet_client", "run_queries"]
