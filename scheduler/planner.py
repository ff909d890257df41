"""Turning a request (action + node set + options) into a plan, and submitting it.

Everything is checked before anything is queued: unknown nodes, actions a power type
cannot do, bad options, and racks whose queue has no worker. A refused request leaves
no job and no message behind.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from drivers import registry
from drivers.base import BootDevice
from drivers.errors import PowerError, SettingsError

from . import audit  # audit (issue 5)
from .budget import Budgets, Timeline, nodes_from_index, plan_timeline
from .inventory import index_resolver
from .nodeset import expand, fold
from .store import Store, new_job_id

ACTIONS = ("on", "off", "cycle", "query", "boot", "enlist")


class PlanError(SettingsError):
    """The request cannot be planned; ``problems`` says why, node by node."""

    code = "bad_request"
    default_message = "the request was refused"


class ConfirmationRequired(PlanError):
    """An off / cycle this wide needs the operator's confirmation (``--yes``)."""

    code = "confirmation_required"
    default_message = "this request needs confirmation"


class BlastRadiusExceeded(PlanError):
    """An off / cycle wider than the configured maximum needs ``--force``."""

    code = "blast_radius_exceeded"
    default_message = "this request is wider than the configured maximum"


DEFAULT_ENLIST_USER = "powerq"
"""The BMC account ``powerq enlist`` creates unless told otherwise."""
USERNAME_RE = re.compile(r"[A-Za-z0-9._-]{1,16}")

TIMED_ACTIONS = ("on", "cycle")
"""Actions whose power-ons follow the budgets' timeline."""


def _entry_field(entry: Any, name: str, position: int) -> Any:
    if isinstance(entry, Mapping):
        return entry.get(name)
    if isinstance(entry, tuple | list):
        return entry[position]
    return getattr(entry, name)


def resolver_for(index: Mapping[str, Any]) -> Callable[[str, str], set[str]]:
    """Group resolver over a stored inventory index (``@rack:``, ``@type:``, ``@tag:``,
    ``@all``). A group that names no node is an error, so a typo never widens a set."""
    return index_resolver(index)


@dataclass
class Plan:
    action: str
    nodeset: str
    nodes: list[str]
    chunks: list[tuple[str, list[str]]]
    options: dict[str, Any] = field(default_factory=dict)
    timeline: Timeline | None = None
    """For ``on`` / ``cycle`` under power budgets: when each node may start."""
    origin: float | None = None
    """The timeline's time zero (Redis clock, epoch seconds), set by :func:`submit`."""

    def options_for(self, nodes: Sequence[str]) -> dict[str, Any]:
        """The task options of one chunk: the job's options, plus the chunk's part of the
        timeline once the plan is submitted."""
        out = dict(self.options)
        if self.timeline is not None and self.origin is not None:
            out["release"] = {
                "origin": self.origin,
                "offsets": {n: self.timeline.starts[n] for n in nodes if n in self.timeline.starts},
            }
        return out

    @property
    def racks(self) -> list[str]:
        return sorted({rack for rack, _ in self.chunks})

    def nodes_per_rack(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rack, nodes in self.chunks:
            out[rack] = out.get(rack, 0) + len(nodes)
        return dict(sorted(out.items()))


def _queue(rack: str) -> str:
    return f"powerq.rack.{rack}"


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    out = {
        "action": plan.action,
        "nodeset": plan.nodeset,
        "nodes": len(plan.nodes),
        "options": plan.options,
        "queues": [
            {"queue": _queue(rack), "rack": rack, "nodes": fold(nodes), "count": len(nodes)}
            for rack, nodes in plan.chunks
        ],
    }
    if plan.timeline is not None:
        out["timeline"] = plan.timeline.to_dict()
    return out


def check_blast_radius(
    plan: Plan, config: Any, *, yes: bool = False, force: bool = False
) -> None:
    """Refuse an ``off`` / ``cycle`` wider than the configured limits: more than
    ``confirm_threshold`` nodes or ``confirm_racks`` racks needs ``yes``; more than
    ``max_nodes`` or ``max_racks`` (0: no limit) needs ``force``.

    Raises :class:`ConfirmationRequired` or :class:`BlastRadiusExceeded`.
    """
    if plan.action not in ("off", "cycle"):
        return
    nodes, racks = len(plan.nodes), len(plan.racks)
    over = []
    if config.max_nodes and nodes > config.max_nodes:
        over.append(f"{nodes} nodes (maximum {config.max_nodes})")
    if config.max_racks and racks > config.max_racks:
        over.append(f"{racks} racks (maximum {config.max_racks})")
    if over and not force:
        raise BlastRadiusExceeded(
            f"{plan.action} of " + " in ".join(over) + " is refused without --force",
            nodes=nodes, racks=racks,
        )
    if not yes and (nodes > config.confirm_threshold or racks > config.confirm_racks):
        raise ConfirmationRequired(
            f"{plan.action} of {nodes} node(s) in {racks} rack(s) needs confirmation (more than "
            f"{config.confirm_threshold} nodes or {config.confirm_racks} rack(s)): add --yes",
            nodes=nodes, racks=racks,
        )


def check_options(action: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise the options of an action. Raises :class:`PlanError`."""
    if action not in ACTIONS:
        raise PlanError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    allowed = {"on": set(), "query": set(), "off": {"soft"}, "cycle": {"soft"},
               "boot": {"device", "efi", "persistent"}, "enlist": {"username"}}[action]
    extra = set(options) - allowed
    if extra:
        raise PlanError(f"option(s) {', '.join(sorted(extra))} do not apply to {action}")
    out = dict(options)
    if action == "boot":
        try:
            out["device"] = str(BootDevice(str(out.get("device", "pxe")).lower()))
        except ValueError:
            raise PlanError(
                f"unknown boot device {out.get('device')!r}: use "
                + ", ".join(d.value for d in BootDevice)
            ) from None
        out["efi"] = bool(out.get("efi", False))
        out["persistent"] = bool(out.get("persistent", False))
    if "soft" in out:
        out["soft"] = bool(out["soft"])
    if action == "enlist":
        username = str(out.get("username") or DEFAULT_ENLIST_USER)
        if not USERNAME_RE.fullmatch(username):
            raise PlanError(
                f"BMC user name {username!r} is not valid: 1 to 16 letters, digits, '.', '_' or '-'"
            )
        out["username"] = username
    return out


def make_plan(
    action: str,
    expr: str,
    index: Mapping[str, Any],
    *,
    chunk_size: int,
    options: Mapping[str, Any] | None = None,
    budgets: Budgets | None = None,
) -> Plan:
    """Expand ``expr`` over the inventory ``index`` and split it into rack chunks. For
    ``on`` / ``cycle`` under ``budgets``, plan the power-on timeline too; each rack's
    nodes then go in one chunk, in timeline order.

    Raises :class:`PlanError` (or :class:`NodeSetError`) naming every refused node.
    """
    opts = check_options(action, options or {})
    names = expand(expr, resolver_for(index))
    if not names:
        raise PlanError(f"node set {expr!r} matches no node")
    unknown = [n for n in names if n not in index]
    if unknown:
        raise PlanError(
            f"unknown node(s): {fold(unknown)}", problems=[{"node": n, "reason": "not in the inventory"} for n in unknown]
        )
    problems = []
    for name in names:
        power_type = _entry_field(index[name], "power_type", 1)
        try:
            driver = registry.get(power_type)
        except PowerError as exc:
            problems.append({"node": name, "reason": exc.message})
            continue
        if action == "boot" and not driver.capabilities.pxe_next_boot:
            problems.append({"node": name, "reason": f"power type {power_type} cannot set the next boot device"})
        if action == "enlist" and not driver.capabilities.bmc_enlistment:
            problems.append({"node": name, "reason": f"power type {power_type} cannot create BMC users"})
    if problems:
        raise PlanError(
            f"{len(problems)} node(s) refused: " + "; ".join(f"{p['node']}: {p['reason']}" for p in problems[:10])
            + (" ..." if len(problems) > 10 else ""),
            problems=problems,
        )
    timeline = None
    if budgets and action in TIMED_ACTIONS:
        timeline = plan_timeline(nodes_from_index(names, index), budgets)
    by_rack: dict[str, list[str]] = {}
    for name in names:
        by_rack.setdefault(_entry_field(index[name], "rack", 0), []).append(name)
    chunks = []
    for rack in sorted(by_rack):
        members = by_rack[rack]
        if timeline is not None:
            # One message per rack, nodes in timeline order: the worker holds each node
            # until its time, so a second chunk of the same rack would only wait for a
            # free worker slot and start late.
            chunks.append((rack, sorted(members, key=timeline.starts.__getitem__)))
            continue
        for start in range(0, len(members), chunk_size):
            chunks.append((rack, members[start : start + chunk_size]))
    return Plan(action=action, nodeset=expr, nodes=names, chunks=chunks, options=opts,
                timeline=timeline)


@audit.refusals_recorded  # audit (issue 5): a refusal raised here is recorded with its code
def submit(
    plan: Plan,
    store: Store,
    *,
    racks_without_worker: Callable[[Sequence[str]], list[str]],
    send: Callable[[str, Plan], int],
    requested_by: str,
    lead: float = 1.0,
    max_chunk_seconds: float | None = None,
) -> str:
    """Check every rack has a worker, record the job, then queue its chunks. A timeline
    starts ``lead`` seconds from now (Redis clock), so every chunk is there in time; one
    that would hold a chunk longer than ``max_chunk_seconds`` is refused.

    Raises :class:`PlanError` (nothing recorded or queued) when a rack has no worker.
    """
    missing = racks_without_worker(plan.racks)
    if missing:
        idle = [n for rack, nodes in plan.chunks if rack in missing for n in nodes]
        raise PlanError(
            "no worker consumes the queue of rack(s) "
            + ", ".join(missing)
            + f" (nodes {fold(idle)}): start one with `powerq worker --rack RACK`",
            problems=[{"rack": r, "reason": "no worker"} for r in missing],
        )
    if plan.timeline is not None and max_chunk_seconds is not None:
        longest = lead + plan.timeline.makespan
        if longest > max_chunk_seconds:
            raise PlanError(
                f"the power-on timeline lasts {longest:.0f} s, longer than a chunk may run "
                f"before the broker would deliver it again ({max_chunk_seconds:.0f} s): raise "
                "POWERQ_VISIBILITY_TIMEOUT, loosen the budgets, or power on fewer nodes at a time"
            )
    job_id = new_job_id()
    # "enqueued" 0 until every chunk is on the broker: a worker holds a chunk until then, and
    # acts on none of its nodes if queuing fails part-way (never a partial enqueue).
    extra: dict[str, Any] = {"enqueued": "0"}
    if plan.timeline is not None:
        plan.origin = store.now() + lead
        extra.update(origin=plan.origin, makespan=plan.timeline.makespan,
                     lower_bound=plan.timeline.lower_bound)
    store.create_job(
        job_id,
        action=plan.action,
        nodeset=plan.nodeset,
        nodes=len(plan.nodes),
        chunks=len(plan.chunks),
        options=plan.options,
        requested_by=requested_by,
        extra=extra,
    )
    audit.record_request(store, job_id, plan, requested_by)  # audit (issue 5)
    try:
        send(job_id, plan)
    except BaseException as exc:  # a broker error, or Ctrl-C half-way through
        try:
            store.fail_enqueue(job_id, f"could not queue: {type(exc).__name__}")
        except Exception:  # noqa: S110 - Redis down too: the chunks that arrived fail the job
            pass  # themselves after workers.tasks.ENQUEUE_WAIT; the broker's error is the news
        raise
    store.mark_enqueued(job_id)
    return job_id
