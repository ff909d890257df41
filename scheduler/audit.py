"""The audit stream: who asked for which power action, when, and how it ended.

One capped Redis stream, ``<prefix>:audit`` (length cap :attr:`Config.audit_maxlen`),
with three kinds of entry, every field a string:

- ``request``  a job was accepted: ``at``, ``who`` (``cli:<user>`` or ``api:<token name>``),
  ``action``, ``nodeset`` (the expression as given), ``nodes`` (count), ``racks``,
  ``options`` (JSON, known non-secret options only), ``job``
- ``refused``  a request was refused before anything was queued: the same, with ``code``
  (``bad_request``, ``confirmation_required``, ``blast_radius_exceeded``, ``not_confirmed``…)
  and ``message`` (the refusal's first line; taxonomy messages never hold a secret)
- ``outcome``  a job finished: ``job``, ``who``, ``action``, ``nodes``, ``status``, ``ok``,
  ``error``, ``skipped`` (written once per job, however often its last chunk is delivered)

The REST API keeps its own stream, ``<prefix>:api:audit`` (scheduler/api.py): one entry per
HTTP POST (inventory loads, cancels and MAAS webhook calls included, with the HTTP status).
Its accepted power actions also reach this stream through :func:`scheduler.planner.submit`;
:func:`read` merges the API's refusals in, so ``powerq audit`` shows every refused request.
Both are kept: the API stream answers "what did this token do over HTTP" (any endpoint,
any status), this one "who asked for which power action and how it ended" (any client).

Writing the audit never makes a request fail: a Redis error while auditing is logged
(its type only) and swallowed.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger("powerq.audit")

DEFAULT_MAXLEN = 100_000
_SAFE_OPTIONS = ("soft", "device", "efi", "persistent", "username")
"""The request options an entry keeps (scheduler/planner.py check_options): an allow
list, so an option added later that holds a secret is never written here by accident."""
_TEXT_MAX = 1000

P = ParamSpec("P")
R = TypeVar("R")


def stream_key(prefix: str) -> str:
    return f"{prefix}:audit"


def api_stream_key(prefix: str) -> str:
    return f"{prefix}:api:audit"


def safe_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of :data:`_SAFE_OPTIONS` (plain values); any other is left out."""
    return {k: v for k, v in options.items()
            if k in _SAFE_OPTIONS and isinstance(v, str | bool | int | float)}


def _store_parts(store: Any) -> tuple[Any, str, int]:
    return store.client, store.prefix, int(getattr(store, "audit_maxlen", DEFAULT_MAXLEN))


def _write(client: Any, prefix: str, maxlen: int, entry: Mapping[str, Any]) -> str | None:
    fields = {k: ("" if v is None else str(v))[:_TEXT_MAX] for k, v in entry.items()}
    try:
        return str(client.xadd(stream_key(prefix), fields, maxlen=maxlen, approximate=True))
    except Exception as exc:  # auditing never fails the request it records
        log.warning("audit write failed: %s", type(exc).__name__)
        return None


def _plan_fields(plan: Any) -> dict[str, Any]:
    return {"action": plan.action, "nodeset": plan.nodeset, "nodes": len(plan.nodes),
            "racks": ",".join(plan.racks),
            "options": json.dumps(safe_options(plan.options), sort_keys=True, default=str)}


def record_request(store: Any, job_id: str, plan: Any, who: str) -> str | None:
    """Record that ``who`` asked for ``plan`` and it was accepted as job ``job_id``.
    Returns the stream entry id (None when the write failed)."""
    client, prefix, maxlen = _store_parts(store)
    return _write(client, prefix, maxlen, {"kind": "request", "at": time.time(), "who": who,
                                           "job": job_id, **_plan_fields(plan)})


def record_refusal(
    store: Any,
    who: str,
    exc: BaseException,
    *,
    plan: Any = None,
    action: str = "",
    nodeset: str = "",
    code: str | None = None,
) -> str | None:
    """Record a refused request (nothing was queued), once per exception object: a
    refusal recorded where it was raised is not recorded again by a caller."""
    if getattr(exc, "_powerq_audited", False):
        return None
    try:
        exc._powerq_audited = True  # type: ignore[attr-defined]
    except AttributeError:
        pass
    client, prefix, maxlen = _store_parts(store)
    fields = _plan_fields(plan) if plan is not None else {"action": action, "nodeset": nodeset}
    message = str(getattr(exc, "message", "") or exc or type(exc).__name__)
    return _write(client, prefix, maxlen, {
        "kind": "refused", "at": time.time(), "who": who, **fields,
        "code": code or getattr(exc, "code", None) or type(exc).__name__,
        "message": message.splitlines()[0] if message else "",
    })


def record_outcome(store: Any, job_id: str) -> str | None:
    """Record how job ``job_id`` ended (its status and ok / error / skipped counts), once:
    a second call for the same job (a redelivered last chunk) writes nothing."""
    client, prefix, maxlen = _store_parts(store)
    key = f"{prefix}:job:{job_id}"
    try:
        if not client.hsetnx(key, "audited", "1"):
            return None
        job = client.hgetall(key)
    except Exception as exc:
        log.warning("audit read of job failed: %s", type(exc).__name__)
        return None
    job = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
           for k, v in job.items()}
    return _write(client, prefix, maxlen, {
        "kind": "outcome", "at": time.time(), "job": job_id, "who": job.get("requested_by", ""),
        "action": job.get("action", ""), "nodeset": job.get("nodeset", ""),
        "nodes": job.get("total", ""), "status": job.get("status", ""),
        "ok": job.get("ok", "0"), "error": job.get("error", "0"), "skipped": job.get("skipped", "0"),
    })


def refusals_recorded(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator for :func:`scheduler.planner.submit`: a refusal it raises (a rack with no
    worker…) is recorded with its code before it propagates."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            from drivers.errors import PowerError

            plan = args[0] if args else kwargs.get("plan")
            store = args[1] if len(args) > 1 else kwargs.get("store")
            if isinstance(exc, PowerError) and store is not None:
                record_refusal(store, str(kwargs.get("requested_by") or "-"), exc, plan=plan)
            raise

    return wrapper


def _decode(fields: Mapping[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in fields.items()}


def _api_refusal(entry_id: str, fields: dict[str, str]) -> dict[str, Any] | None:
    """A refused POST of the API's own stream in this stream's shape; None for the
    others (accepted power actions are already here as ``request`` entries)."""
    status = fields.get("status", "")
    if not (status.isdigit() and int(status) >= 400):
        return None
    return {**fields, "id": entry_id, "kind": "refused", "source": "api", "http_status": status,
            "status": ""}


def read(client: Any, prefix: str, count: int = 50, *, include_api: bool = True) -> list[dict[str, Any]]:
    """The ``count`` newest audit entries, newest first, each with its stream ``id``;
    with ``include_api`` the refusals of the API's own stream are merged in (``source: api``).
    Raises ``redis.RedisError``."""
    entries = [{"id": _text(i), "source": "powerq", **_decode(f)}
               for i, f in client.xrevrange(stream_key(prefix), count=count)]
    if include_api:
        for i, f in client.xrevrange(api_stream_key(prefix), count=count * 4):
            refusal = _api_refusal(_text(i), _decode(f))
            if refusal is not None:
                entries.append(refusal)
    entries.sort(key=_order, reverse=True)
    return entries[:count]


def _order(entry: dict[str, Any]) -> tuple[int, float, int]:
    """Stream ids come from one Redis clock; within one millisecond, by ``at``."""
    ms, _, seq = entry["id"].partition("-")
    try:
        at = float(entry.get("at") or 0)
    except ValueError:
        at = 0.0
    return int(ms), at, int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
