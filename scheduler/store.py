"""The result store in Redis: jobs, per-node results, latest states, events.

Keys (``P`` is the configured prefix):

- ``P:job:<id>``          hash: id, action, nodeset, options (JSON), requested_by, created,
                          finished, status, total, done, ok, error, skipped, chunks, chunks_done
- ``P:job:<id>:results``  hash: node -> result JSON (see :class:`workers.policy.NodeResult`)
- ``P:jobs``              sorted set of job ids by creation time
- ``P:state``             hash: node -> {"state", "at", "job", "error"} (latest known state)
- ``P:events``            stream, capped: state changes and errors

Job keys expire after ``result_ttl``; the latest-state hash and the event stream do not.
Secrets are never written here: results hold codes and messages only.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import audit  # audit (issue 5)
from .config import redis_ssl_options  # Redis TLS (issue 5)

# KEYS: results hash, job hash. ARGV: ttl, then node, result JSON, outcome per result.
# Records each result only if the node has none yet; counts only those. Returns them.
_RECORD = """
local fresh = {}
local counts = {}
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    fresh[#fresh + 1] = ARGV[i]
    counts[ARGV[i + 2]] = (counts[ARGV[i + 2]] or 0) + 1
  end
end
if #fresh > 0 then
  redis.call('HINCRBY', KEYS[2], 'done', #fresh)
  for outcome, n in pairs(counts) do redis.call('HINCRBY', KEYS[2], outcome, n) end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return fresh
"""


# KEYS: job hash, its set of finished chunk indexes. ARGV: chunk index ("" = unnamed),
# ttl, now. Counts the chunk; completes the job once. Returns 1 for the completing call.
_FINISH = """
local done
if ARGV[1] == '' then
  done = redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)
else
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
  done = redis.call('SCARD', KEYS[2])
  redis.call('HSET', KEYS[1], 'chunks_done', done)
end
local total = tonumber(redis.call('HGET', KEYS[1], 'chunks') or '-1')
local status = redis.call('HGET', KEYS[1], 'status')
if total < 0 or done < total or status == 'done' or status == 'cancelled' or status == 'failed' then
  return 0
end
if redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then status = 'cancelled' else status = 'done' end
redis.call('HSET', KEYS[1], 'status', status, 'finished', ARGV[3])
return 1
"""


_JOURNAL = """
-- ARGV: worker, time, ttl, then (node, action) pairs. Returns each node's attempt.
local out = {}
for i = 4, #ARGV, 2 do
  local attempt = 1
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then
    local ok, entry = pcall(cjson.decode, old)
    if ok and type(entry) == 'table' and tonumber(entry['attempt']) then
      attempt = tonumber(entry['attempt']) + 1
    end
  end
  redis.call('HSET', KEYS[1], ARGV[i], cjson.encode({action = ARGV[i + 1], attempt = attempt,
    at = tonumber(ARGV[2]), worker = ARGV[1]}))
  out[#out + 1] = attempt
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return out
"""

_STARTED = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running')
end
return 0
"""


class _NotOnAuth(Retry):
    """A refused password is not an outage: it fails at once."""

    def call_with_retry(  # type: ignore[override]
        self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False,
    ) -> Any:
        def retryable(error: Exception) -> bool:
            if isinstance(error, redis.AuthenticationError):
                return False
            return bool(is_retryable(error)) if is_retryable else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def retrying(config: Any) -> dict[str, Any]:
    """Client options that ride out a Redis restart: a lost connection or a timeout is
    retried with capped exponential backoff for about ``redis_retry_for`` seconds before
    the error reaches the caller (the scheduler, or a worker that then hands its chunk back)."""
    budget = float(getattr(config, "redis_retry_for", 30.0))
    cap = 2.0
    retries = max(1, int(budget / cap) + 4)
    return {
        # redis-py 8 caps a pool at 100 connections and then raises MaxConnectionsError:
        # a worker's node threads (64 per chunk, several chunks) and helper threads need
        # more. Connections are still only opened as threads need them.
        "max_connections": 10_000,
        "retry": _NotOnAuth(ExponentialBackoff(cap=cap, base=0.05), retries),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 30,
    }


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]


@dataclass
class Store:
    client: Any
    """A ``redis.Redis`` with ``decode_responses=True`` (redis-py's stubs cannot say so)."""
    prefix: str = "powerq"
    result_ttl: int = 7 * 24 * 3600
    events_maxlen: int = 100_000
    audit_maxlen: int = audit.DEFAULT_MAXLEN  # audit (issue 5)

    @classmethod
    def from_config(cls, config: Any) -> Store:
        client = redis.Redis.from_url(config.redis_url, decode_responses=True, **retrying(config),
                                      **redis_ssl_options(config, config.redis_url))  # TLS (issue 5)
        return cls(client, config.key_prefix, config.result_ttl, config.events_maxlen,
                   getattr(config, "audit_maxlen", audit.DEFAULT_MAXLEN))  # audit (issue 5)

    # -- keys -----------------------------------------------------------------------------
    def _job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def job_key(self, job_id: str) -> str:
        """The Redis hash of a job (workers watch its ``cancel`` field)."""
        return self._job(job_id)

    def now(self) -> float:
        """Redis's clock in epoch seconds: the one clock every host of a job agrees on."""
        sec, usec = self.client.time()
        return float(sec) + float(usec) / 1e6

    def _results(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:results"

    @property
    def _state(self) -> str:
        return f"{self.prefix}:state"

    @property
    def _events(self) -> str:
        return f"{self.prefix}:events"

    # -- jobs -------------------------------------------------------------------------------
    def create_job(
        self,
        job_id: str,
        *,
        action: str,
        nodeset: str,
        nodes: int,
        chunks: int,
        options: Mapping[str, Any],
        requested_by: str,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        now = time.time()
        record = {
            "id": job_id,
            "action": action,
            "nodeset": nodeset,
            "options": json.dumps(dict(options), sort_keys=True),
            "requested_by": requested_by,
            "created": now,
            "finished": "",
            "status": "queued" if nodes else "done",
            "total": nodes,
            "done": 0,
            "ok": 0,
            "error": 0,
            "skipped": 0,
            "chunks": chunks,
            "chunks_done": 0,
            **{k: v for k, v in (extra or {}).items() if v is not None},
        }
        pipe = self.client.pipeline()
        pipe.hset(self._job(job_id), mapping=record)
        pipe.expire(self._job(job_id), self.result_ttl)
        pipe.zadd(f"{self.prefix}:jobs", {job_id: now})
        pipe.execute()

    def mark_job(self, job_id: str, status: str, **fields: Any) -> None:
        self.client.hset(self._job(job_id), mapping={"status": status, **fields})

    def job(self, job_id: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(self._job(job_id))
        if not raw:
            return None
        out: dict[str, Any] = dict(raw)
        for key in ("total", "done", "ok", "error", "skipped", "chunks", "chunks_done"):
            out[key] = int(out.get(key) or 0)
        for key in ("created", "finished", "origin", "makespan", "lower_bound"):
            if key in out or key in ("created", "finished"):
                out[key] = float(out[key]) if out.get(key) else None
        out["options"] = json.loads(out.get("options") or "{}")
        if out.get("cancel"):
            out["cancel"] = json.loads(out["cancel"])
            if out.get("status") in ("queued", "running"):
                out["status"] = "cancelling"
        return out

    def results(self, job_id: str) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(self._results(job_id))
        return {node: json.loads(value) for node, value in sorted(raw.items())}

    def recent_jobs(self, count: int = 20) -> list[str]:
        return list(self.client.zrevrange(f"{self.prefix}:jobs", 0, count - 1))

    # -- results ---------------------------------------------------------------------------
    def record_results(self, job_id: str | None, results: Iterable[Mapping[str, Any]]) -> None:
        """Write a batch of node results in one pipeline: the job's per-node results and
        counters, every node's latest state, and an event per state change or error.

        ``job_id`` None means a poll: only states and events are written.
        """
        batch = [dict(r) for r in results]
        if not batch:
            return
        if job_id is not None:
            # Exactly once per node and job: a result already recorded (by an earlier
            # delivery of the chunk, or a write retried after a lost reply) is not
            # recorded or counted again.
            args: list[str] = []
            for result in batch:
                args += [result["node"], json.dumps(result), str(result["outcome"])]
            fresh = set(self._script(_RECORD)(keys=[self._results(job_id), self._job(job_id)],
                                            args=[self.result_ttl, *args]))
            batch = [r for r in batch if r["node"] in fresh]
            if not batch:
                return
        nodes = [r["node"] for r in batch]
        previous = self.client.hmget(self._state, nodes)
        pipe = self.client.pipeline(transaction=False)
        for result, prev_raw in zip(batch, previous, strict=True):
            prev = json.loads(prev_raw) if prev_raw else {}
            error = result.get("error")
            state = result.get("state_after")
            at = result.get("finished") or time.time()
            if state:
                latest = {"state": state, "at": at, "job": job_id or "poll", "error": None}
            else:
                latest = {**prev, "error": None}
            if error:
                latest["error"] = {"code": error.get("code"), "message": error.get("message"), "at": at}
                self._event(pipe, "error", result["node"], job=job_id or "poll",
                            code=error.get("code"), message=error.get("message"))
            if state and prev.get("state") != state:
                self._event(pipe, "state", result["node"], job=job_id or "poll",
                            old=prev.get("state") or "", new=state)
            pipe.hset(self._state, result["node"], json.dumps(latest))
        pipe.execute()

    def _script(self, source: str) -> Any:
        """The registered form of a Lua script of this module (sent once, then run by its
        SHA), made on first use."""
        scripts = self.__dict__.setdefault("_scripts", {})
        script = scripts.get(source)
        if script is None:
            script = scripts[source] = self.client.register_script(source)
        return script

    # -- the journal of node actions (exactly-once delivery) ---------------------------
    def _journal(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:journal"

    def journal_sent(self, job_id: str, node: str, action: str, worker: str) -> None:
        """Record, before it is sent, that ``action`` is going to a node: if the worker
        dies now, a redelivered chunk knows the node's state is in doubt. The entry is
        (action, attempt, time, worker): ``attempt`` counts the calls that may change the
        node sent in this job so far, this one included, across deliveries. The node's
        result, written when its action ends, is the mark that it is done."""
        self.journal_many(job_id, [(node, action)], worker)

    def journal_many(self, job_id: str, entries: Iterable[tuple[str, str]], worker: str) -> None:
        """:meth:`journal_sent` for many (node, action) pairs in one script (the IPMI batch
        of a chunk journals a whole phase at once)."""
        args: list[str] = [worker, repr(time.time()), str(self.result_ttl)]
        for node, action in entries:
            args += [node, action]
        if len(args) > 3:
            self._script(_JOURNAL)(keys=[self._journal(job_id)], args=args)

    def delivery_state(self, job_id: str, nodes: list[str]) -> tuple[set[str], dict[str, str]]:
        """(nodes already reported, {node acted on but not reported: the last phase
        journaled}) for a chunk that starts, in one round trip."""
        if not nodes:
            return set(), {}
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self._results(job_id), nodes)
        pipe.hmget(self._journal(job_id), nodes)
        done_raw, sent_raw = pipe.execute()
        done = {n for n, v in zip(nodes, done_raw, strict=True) if v is not None}
        doubt: dict[str, str] = {}
        for node, raw in zip(nodes, sent_raw, strict=True):
            if raw is not None and node not in done:
                try:
                    doubt[node] = str(json.loads(raw).get("action") or "unknown")
                except (ValueError, AttributeError):
                    doubt[node] = "unknown"
        return done, doubt

    def chunk_started(self, job_id: str) -> None:
        """A chunk began: a queued job is running (a failed or cancelling one stays so)."""
        self._script(_STARTED)(keys=[self._job(job_id)])

    # -- all of a job's chunks or none (issue 5: never a partial enqueue) --------------------
    def mark_enqueued(self, job_id: str) -> None:
        """Every chunk of the job is on the broker: its workers may act."""
        self.client.hset(self._job(job_id), "enqueued", "1")

    def fail_enqueue(self, job_id: str, failure: str) -> None:
        """Queuing the job's chunks failed part-way: the job fails, and the chunks that did
        reach the broker see its cancel flag and act on no node."""
        pipe = self.client.pipeline()
        pipe.hsetnx(self._job(job_id), "cancel", json.dumps({"at": time.time(), "by": "powerq",
                                                             "reason": failure}))
        pipe.hset(self._job(job_id), mapping={"status": "failed", "failure": failure,
                                              "finished": time.time()})
        pipe.execute()

    def enqueue_state(self, job_id: str) -> str:
        """'whole' (every chunk queued, or a job from before this check), 'pending' (the
        submitter is still queuing) or 'failed' (it gave up: the job is cancelled)."""
        enqueued, cancel = self.client.hmget(self._job(job_id), ["enqueued", "cancel"])
        if cancel:
            return "failed" if enqueued == "0" else "whole"
        return "pending" if enqueued == "0" else "whole"

    def chunk_finished(self, job_id: str, chunk: int | None = None) -> bool:
        """Count one finished chunk (each chunk once, whatever its deliveries, when
        ``chunk`` names it); True only for the call that completes the job. One script:
        concurrent chunks can neither undercount nor complete a job twice."""
        key = self._job(job_id)
        completed = self._script(_FINISH)(
            keys=[key, f"{key}:chunks"],
            args=["" if chunk is None else str(chunk), self.result_ttl, repr(time.time())],
        )
        if completed:
            audit.record_outcome(self, job_id)  # audit (issue 5): the job's outcome, once
            return True
        return False

    def cancel(self, job_id: str, by: str) -> dict[str, Any] | None:
        """Ask the workers to stop releasing the job's nodes (nodes whose power action
        was not yet sent are skipped with note ``cancelled``). None when the job is
        unknown; a finished job is returned unchanged."""
        key = self._job(job_id)
        job = self.job(job_id)
        if job is None or job.get("status") in ("done", "failed", "cancelled"):
            return job
        pipe = self.client.pipeline()
        pipe.hsetnx(key, "cancel", json.dumps({"at": time.time(), "by": by}))
        pipe.hset(key, "status", "cancelling")
        pipe.execute()
        return self.job(job_id)

    # -- states and events -----------------------------------------------------------------
    def states(self, nodes: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        if nodes is None:
            raw = self.client.hgetall(self._state)
            return {n: json.loads(v) for n, v in raw.items()}
        names = list(nodes)
        if not names:
            return {}
        values = self.client.hmget(self._state, names)
        return {n: json.loads(v) for n, v in zip(names, values, strict=True) if v}

    def _event(self, pipe: Any, kind: str, node: str, **fields: Any) -> None:
        data = {"kind": kind, "node": node, "at": time.time()}
        data.update({k: "" if v is None else v for k, v in fields.items()})
        pipe.xadd(self._events, {k: str(v) for k, v in data.items()},
                  maxlen=self.events_maxlen, approximate=True)

    def events(self, count: int = 50) -> list[dict[str, str]]:
        entries = self.client.xrevrange(self._events, count=count)
        return [dict(fields, id=entry_id) for entry_id, fields in entries]
