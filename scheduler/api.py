"""The REST API and the MAAS webhook drop-in, served by ``powerq api`` (FastAPI + uvicorn).

Every endpoint but the schema (``/openapi.json``, ``/docs``) needs a token
(:mod:`scheduler.tokens`), as ``Authorization: Bearer <token>`` or as HTTP Basic with the
token's name as user and the token as password. Jobs made through the API carry
``requested_by = "api:<token name>"``; every POST (accepted or refused) is also written to
the capped audit stream ``<prefix>:api:audit`` with the token name, the MAAS ``System_Id``
when sent, and the job id.

Errors are one shape everywhere, with nothing queued when a request is refused::

    {"error": {"code": "bad_request", "message": "...", "problems": [{...}, ...]}}

The MAAS webhook endpoints follow MAAS's ``webhook`` power driver: POST on / off with no
body (idempotent: a second POST while a job for the same node and action runs returns that
job), GET query answering exactly ``{"status": "running"}``, ``{"status": "stopped"}`` or
``{"status": "unknown"}`` (MAAS matches ``status.*\\:.*running`` / ``status.*\\:.*stopped``),
refreshed by a query job when the stored state is older than ``api_state_fresh`` seconds.
No token, BMC secret or inventory secret is ever part of a response, log line or error.
"""


import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import redis
import yaml
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from drivers.errors import PowerError

from .config import Config
from .fleetpage import fleet_router
from .inventory import NAME_RE, InventoryError, InventoryStore, NodeInfo, load_inventory
from .nodeset import expand, natural_sorted
from .planner import (
    ACTIONS,
    BlastRadiusExceeded,
    ConfirmationRequired,
    Plan,
    PlanError,
    check_blast_radius,
    make_plan,
    plan_to_dict,
    resolver_for,
    submit,
)
from .secrets import SecretBox
from .store import Store
from .tokens import TokenInfo, TokenStore

log = logging.getLogger("powerq.api")

MAX_INVENTORY_BYTES = 32 * 1024 * 1024
_SYSTEM_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
_FINISHED = ("done", "failed")
MAAS_STATUS = {"on": "running", "off": "stopped"}


# --------------------------------------------------------------------------- models
class Problem(BaseModel):
    model_config = ConfigDict(extra="allow")
    node: str | None = None
    rack: str | None = None
    field: str | None = None
    reason: str = ""


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code (bad_request, unauthorized, ...)")
    message: str
    problems: list[Problem] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorBody


class JobOptions(BaseModel):
    """Options of an action; each applies only to some actions (others are refused)."""

    model_config = ConfigDict(extra="forbid")
    soft: bool | None = Field(default=None, description="off / cycle: graceful (ACPI) power off")
    device: Literal["pxe", "disk", "cdrom", "bios"] | None = Field(default=None, description="boot: device")
    efi: bool | None = Field(default=None, description="boot: EFI mode")
    persistent: bool | None = Field(default=None, description="boot: every boot, not just the next")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["on", "off", "cycle", "query", "boot"]
    nodes: str = Field(min_length=1, max_length=65536, description="Node set, e.g. r1-n[01-40],@tag:gpu")
    options: JobOptions = Field(default_factory=lambda: JobOptions())
    dry_run: bool = Field(default=False, description="Plan only: nothing is recorded or sent")
    confirm: bool = Field(default=False, description="Needed for off / cycle of more than confirm_threshold "
                          "nodes or confirm_racks racks (the CLI's --yes)")
    force: bool = Field(default=False, description="Needed for off / cycle of more than max_nodes nodes or "
                        "max_racks racks (the CLI's --force)")


class QueueModel(BaseModel):
    queue: str
    rack: str
    nodes: str
    count: int


class StepModel(BaseModel):
    offset: float = Field(description="Seconds after the timeline's start")
    count: int
    nodes: str


class TimelineModel(BaseModel):
    """The power-on timeline within the inventory's power budgets (on / cycle only)."""

    nodes: int
    makespan: float = Field(description="Offset of the last start, in seconds")
    lower_bound: float = Field(description="No schedule within these budgets can be shorter")
    budgets: dict[str, Any]
    steps: list[StepModel]


class PlanModel(BaseModel):
    action: str
    nodeset: str
    nodes: int
    options: dict[str, Any]
    queues: list[QueueModel]
    timeline: TimelineModel | None = None


class JobModel(BaseModel):
    id: str
    action: str
    nodeset: str
    options: dict[str, Any] = Field(default_factory=dict)
    requested_by: str = ""
    created: float | None = None
    finished: float | None = None
    status: str
    total: int = 0
    done: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    chunks: int = 0
    chunks_done: int = 0
    failure: str | None = None
    origin: float | None = Field(default=None, description="Power-on timeline: its time zero (epoch s)")
    makespan: float | None = Field(default=None, description="Power-on timeline: planned last start (s)")
    lower_bound: float | None = Field(default=None, description="Power-on timeline: the budgets' minimum (s)")
    cancel: dict[str, Any] | None = Field(default=None, description="Who cancelled the job, and when")


class JobCreated(BaseModel):
    job: JobModel | None = Field(description="The recorded job; null for a dry run")
    plan: PlanModel
    dry_run: bool = False


class ResultError(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str
    kind: str | None = None
    message: str = ""


class NodeResultModel(BaseModel):
    node: str
    action: str
    outcome: str
    state_before: str | None = None
    state_after: str | None = None
    error: ResultError | None = None
    attempts: int = 0
    started: float = 0.0
    finished: float = 0.0
    worker: str = ""
    note: str = ""
    power_type: str = ""


class JobPage(BaseModel):
    job: JobModel
    results: list[NodeResultModel]
    offset: int
    limit: int
    total: int = Field(description="Per-node results recorded so far")


class JobList(BaseModel):
    jobs: list[JobModel]


class StateError(BaseModel):
    code: str | None = None
    message: str | None = None
    at: float | None = None


class NodeState(BaseModel):
    node: str
    rack: str
    power_type: str
    state: str | None = Field(description="on / off / unknown; null if never read")
    age: float | None = Field(description="Seconds since the state was read")
    job: str | None = None
    error: StateError | None = None


class NodeList(BaseModel):
    nodes: list[NodeState]
    summary: dict[str, int]
    total: int
    offset: int
    limit: int


class HistoryEvent(BaseModel):
    id: str
    kind: str = Field(description="state (a change of power state) or error")
    at: float
    job: str = ""
    old: str | None = None
    new: str | None = None
    code: str | None = None
    message: str | None = None


class NodeHistory(BaseModel):
    node: str
    events: list[HistoryEvent]


class InventoryLoaded(BaseModel):
    nodes: int
    racks: dict[str, int]
    power_types: dict[str, int]
    stored: bool


class MaasAccepted(BaseModel):
    node: str
    action: str
    job: str | None = Field(description="The job doing it (null while it is being queued)")
    already_running: bool


class MaasStatus(BaseModel):
    status: Literal["running", "stopped", "unknown"]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "Bad input: nothing was recorded or queued"),
        (401, "No token, or a wrong or revoked one"),
        (403, "The token's scope does not allow this"),
        (404, "No such job or node"),
        (503, "Redis unreachable, or no worker consumes a rack's queue"),
    ]
}


# --------------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, problems: Sequence[Any] = (),
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.problems = list(problems)
        self.headers = headers


def _error_response(status: int, code: str, message: str, problems: Sequence[Any] = (),
                    headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "problems": list(problems)}}
    return JSONResponse(body, status_code=status, headers=headers)


def _status_of(exc: PowerError) -> int:
    problems = exc.details.get("problems") or []
    if any(isinstance(p, dict) and p.get("reason") == "no worker" for p in problems):
        return 503
    return 400 if exc.kind == "fatal" else 503


# --------------------------------------------------------------------------- dispatch
class Dispatcher:
    """Sends chunks to the rack queues and knows (cached, refreshed in the background)
    which rack queues have a worker, so that a request does not wait for a broadcast."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._app: Any = None
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def app(self) -> Any:
        if self._app is None:
            from workers.dispatch import app_for

            self._app = app_for(self.config)
        return self._app

    def refresh(self) -> None:
        from workers.dispatch import consumed_queues

        queues = consumed_queues(self.app, self.config.inspect_timeout)
        now = time.monotonic()
        with self._lock:
            for name in queues:
                if name.startswith("powerq.rack."):
                    self._seen[name.removeprefix("powerq.rack.")] = now

    def missing(self, racks: Sequence[str]) -> list[str]:
        """Racks no worker consumes: from the cache, checked live for any not seen lately."""
        horizon = 2 * self.config.api_workers_cache + self.config.inspect_timeout

        def unseen() -> list[str]:
            now = time.monotonic()
            with self._lock:
                return [r for r in racks if now - self._seen.get(r, -1e18) > horizon]

        if unseen():
            self.refresh()
        return unseen()

    def send(self, job_id: str, plan: Plan) -> int:
        from workers.dispatch import send_plan

        return send_plan(self.app, job_id, plan)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception as exc:  # the broker may be down for a while
                    log.warning("worker check failed: %s", type(exc).__name__)
                self._stop.wait(self.config.api_workers_cache)

        self._thread = threading.Thread(target=loop, name="powerq-api-workers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------- the app
def check_api_config(config: Config) -> None:
    """Raises :class:`PowerError` (bad_settings) for API options out of range."""
    from drivers.errors import SettingsError

    if not 0 < config.api_port < 65536:
        raise SettingsError("POWERQ_API_PORT must be between 1 and 65535")
    for name in ("api_state_fresh", "api_inflight_ttl", "api_workers_cache", "api_audit_maxlen"):
        if getattr(config, name) <= 0:
            raise SettingsError(f"POWERQ_{name.upper()} must be greater than 0")
    if config.api_query_wait < 0:
        raise SettingsError("POWERQ_API_QUERY_WAIT must be >= 0")


def create_app(config: Config, *, dispatcher: Any = None, store: Store | None = None) -> FastAPI:
    """The API for ``config``. ``dispatcher`` (``missing(racks)``, ``send(job_id, plan)``,
    optional ``start()`` / ``stop()``) defaults to :class:`Dispatcher` (Celery)."""
    check_api_config(config)
    store = store or Store.from_config(config)
    dispatch = dispatcher if dispatcher is not None else Dispatcher(config)
    inventory = InventoryStore(store.client, config.key_prefix, SecretBox.from_config(config))
    tokens = TokenStore(store.client, config.key_prefix)
    audit_key = f"{config.key_prefix}:api:audit"

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        if hasattr(dispatch, "start"):
            dispatch.start()
        yield
        if hasattr(dispatch, "stop"):
            dispatch.stop()

    app = FastAPI(
        title="powerq", version="1", lifespan=lifespan,
        description="Power a fleet on, off and through a cycle; the MAAS webhook drop-in.",
    )
    bearer = HTTPBearer(auto_error=False, description="An API token (`powerq token add NAME`)")
    basic = HTTPBasic(auto_error=False, realm="powerq",
                      description="User: the token's name; password: the token")

    def audit(request: Request, status: int, **fields: Any) -> None:
        if request.method != "POST":
            return
        who = getattr(request.state, "who", None)
        entry = {"at": time.time(), "who": who.requested_by if who else "-",
                 "method": request.method, "path": request.url.path, "status": status,
                 "system_id": getattr(request.state, "system_id", "") or ""}
        entry.update({k: "" if v is None else v for k, v in fields.items()})
        log.info("audit %s", json.dumps(entry, sort_keys=True))
        try:
            store.client.xadd(audit_key, {k: str(v) for k, v in entry.items()},
                              maxlen=config.api_audit_maxlen, approximate=True)
        except redis.RedisError:
            log.warning("audit stream write failed")

    # -- error handlers: one shape for every error
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        audit(request, exc.status, code=exc.code)
        return _error_response(exc.status, exc.code, exc.message, exc.problems, exc.headers)

    @app.exception_handler(PowerError)
    async def _power_error(request: Request, exc: PowerError) -> JSONResponse:
        status = _status_of(exc)
        audit(request, status, code=exc.code)
        return _error_response(status, exc.code, exc.message, exc.details.get("problems") or [])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in e.get("loc", ())), "reason": e.get("msg", "")}
                    for e in exc.errors()]
        audit(request, 400, code="bad_request")
        return _error_response(400, "bad_request", "the request does not match the schema", problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed"}.get(exc.status_code, "http_error")
        audit(request, exc.status_code, code=code)
        return _error_response(exc.status_code, code, str(exc.detail), (),
                               dict(exc.headers) if exc.headers else None)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.error("redis error: %s", type(exc).__name__)
        return _error_response(503, "unavailable", "cannot reach Redis: check POWERQ_REDIS_URL")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only the type: a library's message may hold a URL with a password in it.
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
        audit(request, 500, code="internal")
        return _error_response(500, "internal", f"internal error ({type(exc).__name__}); "
                                                "see the API log")

    # -- authentication
    challenge = {"WWW-Authenticate": 'Bearer realm="powerq", Basic realm="powerq"'}

    def need(scope: str) -> Callable[..., TokenInfo]:
        def dependency(
            request: Request,
            bearer_creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
            basic_creds: Annotated[HTTPBasicCredentials | None, Depends(basic)],
        ) -> TokenInfo:
            info = None
            if bearer_creds is not None:
                info = tokens.verify(bearer_creds.credentials)
            elif basic_creds is not None:
                info = tokens.verify(basic_creds.password, name=basic_creds.username)
            if info is None:
                raise ApiError(401, "unauthorized", "a valid API token is needed", headers=challenge)
            request.state.who = info
            if not info.allows(scope):
                raise ApiError(403, "forbidden", f"token {info.name!r} has scope {info.scope!r}; "
                                                 f"this needs {scope!r}")
            return info

        return dependency

    Reader = Annotated[TokenInfo, Depends(need("read"))]
    Operator = Annotated[TokenInfo, Depends(need("operate"))]
    Admin = Annotated[TokenInfo, Depends(need("admin"))]

    from .metrics import install as install_metrics  # GET /metrics (issue 7)

    install_metrics(app, store, inventory, config, need("read"))

    # -- helpers
    def index_or_refuse() -> dict[str, NodeInfo]:
        index = inventory.node_index()
        if not index:
            raise PlanError("the inventory is empty: load one (POST /v1/inventory)")
        return index

    def one_node(name: str) -> dict[str, NodeInfo]:
        """A one-node index for ``name``, reading only that node (never a node set)."""
        view = inventory.public_view(name) if NAME_RE.match(name) else None
        if view is None:
            raise ApiError(404, "not_found", f"no node {name!r} in the inventory")
        return {name: NodeInfo(view["rack"], view["power_type"], tuple(view["tags"]))}

    def job_model(job_id: str) -> JobModel:
        record = store.job(job_id)
        if record is None:
            raise ApiError(404, "not_found", f"no job {job_id!r} (jobs expire after "
                                             f"{config.result_ttl} s)")
        return JobModel(**record)

    def run(action: str, expr: str, index: dict[str, NodeInfo], options: dict[str, Any],
            who: TokenInfo) -> tuple[str, Plan]:
        plan = make_plan(action, expr, index, chunk_size=config.chunk_size, options=options,
                         budgets=inventory.budgets())
        job_id = submit(plan, store, racks_without_worker=dispatch.missing, send=dispatch.send,
                        requested_by=who.requested_by, lead=config.release_lead,
                    max_chunk_seconds=config.visibility_timeout - config.task_time_limit)
        return job_id, plan

    inflight = _InFlight(store, config)
    app.include_router(fleet_router(config, store, inventory, tokens))  # GET /fleet (issue 7)

    # -- jobs
    @app.post("/v1/jobs", status_code=202, response_model=JobCreated, operation_id="createJob",
              responses={200: {"model": JobCreated, "description": "Dry run: the plan only"}, **ERRORS},
              tags=["jobs"])
    def create_job(body: JobRequest, request: Request, response: Response, who: Operator) -> JobCreated:
        """Plan and queue a power action over a node set. Refused input queues nothing."""
        options = body.options.model_dump(exclude_none=True)
        index = index_or_refuse()
        plan = make_plan(body.action, body.nodes, index, chunk_size=config.chunk_size, options=options,
                         budgets=inventory.budgets())
        if body.dry_run:
            response.status_code = 200
            return JobCreated(job=None, plan=PlanModel(**plan_to_dict(plan)), dry_run=True)
        try:
            check_blast_radius(plan, config, yes=body.confirm, force=body.force)
        except ConfirmationRequired as exc:
            raise ConfirmationRequired(exc.message.replace("add --yes", 'send "confirm": true'),
                                       **exc.details) from None
        except BlastRadiusExceeded as exc:
            raise BlastRadiusExceeded(exc.message.replace("without --force", 'without "force": true'),
                                      **exc.details) from None
        job_id = submit(plan, store, racks_without_worker=dispatch.missing, send=dispatch.send,
                        requested_by=who.requested_by, lead=config.release_lead,
                    max_chunk_seconds=config.visibility_timeout - config.task_time_limit)
        audit(request, 202, job=job_id, action=body.action, nodes=len(plan.nodes))
        return JobCreated(job=job_model(job_id), plan=PlanModel(**plan_to_dict(plan)))

    @app.get("/v1/jobs", response_model=JobList, operation_id="listJobs", responses=ERRORS,
             tags=["jobs"])
    def list_jobs(_: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> JobList:
        """The most recent jobs, newest first."""
        jobs = [store.job(j) for j in store.recent_jobs(limit)]
        return JobList(jobs=[JobModel(**j) for j in jobs if j])

    @app.get("/v1/jobs/{job_id}", response_model=JobPage, operation_id="getJob", responses=ERRORS,
             tags=["jobs"])
    def get_job(job_id: str, _: Reader, offset: Annotated[int, Query(ge=0)] = 0,
                limit: Annotated[int, Query(ge=1, le=5000)] = 500) -> JobPage:
        """A job and one page of its per-node results (in node order)."""
        job = job_model(job_id)
        results = store.results(job_id)
        names = natural_sorted(results)
        page = [NodeResultModel(**results[n]) for n in names[offset:offset + limit]]
        return JobPage(job=job, results=page, offset=offset, limit=limit, total=len(names))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobModel, operation_id="cancelJob",
              responses=ERRORS, tags=["jobs"])
    def cancel_job(job_id: str, request: Request, who: Operator) -> JobModel:
        """Stop releasing the job's nodes: nodes not yet acted on are skipped (note
        ``cancelled``); a cycle that powered a node off still powers it back on."""
        if store.cancel(job_id, who.requested_by) is None:
            raise ApiError(404, "not_found", f"no job {job_id!r} (jobs expire after {config.result_ttl} s)")
        audit(request, 200, job=job_id, action="cancel")
        return job_model(job_id)

    # -- nodes
    @app.get("/v1/nodes", response_model=NodeList, operation_id="listNodes", responses=ERRORS,
             tags=["nodes"])
    def list_nodes(_: Reader, nodes: Annotated[str, Query(min_length=1, max_length=65536)] = "@all",
                   offset: Annotated[int, Query(ge=0)] = 0,
                   limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> NodeList:
        """Latest known power state of a node set, its age and last error."""
        index = inventory.node_index()
        names = [n for n in expand(nodes, resolver_for(index)) if n in index] if index else []
        states = store.states(names)
        now = time.time()
        summary: dict[str, int] = {}
        for name in names:
            state = states.get(name, {}).get("state") or "never read"
            summary[state] = summary.get(state, 0) + 1
        out = []
        for name in names[offset:offset + limit]:
            st = states.get(name, {})
            at = st.get("at")
            out.append(NodeState(node=name, rack=index[name].rack, power_type=index[name].power_type,
                                 state=st.get("state"), age=None if at is None else round(now - at, 3),
                                 job=st.get("job"), error=st.get("error") or None))
        return NodeList(nodes=out, summary=summary, total=len(names), offset=offset, limit=limit)

    @app.get("/v1/nodes/{name}/history", response_model=NodeHistory, operation_id="getNodeHistory",
             responses=ERRORS, tags=["nodes"])
    def node_history(name: str, _: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> NodeHistory:
        """A node's state changes and errors, newest first (from the capped event stream)."""
        known = NAME_RE.match(name) is not None and inventory.public_view(name) is not None
        events = _history(store, name, limit)
        if not known and not events:
            raise ApiError(404, "not_found", f"no node {name!r} in the inventory")
        return NodeHistory(node=name, events=events)

    # -- inventory
    @app.post("/v1/inventory", response_model=InventoryLoaded, operation_id="loadInventory",
              responses=ERRORS, tags=["inventory"], openapi_extra={"requestBody": {
                  "required": True, "description": "The inventory, as YAML or JSON",
                  "content": {"application/yaml": {"schema": {"type": "string"}},
                              "application/json": {"schema": {"type": "object"}}}}})
    async def load_inventory_body(request: Request, who: Admin,
                                  check: Annotated[bool, Query()] = False) -> InventoryLoaded:
        """Validate an inventory (all of it or nothing) and, unless ``check``, store it with
        its secrets encrypted. References to server files or variables are refused."""
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > MAX_INVENTORY_BYTES:
            raise ApiError(413, "too_large", f"an inventory body is at most {MAX_INVENTORY_BYTES} bytes")
        raw = await request.body()
        if len(raw) > MAX_INVENTORY_BYTES:
            raise ApiError(413, "too_large", f"an inventory body is at most {MAX_INVENTORY_BYTES} bytes")
        is_json = "json" in request.headers.get("content-type", "")
        inv = _parse_inventory(raw, is_json, who.requested_by)
        if not check:
            inventory.save(inv)
        racks: dict[str, int] = {}
        types: dict[str, int] = {}
        for node in inv.nodes.values():
            racks[node.rack] = racks.get(node.rack, 0) + 1
            types[node.power_type] = types.get(node.power_type, 0) + 1
        audit(request, 200, nodes=len(inv.nodes), stored=not check)
        return InventoryLoaded(nodes=len(inv.nodes), racks=racks, power_types=types, stored=not check)

    # -- MAAS webhook
    SystemId = Annotated[str | None, Header(alias="System_Id", description="Sent by MAAS")]

    def note_system_id(request: Request, system_id: str | None) -> None:
        request.state.system_id = (system_id if system_id and _SYSTEM_ID_RE.match(system_id)
                                   else ("(invalid)" if system_id else ""))

    def maas_action(action: str, node: str, request: Request, who: TokenInfo,
                    system_id: str | None) -> MaasAccepted:
        note_system_id(request, system_id)
        index = one_node(node)
        running, claim = inflight.claim(node, action)
        if claim is None:
            audit(request, 202, node=node, job=running, already_running=True)
            return MaasAccepted(node=node, action=action, job=running, already_running=True)
        try:
            job_id, _ = run(action, node, index, {}, who)
        except BaseException:
            inflight.release(node, action, claim)
            raise
        inflight.hold(node, action, claim, job_id)
        audit(request, 202, node=node, job=job_id, already_running=False)
        return MaasAccepted(node=node, action=action, job=job_id, already_running=False)

    @app.post("/maas/{node}/on", status_code=202, response_model=MaasAccepted,
              operation_id="maasPowerOn", responses=ERRORS, tags=["maas"])
    def maas_on(node: str, request: Request, who: Operator, system_id: SystemId = None) -> MaasAccepted:
        """MAAS power_on_uri: power the node on (a node already on is left alone)."""
        return maas_action("on", node, request, who, system_id)

    @app.post("/maas/{node}/off", status_code=202, response_model=MaasAccepted,
              operation_id="maasPowerOff", responses=ERRORS, tags=["maas"])
    def maas_off(node: str, request: Request, who: Operator, system_id: SystemId = None) -> MaasAccepted:
        """MAAS power_off_uri: power the node off (hard unless its power_off_mode is soft)."""
        return maas_action("off", node, request, who, system_id)

    @app.get("/maas/{node}/query", response_model=MaasStatus, operation_id="maasPowerQuery",
             responses=ERRORS, tags=["maas"])
    def maas_query(node: str, request: Request, response: Response, who: Operator,
                   system_id: SystemId = None) -> MaasStatus:
        """MAAS power_query_uri: ``{"status": "running" | "stopped" | "unknown"}``."""
        note_system_id(request, system_id)
        index = one_node(node)
        state = store.states([node]).get(node)
        stale = state is None or time.time() - float(state.get("at") or 0) > config.api_state_fresh
        if stale and not inflight.busy(node, ("on", "off")):
            job_id, claim = inflight.claim(node, "query")
            try:
                if claim is not None:
                    job_id, _ = run("query", node, index, {}, who)
                    inflight.hold(node, "query", claim, job_id)
            except PowerError as exc:
                if claim is not None:
                    inflight.release(node, "query", claim)
                if state is None:
                    raise
                response.headers["X-Powerq-Warning"] = f"state not refreshed: {exc.code}"
            if job_id:
                _wait_job(store, job_id, config.api_query_wait)
                state = store.states([node]).get(node)
        if state is not None and state.get("at"):
            response.headers["X-Powerq-State-Age"] = f"{time.time() - float(state['at']):.1f}"
        value = MAAS_STATUS.get(str((state or {}).get("state")), "unknown")
        return MaasStatus(status=value)  # type: ignore[arg-type]

    return app


# --------------------------------------------------------------------------- pieces
class _InFlight:
    """One job per (node, action) at a time for the MAAS webhook, kept in Redis so that
    several API processes agree. ``P:api:inflight:<node>:<action>`` holds ``pending:<id>``
    while a job is being queued, then the job id, for at most ``api_inflight_ttl``."""

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.prefix = config.key_prefix
        self.ttl_ms = int(config.api_inflight_ttl * 1000)

    def _key(self, node: str, action: str) -> str:
        return f"{self.prefix}:api:inflight:{node}:{action}"

    def _running(self, value: str | None) -> bool:
        if not value:
            return False
        if value.startswith("pending:"):
            return True
        job = self.store.job(value)
        return job is not None and job.get("status") not in _FINISHED

    def busy(self, node: str, actions: Sequence[str]) -> bool:
        return any(self._running(self.store.client.get(self._key(node, a))) for a in actions)

    def claim(self, node: str, action: str) -> tuple[str | None, str | None]:
        """(running job id or None, None) if a job runs; (None, claim) once claimed."""
        key = self._key(node, action)
        claim = "pending:" + os.urandom(8).hex()
        with self.store.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current = pipe.get(key)
                    if self._running(current):
                        pipe.unwatch()
                        return (None if current.startswith("pending:") else current), None
                    pipe.multi()
                    pipe.set(key, claim, px=self.ttl_ms)
                    pipe.execute()
                    return None, claim
                except redis.WatchError:
                    continue

    def hold(self, node: str, action: str, claim: str, job_id: str) -> None:
        key = self._key(node, action)
        if self.store.client.get(key) == claim:
            self.store.client.set(key, job_id, px=self.ttl_ms)

    def release(self, node: str, action: str, claim: str) -> None:
        key = self._key(node, action)
        if self.store.client.get(key) == claim:
            self.store.client.delete(key)


def _wait_job(store: Store, job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.job(job_id)
        if job is None or job.get("status") in _FINISHED:
            return
        time.sleep(0.05)


def _history(store: Store, name: str, limit: int, scan: int = 50_000) -> list[HistoryEvent]:
    """The newest ``limit`` events of node ``name``, reading at most ``scan`` entries."""
    key = f"{store.prefix}:events"
    out: list[HistoryEvent] = []
    last = "+"
    read = 0
    while len(out) < limit and read < scan:
        batch = store.client.xrevrange(key, max=last, count=1000)
        if last != "+":
            batch = [e for e in batch if e[0] != last]
        if not batch:
            break
        read += len(batch)
        for entry_id, fields in batch:
            if fields.get("node") == name:
                out.append(HistoryEvent(
                    id=entry_id, kind=fields.get("kind", ""), at=float(fields.get("at") or 0),
                    job=fields.get("job", ""), old=fields.get("old") or None,
                    new=fields.get("new") or None, code=fields.get("code") or None,
                    message=fields.get("message") or None))
                if len(out) >= limit:
                    break
        last = batch[-1][0]
    return out


def _refuse_references(doc: Any) -> list[dict[str, str]]:
    """Problems for parts of an inventory body that would read the API server's own files
    or environment (``secrets_file``, ``{env: ...}``, ``{file: ...}``)."""
    problems: list[dict[str, str]] = []
    if not isinstance(doc, dict):
        return problems
    reason = ("references ({env: ...}, {file: ...}) are not accepted over the API: "
              "send the value itself (it is stored encrypted)")
    if "secrets_file" in doc:
        problems.append({"node": "(inventory)", "field": "secrets_file", "reason": reason})
    nodes = doc.get("nodes")
    for number, entry in enumerate(nodes if isinstance(nodes, list) else [], 1):
        params = entry.get("power_parameters") if isinstance(entry, dict) else None
        label = str(entry.get("name") or f"#{number}") if isinstance(entry, dict) else f"#{number}"
        for key, value in (params.items() if isinstance(params, dict) else ()):
            if isinstance(value, dict):
                problems.append({"node": label, "field": str(key), "reason": reason})
    defaults = doc.get("defaults")
    for ptype, params in (defaults.items() if isinstance(defaults, dict) else ()):
        for key, value in (params.items() if isinstance(params, dict) else ()):
            if isinstance(value, dict):
                problems.append({"node": "(defaults)", "field": f"defaults.{ptype}.{key}",
                                 "reason": reason})
    return problems


def _parse_inventory(raw: bytes, is_json: bool, source: str) -> Any:
    """Check an inventory body with :func:`load_inventory`, from memory (a memfd: the
    secrets in it never touch a disk). Raises :class:`InventoryError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InventoryError("the inventory body is not UTF-8 text") from None
    try:
        doc = json.loads(text) if is_json else yaml.safe_load(text)
    except ValueError as exc:
        raise InventoryError(f"the inventory body is not valid JSON (line {getattr(exc, 'lineno', '?')})") from None
    except (yaml.YAMLError, RecursionError):
        doc = None  # load_inventory reports where, without quoting the text
    problems = _refuse_references(doc)
    if problems:
        raise InventoryError(f"{len(problems)} problem(s), nothing loaded", problems=problems)  # type: ignore[arg-type]
    if is_json:
        text = json.dumps(doc)
    fd = os.memfd_create("powerq-inventory", os.MFD_CLOEXEC)
    path = f"/proc/self/fd/{fd}"
    try:
        os.write(fd, text.encode("utf-8"))
        try:
            inv = load_inventory(path, environ={})
        except InventoryError as exc:
            message = exc.message.replace(f"inventory {path}", "inventory body").replace(path, "body")
            raise InventoryError(message.splitlines()[0], problems=exc.problems) from None
    finally:
        os.close(fd)
    return dataclasses.replace(inv, source=source)


__all__ = ["ACTIONS", "ApiError", "Dispatcher", "check_api_config", "create_app"]
