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


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]


@dataclass
class Store:
    client: Any
    """A ``redis.Redis`` with ``decode_responses=True`` (redis-py's stubs cannot say so)."""
    prefix: str = "powerq"
    result_ttl: int = 7 * 24 * 3600
    events_maxlen: int = 100_000

    @classmethod
    def from_config(cls, config: Any) -> Store:
        client = redis.Redis.from_url(config.redis_url, decode_responses=True)
        return cls(client, config.key_prefix, config.result_ttl, config.events_maxlen)

    # -- keys -----------------------------------------------------------------------------
    def _job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

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
        for key in ("created", "finished"):
            out[key] = float(out[key]) if out.get(key) else None
        out["options"] = json.loads(out.get("options") or "{}")
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
        nodes = [r["node"] for r in batch]
        previous = self.client.hmget(self._state, nodes)
        pipe = self.client.pipeline(transaction=False)
        counts = {"ok": 0, "error": 0, "skipped": 0}
        for result, prev_raw in zip(batch, previous, strict=True):
            counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
            if job_id is not None:
                pipe.hset(self._results(job_id), result["node"], json.dumps(result))
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
        if job_id is not None:
            key = self._job(job_id)
            pipe.hincrby(key, "done", len(batch))
            for outcome, n in counts.items():
                if n:
                    pipe.hincrby(key, outcome, n)
            pipe.expire(self._results(job_id), self.result_ttl)
        pipe.execute()

    def chunk_started(self, job_id: str) -> None:
        self.client.hset(self._job(job_id), "status", "running")

    def chunk_finished(self, job_id: str) -> bool:
        """Count one finished chunk; True when it was the job's last."""
        key = self._job(job_id)
        pipe = self.client.pipeline()
        pipe.hincrby(key, "chunks_done", 1)
        pipe.hget(key, "chunks")
        done, total = pipe.execute()
        if total is not None and done >= int(total):
            self.client.hset(key, mapping={"status": "done", "finished": time.time()})
            return True
        return False

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
