"""The live fleet page, served by ``powerq api``: racks drawn as grids of nodes coloured by
power state and shaded by the state's age, updated live by server-sent events.

Routes (none in the OpenAPI schema: the page is for people, the stream never ends):

- ``GET /fleet``, ``GET /fleet/static/<file>``: the page, its script and its style sheet,
  from package data (``scheduler/static/``). No token needed: they hold no data.
- ``GET /fleet/events``: ``text/event-stream``; needs a ``read`` token, sent exactly as to
  the REST API (``Authorization: Bearer`` or Basic). The page reads the stream with
  ``fetch()`` (``EventSource`` cannot send a header), so the token never appears in a URL,
  an access log or a proxy log. The page keeps it in ``sessionStorage`` (gone when the tab
  closes) and never puts it in the document.

The stream sends, as SSE events with JSON data:

- ``layout``: the racks in order, each with its nodes (name, power type, PDU), and the age
  thresholds; again whenever the inventory is reloaded;
- ``snapshot``: every node's state as one character (``n`` on, ``f`` off, ``u`` unknown,
  ``-`` never read) in layout order, its age in whole seconds (-1: never read) and the last
  errors by layout position; first, then every ``fleet_snapshot_every`` seconds and after
  a burst;
- ``change``: the nodes named in new entries of the event stream ``P:events`` (state
  changes and errors), read with ``XREAD BLOCK`` from where the snapshot was taken, each
  node's current state read again from the ``P:state`` hash.

Why this scales to 10,000 nodes: a change costs one blocking ``XREAD`` and one ``HMGET`` of
the nodes it names, pushed within milliseconds; the periodic snapshot (which also refreshes
ages, as a poll that finds a node unchanged writes no event) is about 60 kB for 10,000
nodes and is built once per API process for every viewer (one ``HGETALL``, cached for a
second), and the browser ages its cells itself between snapshots. A burst of ``CHANGE_LIMIT``
events or more (a rack-wide power-on) is skipped and sent as one snapshot instead. The stream is async (``redis.asyncio``):
a viewer holds one Redis connection and no thread. It ends after ``fleet_stream_seconds``
and the page reconnects, so a revoked token stops working within that time.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool

from drivers.errors import SettingsError

from .config import Config, redis_ssl_options
from .inventory import InventoryStore, NodeInfo
from .nodeset import natural_sorted
from .store import Store
from .tokens import TokenInfo, TokenStore

STATE_CODES = {"on": "n", "off": "f", "unknown": "u"}
"""A node's state as one character in a snapshot; ``-`` is never read."""

CHANGE_LIMIT = 2000
"""Events read at once; a burst of this many is skipped and sent as a snapshot."""

STATIC_FILES = {
    "fleet.js": "text/javascript; charset=utf-8",
    "fleet.css": "text/css; charset=utf-8",
}
PAGE_HEADERS = {
    # Everything comes from this server; no inline script; the token never leaves as a referrer.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def check_fleet_config(config: Config) -> None:
    """Raises :class:`SettingsError` for fleet page options out of range."""
    for name in ("fleet_fresh_age", "fleet_stale_age", "fleet_snapshot_every", "fleet_stream_seconds"):
        if getattr(config, name) <= 0:
            raise SettingsError(f"POWERQ_{name.upper()} must be greater than 0")
    if config.fleet_fresh_age > config.fleet_stale_age:
        raise SettingsError("POWERQ_FLEET_FRESH_AGE must be <= POWERQ_FLEET_STALE_AGE")


def _static(name: str) -> bytes:
    return (resources.files("scheduler") / "static" / name).read_bytes()


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "problems": []}},
                        status_code=status, headers=headers)


def _id(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a comparable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _node_entry(state: dict[str, Any] | None, now: float) -> tuple[str, int, list[Any] | None]:
    """(state character, age in whole seconds or -1, [code, message, age] or None)."""
    if not state:
        return "-", -1, None
    code = STATE_CODES.get(str(state.get("state")), "-")
    at = state.get("at")
    age = -1 if at is None or code == "-" else max(0, int(now - float(at)))
    err = state.get("error")
    error = None
    if isinstance(err, dict) and err.get("code"):
        err_at = err.get("at")
        error = [str(err.get("code")), str(err.get("message") or ""),
                 None if err_at is None else max(0, int(now - float(err_at)))]
    return code, age, error


class _Layout:
    """The inventory as the page draws it: racks in order, nodes in order in each."""

    def __init__(self, index: dict[str, NodeInfo], stamp: str | None) -> None:
        self.stamp = stamp
        racks: dict[str, list[str]] = {}
        for name, info in index.items():
            racks.setdefault(info.rack, []).append(name)
        self.order: list[str] = []
        self.racks: list[dict[str, Any]] = []
        for rack in natural_sorted(racks):
            names = natural_sorted(racks[rack])
            self.order.extend(names)
            self.racks.append({"name": rack, "nodes": [
                [n, index[n].power_type, index[n].pdu or ""] for n in names]})
        self.position = {name: i for i, name in enumerate(self.order)}


def fleet_router(config: Config, store: Store, inventory: InventoryStore, tokens: TokenStore) -> APIRouter:
    """The fleet page's routes for an API app (``app.include_router(...)``).

    Raises :class:`SettingsError` for fleet options out of range."""
    check_fleet_config(config)
    router = APIRouter(include_in_schema=False)
    events_key = f"{store.prefix}:events"
    state_key = f"{store.prefix}:state"
    challenge = {"WWW-Authenticate": 'Bearer realm="powerq", Basic realm="powerq"'}
    cache: dict[str, Any] = {"layout": None, "snapshot": None, "snapshot_at": -1e18}

    def layout() -> _Layout:
        stamp = inventory.stamp()
        current = cache["layout"]
        if current is None or current.stamp != stamp or stamp is None:
            current = cache["layout"] = _Layout(inventory.node_index(), stamp)
            cache["snapshot_at"] = -1e18
        return current  # type: ignore[no-any-return]

    def layout_message(lay: _Layout) -> dict[str, Any]:
        return {"racks": lay.racks, "nodes": len(lay.order), "fresh": config.fleet_fresh_age,
                "stale": config.fleet_stale_age, "every": config.fleet_snapshot_every}

    def snapshot(lay: _Layout, cursor: str) -> dict[str, Any]:
        """Every node's state in layout order, as of event ``cursor`` or later: built at
        most once a second per process for every viewer."""
        cached = cache["snapshot"]
        if (cached is not None and time.monotonic() - cache["snapshot_at"] < 1.0
                and cached["layout"] is lay and _id(cached["cursor"]) >= _id(cursor)):
            return cached["data"]  # type: ignore[no-any-return]
        last = store.client.xrevrange(events_key, count=1)
        taken = last[0][0] if last else "0-0"
        states = store.states()
        now = time.time()
        codes, ages, errors = [], [], {}
        for i, name in enumerate(lay.order):
            code, age, error = _node_entry(states.get(name), now)
            codes.append(code)
            ages.append(age)
            if error:
                errors[str(i)] = error
        data = {"now": now, "state": "".join(codes), "age": ages, "errors": errors}
        cache["snapshot"] = {"layout": lay, "cursor": taken, "data": data}
        cache["snapshot_at"] = time.monotonic()
        return data

    def authorize(request: Request) -> TokenInfo | JSONResponse:
        scheme, value = get_authorization_scheme_param(request.headers.get("Authorization"))
        info = None
        if scheme.lower() == "bearer" and value:
            info = tokens.verify(value)
        elif scheme.lower() == "basic" and value:
            import base64
            import binascii

            try:
                user, _, password = base64.b64decode(value).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", ""
            if user and password:
                info = tokens.verify(password, name=user)
        if info is None:
            return _error(401, "unauthorized", "a valid API token is needed", challenge)
        if not info.allows("read"):
            return _error(403, "forbidden", f"token {info.name!r} cannot read")
        return info

    @router.get("/fleet")
    def page() -> Response:
        return Response(_static("fleet.html"), media_type="text/html; charset=utf-8",
                        headers=PAGE_HEADERS)

    @router.get("/fleet/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            return _error(404, "not_found", f"no file {name!r}")
        return Response(_static(name), media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    @router.get("/fleet/events")
    async def events(request: Request) -> Response:
        who = await run_in_threadpool(authorize, request)
        if isinstance(who, JSONResponse):
            return who
        return StreamingResponse(
            stream(request), media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def stream(request: Request) -> AsyncIterator[bytes]:
        client = aioredis.Redis.from_url(config.redis_url, decode_responses=True,
                                         **redis_ssl_options(config, config.redis_url))
        try:
            end = time.monotonic() + config.fleet_stream_seconds
            last: Any = await client.xrevrange(events_key, count=1)
            cursor = str(last[0][0]) if last else "0-0"
            lay: _Layout | None = None
            next_snapshot = 0.0
            while time.monotonic() < end:
                fresh: _Layout = await run_in_threadpool(layout)
                if fresh is not lay:
                    lay = fresh
                    yield _sse("layout", layout_message(lay))
                    next_snapshot = 0.0
                if time.monotonic() >= next_snapshot:
                    yield _sse("snapshot", await run_in_threadpool(snapshot, lay, cursor))
                    next_snapshot = time.monotonic() + config.fleet_snapshot_every
                wait = max(0.05, min(next_snapshot, end, time.monotonic() + 5.0) - time.monotonic())
                reply: Any = await client.xread({events_key: cursor}, count=CHANGE_LIMIT,
                                           block=int(wait * 1000))
                names: set[str] = set()
                read = 0
                for _key, entries in reply or ():
                    for entry_id, fields in entries:
                        cursor, read = str(entry_id), read + 1
                        if fields.get("node") in lay.position:
                            names.add(fields["node"])
                if read >= CHANGE_LIMIT:
                    # A burst: skip to the stream's end; the next turn sends a snapshot.
                    last = await client.xrevrange(events_key, count=1)
                    cursor = str(last[0][0]) if last else cursor
                    next_snapshot = 0.0
                elif names:
                    known = list(names)
                    values = await client.hmget(state_key, known)
                    now = time.time()
                    nodes = {}
                    for name, raw in zip(known, values, strict=True):
                        nodes[str(lay.position[name])] = list(
                            _node_entry(json.loads(raw) if raw else None, now))
                    yield _sse("change", {"now": now, "nodes": nodes})
                elif not reply:
                    yield b": ping\n\n"
        finally:
            await client.aclose()

    return router


__all__ = ["CHANGE_LIMIT", "check_fleet_config", "fleet_router"]
