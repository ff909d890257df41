"""Turning a request (action + node set + options) into a plan, and submitting it.

Everything is checked before anything is queued: unknown nodes, actions a power type
cannot do, bad options, and racks whose queue has no worker. A refused request leaves
no job and no message behind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from drivers import registry
from drivers.base import BootDevice
from drivers.errors import PowerError, SettingsError

from .inventory import index_resolver
from .nodeset import expand, fold
from .store import Store, new_job_id

ACTIONS = ("on", "off", "cycle", "query", "boot")


class PlanError(SettingsError):
    """The request cannot be planned; ``problems`` says why, node by node."""

    code = "bad_request"
    default_message = "the request was refused"


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
    return {
        "action": plan.action,
        "nodeset": plan.nodeset,
        "nodes": len(plan.nodes),
        "options": plan.options,
        "queues": [
            {"queue": _queue(rack), "rack": rack, "nodes": fold(nodes), "count": len(nodes)}
            for rack, nodes in plan.chunks
        ],
    }


def check_options(action: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise the options of an action. Raises :class:`PlanError`."""
    if action not in ACTIONS:
        raise PlanError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    allowed = {"on": set(), "query": set(), "off": {"soft"}, "cycle": {"soft"},
               "boot": {"device", "efi", "persistent"}}[action]
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
    return out


def make_plan(
    action: str,
    expr: str,
    index: Mapping[str, Any],
    *,
    chunk_size: int,
    options: Mapping[str, Any] | None = None,
) -> Plan:
    """Expand ``expr`` over the inventory ``index`` and split it into rack chunks.

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
    if problems:
        raise PlanError(
            f"{len(problems)} node(s) refused: " + "; ".join(f"{p['node']}: {p['reason']}" for p in problems[:10])
            + (" ..." if len(problems) > 10 else ""),
            problems=problems,
        )
    by_rack: dict[str, list[str]] = {}
    for name in names:
        by_rack.setdefault(_entry_field(index[name], "rack", 0), []).append(name)
    chunks = []
    for rack in sorted(by_rack):
        members = by_rack[rack]
        for start in range(0, len(members), chunk_size):
            chunks.append((rack, members[start : start + chunk_size]))
    return Plan(action=action, nodeset=expr, nodes=names, chunks=chunks, options=opts)


def submit(
    plan: Plan,
    store: Store,
    *,
    racks_without_worker: Callable[[Sequence[str]], list[str]],
    send: Callable[[str, Plan], int],
    requested_by: str,
) -> str:
    """Check every rack has a worker, record the job, then queue its chunks.

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
    job_id = new_job_id()
    store.create_job(
        job_id,
        action=plan.action,
        nodeset=plan.nodeset,
        nodes=len(plan.nodes),
        chunks=len(plan.chunks),
        options=plan.options,
        requested_by=requested_by,
    )
    try:
        send(job_id, plan)
    except Exception as exc:
        store.mark_job(job_id, "failed", failure=f"could not queue: {type(exc).__name__}")
        raise
    return job_id
