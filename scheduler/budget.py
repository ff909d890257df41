"""Power budgets and the power-on timeline that respects them.

Powering a thousand servers on at once trips breakers: the inrush current has to be
spread. A **budget** caps how many nodes drawing from one resource may start within
any sliding window of time; the resources are each PDU (or circuit) a node names, each
rack, and optionally the whole fleet. The inventory declares them (``budgets:``,
documented in ``deploy/inventory.example.yaml``)::

    budgets:
      pdu: {max_starts: 8, window: 10s}                # default for every PDU
      pdus: {pdu-a1: {max_starts: 4, window: 10s}}     # per-PDU overrides
      rack: {max_starts: 20, window: 10s}              # default for every rack
      racks: {r1: {max_starts: 10, window: 5s}}        # per-rack overrides
      global: {max_starts: 100, window: 10s}           # fleet-wide cap (optional)

Meaning of ``{max_starts: M, window: W}``: for any two starts on that resource, at most
``M`` starts (those two included) fall within less than ``W`` seconds of the first;
equivalently, sorted by time, the start ``M`` places after any start is at least ``W``
seconds later. A node without a ``pdu`` is under no PDU budget; a resource without a
budget (and without a default) is unlimited.

:func:`plan_timeline` gives each node a start offset respecting every budget at once,
releasing nodes in priority order (lower value first), and :func:`verify` checks any
schedule, planned or really recorded, against the budgets. :func:`render_timeline`
and :func:`plot_timeline` show a timeline to an operator (``--dry-run``, ``--plot``).

Pure Python: no Celery, no Redis, no driver library. matplotlib is imported only by
:func:`plot_timeline`.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush
from pathlib import Path
from typing import Any, NamedTuple

from drivers.errors import SettingsError, ToolMissingError

from .nodeset import fold, natural_key

__all__ = [
    "DEFAULT_PRIORITY",
    "NO_PDU",
    "Budget",
    "NodeLike",
    "BudgetError",
    "Budgets",
    "PlanNode",
    "Resource",
    "Step",
    "Timeline",
    "Violation",
    "format_duration",
    "nodes_from_index",
    "parse_budget",
    "parse_budgets",
    "parse_duration",
    "plan_timeline",
    "plot_timeline",
    "render_timeline",
    "verify",
]

DEFAULT_PRIORITY = 100
"""A node's priority when the inventory gives none; lower values start first."""

NO_PDU = "(no pdu)"
"""How nodes that name no PDU are grouped by :meth:`Timeline.per_resource_counts`."""

EPSILON = 1e-9
"""Slack (seconds) the planner allows for floating-point sums of windows."""

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_BUDGET_KEYS = ("max_starts", "window")
_SECTION_KEYS = ("pdu", "pdus", "rack", "racks", "global")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+\Z")


# --------------------------------------------------------------------------- budgets


class BudgetError(SettingsError):
    """The ``budgets:`` section is invalid; ``problems`` lists every ``(path, reason)``."""

    code = "bad_budgets"
    default_message = "invalid power budgets"

    def __init__(
        self,
        message: str | None = None,
        *,
        problems: Sequence[tuple[str, str]] = (),
        **details: Any,
    ) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        if self.problems and message is None:
            message = "; ".join(f"{path}: {reason}" for path, reason in self.problems)
        if self.problems:
            details["problems"] = [f"{path}: {reason}" for path, reason in self.problems]
        super().__init__(message, **details)


def parse_duration(value: Any, path: str = "window") -> float:
    """Seconds from ``10s``, ``500ms``, ``2m``, ``1h``, ``"10"`` or a number (seconds).

    Raises :class:`SettingsError` naming ``path`` when ``value`` is not a positive,
    finite duration.
    """
    if isinstance(value, bool):
        raise SettingsError(f"{path}: must be a duration such as 10s, 500ms or 2m, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise SettingsError(
            f"{path}: must be a duration such as 10s, 500ms or 2m, not {value!r}"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise SettingsError(f"{path}: must be a positive duration, not {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``10.0`` -> ``"10s"``, ``0.5`` -> ``"500ms"``, ``120.0`` -> ``"2m"``. Never raises."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Budget:
    """At most :attr:`max_starts` starts within any :attr:`window` seconds."""

    max_starts: int
    """Starts allowed within one window (at least 1)."""
    window: float
    """The window's length in seconds (positive)."""

    def __str__(self) -> str:
        return f"{self.max_starts}/{format_duration(self.window)}"

    def min_span(self, count: int) -> float:
        """The shortest time from the first to the last of ``count`` starts. Never raises."""
        if count <= 0:
            return 0.0
        return (math.ceil(count / self.max_starts) - 1) * self.window

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`parse_budget` reads back."""
        return {"max_starts": self.max_starts, "window": self.window}


def parse_budget(raw: Any, path: str) -> Budget:
    """A :class:`Budget` from ``{max_starts: N, window: DURATION}``.

    Raises :class:`BudgetError` listing every problem, each named by its path
    (``budgets.pdus.pdu-a1.window``).
    """
    if not isinstance(raw, Mapping):
        raise BudgetError(
            problems=[(path, "must be a mapping {max_starts: N, window: DURATION}")]
        )
    problems: list[tuple[str, str]] = []
    for key in raw:
        if key not in _BUDGET_KEYS:
            problems.append((f"{path}.{key}", "unknown key (expected max_starts, window)"))
    max_starts = raw.get("max_starts")
    if max_starts is None:
        problems.append((f"{path}.max_starts", "required"))
    elif isinstance(max_starts, bool) or not isinstance(max_starts, int) or max_starts < 1:
        problems.append((f"{path}.max_starts", f"must be a whole number >= 1, not {max_starts!r}"))
    window = 0.0
    if "window" not in raw or raw["window"] is None:
        problems.append((f"{path}.window", "required"))
    else:
        try:
            window = parse_duration(raw["window"], f"{path}.window")
        except SettingsError as exc:
            problems.append((f"{path}.window", exc.message.partition(": ")[2]))
    if problems:
        raise BudgetError(problems=problems)
    assert isinstance(max_starts, int)
    return Budget(max_starts=max_starts, window=window)


class Resource(NamedTuple):
    """Something nodes draw power from: ``("pdu", name)``, ``("rack", name)`` or
    ``("global", "")``."""

    kind: str
    name: str

    def __str__(self) -> str:
        return self.kind if self.kind == "global" else f"{self.kind}:{self.name}"


GLOBAL = Resource("global", "")


@dataclass(frozen=True)
class Budgets:
    """Every power budget of the fleet, as the inventory's ``budgets:`` declares them."""

    pdu: Budget | None = None
    """The budget of a PDU not named in :attr:`pdus`."""
    pdus: Mapping[str, Budget] = field(default_factory=dict)
    """PDU name -> its own budget."""
    rack: Budget | None = None
    """The budget of a rack not named in :attr:`racks`."""
    racks: Mapping[str, Budget] = field(default_factory=dict)
    """Rack name -> its own budget."""
    fleet: Budget | None = None
    """The fleet-wide cap (``global:`` in the inventory)."""

    def __bool__(self) -> bool:
        return bool(self.pdu or self.pdus or self.rack or self.racks or self.fleet)

    def for_pdu(self, pdu: str | None) -> Budget | None:
        """The budget of ``pdu`` (None for no PDU, or no budget)."""
        if pdu is None:
            return None
        return self.pdus.get(pdu, self.pdu)

    def for_rack(self, rack: str) -> Budget | None:
        """The budget of ``rack`` (None when unlimited)."""
        return self.racks.get(rack, self.rack)

    def constraints(self, rack: str, pdu: str | None) -> list[tuple[Resource, Budget]]:
        """Every budgeted resource a node in ``rack`` drawing from ``pdu`` counts against."""
        out: list[tuple[Resource, Budget]] = []
        if (budget := self.for_pdu(pdu)) is not None:
            out.append((Resource("pdu", pdu or ""), budget))
        if (budget := self.for_rack(rack)) is not None:
            out.append((Resource("rack", rack), budget))
        if self.fleet is not None:
            out.append((GLOBAL, self.fleet))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data, in the inventory's shape, that :func:`parse_budgets`
        reads back (windows in seconds)."""
        out: dict[str, Any] = {}
        if self.pdu is not None:
            out["pdu"] = self.pdu.to_dict()
        if self.pdus:
            out["pdus"] = {k: v.to_dict() for k, v in sorted(self.pdus.items())}
        if self.rack is not None:
            out["rack"] = self.rack.to_dict()
        if self.racks:
            out["racks"] = {k: v.to_dict() for k, v in sorted(self.racks.items())}
        if self.fleet is not None:
            out["global"] = self.fleet.to_dict()
        return out

    def describe(self) -> str:
        """One line for humans: ``pdu 8/10s (pdu-a1 4/10s), rack 20/10s, global 100/10s``."""
        parts: list[str] = []
        for noun, default, named in (
            ("pdu", self.pdu, self.pdus),
            ("rack", self.rack, self.racks),
        ):
            if default is None and not named:
                continue
            text = f"{noun} {default}" if default is not None else f"{noun} unlimited"
            if named:
                shown = sorted(named.items(), key=lambda kv: natural_key(kv[0]))
                extra = ", ".join(f"{k} {v}" for k, v in shown[:4])
                text += f" ({extra}{', ...' if len(shown) > 4 else ''})"
            parts.append(text)
        if self.fleet is not None:
            parts.append(f"global {self.fleet}")
        return ", ".join(parts) or "no budgets"


def parse_budgets(raw: Any, path: str = "budgets") -> Budgets:
    """:class:`Budgets` from the inventory's ``budgets:`` mapping (None: no budgets).

    Raises :class:`BudgetError` whose ``problems`` lists every ``(path, reason)`` at
    once, e.g. ``("budgets.pdus.pdu-a1.window", "must be a positive duration, ...")``.
    """
    if raw is None:
        return Budgets()
    if not isinstance(raw, Mapping):
        raise BudgetError(
            problems=[(path, f"must be a mapping with keys {', '.join(_SECTION_KEYS)}")]
        )
    problems: list[tuple[str, str]] = []

    def one(value: Any, where: str) -> Budget | None:
        try:
            return parse_budget(value, where)
        except BudgetError as exc:
            problems.extend(exc.problems)
            return None

    def named(value: Any, where: str, noun: str) -> dict[str, Budget]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            problems.append((where, f"must map {noun} name to {{max_starts, window}}"))
            return {}
        out: dict[str, Budget] = {}
        for name, item in value.items():
            if not isinstance(name, str) or not _NAME_RE.match(name):
                problems.append(
                    (f"{where}.{name}", f"a {noun} name must be letters, digits, '.', '_' or '-'")
                )
                continue
            budget = one(item, f"{where}.{name}")
            if budget is not None:
                out[name] = budget
        return out

    for key in raw:
        if key not in _SECTION_KEYS:
            problems.append(
                (f"{path}.{key}", f"unknown key (expected {', '.join(_SECTION_KEYS)})")
            )
    budgets = Budgets(
        pdu=None if raw.get("pdu") is None else one(raw["pdu"], f"{path}.pdu"),
        pdus=named(raw.get("pdus"), f"{path}.pdus", "PDU"),
        rack=None if raw.get("rack") is None else one(raw["rack"], f"{path}.rack"),
        racks=named(raw.get("racks"), f"{path}.racks", "rack"),
        fleet=None if raw.get("global") is None else one(raw["global"], f"{path}.global"),
    )
    if problems:
        raise BudgetError(problems=problems)
    return budgets


# --------------------------------------------------------------------------- nodes


class PlanNode(NamedTuple):
    """What the planner needs of a node: any ``(name, rack, pdu, priority)`` tuple will do."""

    name: str
    rack: str
    pdu: str | None = None
    """The PDU or circuit the node draws from; None: under no PDU budget."""
    priority: int = DEFAULT_PRIORITY
    """Lower values start first."""


NodeLike = tuple[str, str, str | None, int] | PlanNode


def nodes_from_index(names: Iterable[str], index: Mapping[str, Any]) -> list[PlanNode]:
    """Plan nodes for ``names`` from an inventory index (name -> ``NodeInfo``: anything
    with ``rack`` and, optionally, ``pdu`` and ``priority`` attributes).

    Raises :class:`SettingsError` naming the nodes that are not in ``index``.
    """
    out: list[PlanNode] = []
    missing: list[str] = []
    for name in names:
        info = index.get(name)
        if info is None:
            missing.append(name)
            continue
        out.append(
            PlanNode(
                name,
                str(info.rack),
                getattr(info, "pdu", None),
                int(getattr(info, "priority", DEFAULT_PRIORITY)),
            )
        )
    if missing:
        raise SettingsError(f"unknown node(s): {fold(missing)}")
    return out


def _normalise(nodes: Iterable[NodeLike]) -> dict[str, PlanNode]:
    out: dict[str, PlanNode] = {}
    duplicates: list[str] = []
    for raw in nodes:
        node = PlanNode(*raw)
        if node.name in out:
            duplicates.append(node.name)
        out[node.name] = node
    if duplicates:
        raise SettingsError(f"node(s) listed more than once: {fold(duplicates)}")
    return out


# --------------------------------------------------------------------------- timeline


class Step(NamedTuple):
    """Nodes that start at the same offset."""

    offset: float
    """Seconds after the timeline's origin."""
    nodes: list[str]
    """In natural order."""


@dataclass(frozen=True)
class Violation:
    """A run of starts on one resource that exceeds its budget."""

    resource: Resource
    budget: Budget
    nodes: tuple[str, ...]
    """Every node of the run, in start order."""
    worst: int
    """The most starts found within one window of the run (more than ``max_starts``)."""
    first: float
    """Start time of the run's first node (as given to :func:`verify`)."""
    last: float

    def __str__(self) -> str:
        return (
            f"{self.resource}: {self.worst} starts within {format_duration(self.budget.window)}"
            f" (budget {self.budget}) between {_number(self.first)} and {_number(self.last)}:"
            f" {fold(self.nodes)}"
        )


def _number(value: float) -> str:
    """``0.0`` -> ``0``, ``1700000000.25`` -> ``1700000000.25`` (never exponent form)."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _by_resource(
    starts: Mapping[str, float], budgets: Budgets, nodes: Mapping[str, PlanNode]
) -> dict[Resource, tuple[Budget, list[tuple[float, str]]]]:
    tracks: dict[Resource, tuple[Budget, list[tuple[float, str]]]] = {}
    for name, at in starts.items():
        node = nodes[name]
        for resource, budget in budgets.constraints(node.rack, node.pdu):
            tracks.setdefault(resource, (budget, []))[1].append((at, name))
    return tracks


def verify(
    starts: Mapping[str, float],
    budgets: Budgets,
    nodes: Iterable[NodeLike],
    *,
    tolerance: float = 1e-6,
) -> list[Violation]:
    """Every budget violation in ``starts`` (node -> start time, any origin: planned
    offsets or real recorded epoch times), one :class:`Violation` per run of starts
    that breaks one resource's budget. An empty list means the schedule is within budget.

    Nodes of ``nodes`` missing from ``starts`` (never started) are not counted. Two
    starts count as a full window apart when they are at least ``window - tolerance``
    seconds apart.

    Raises :class:`SettingsError` when ``starts`` names a node not in ``nodes``, or a
    start time is not a finite number, or ``nodes`` lists a name twice.
    """
    known = _normalise(nodes)
    unknown = [name for name in starts if name not in known]
    if unknown:
        raise SettingsError(f"start time(s) for node(s) not in the plan: {fold(unknown)}")
    bad = [name for name, at in starts.items() if not math.isfinite(at)]
    if bad:
        raise SettingsError(f"start time(s) that are not finite numbers: {fold(bad)}")
    out: list[Violation] = []
    tracks = _by_resource(starts, budgets, known)
    for resource in sorted(tracks, key=lambda r: (r.kind, natural_key(r.name))):
        budget, track = tracks[resource]
        track.sort(key=lambda item: (item[0], natural_key(item[1])))
        times = [at for at, _ in track]
        limit = budget.window - tolerance
        m = budget.max_starts
        run_start = run_end = -1
        worst = 0
        for i in range(len(times) - m):
            if times[i + m] - times[i] >= limit:
                continue
            # the window opening at start i holds starts i .. j (j >= i + m)
            j = bisect_left(times, times[i] + limit, lo=i + m) - 1
            if run_start >= 0 and i <= run_end:
                run_end = max(run_end, j)
                worst = max(worst, j - i + 1)
                continue
            if run_start >= 0:
                out.append(_violation(resource, budget, track, run_start, run_end, worst))
            run_start, run_end, worst = i, j, j - i + 1
        if run_start >= 0:
            out.append(_violation(resource, budget, track, run_start, run_end, worst))
    return out


def _violation(
    resource: Resource,
    budget: Budget,
    track: list[tuple[float, str]],
    first: int,
    last: int,
    worst: int,
) -> Violation:
    return Violation(
        resource=resource,
        budget=budget,
        nodes=tuple(name for _, name in track[first : last + 1]),
        worst=worst,
        first=track[first][0],
        last=track[last][0],
    )


@dataclass(frozen=True)
class Timeline:
    """When each node starts. Build it with :func:`plan_timeline`."""

    starts: dict[str, float]
    """Node -> seconds after :attr:`origin`, ordered by time then natural name."""
    nodes: dict[str, PlanNode]
    """Every planned node, by name."""
    budgets: Budgets
    lower_bound: float
    """No schedule of these nodes within these budgets can be shorter: the busiest
    resource's ``(ceil(n / max_starts) - 1) * window``."""
    origin: float = 0.0
    """What the offsets count from (``start`` of :func:`plan_timeline`)."""

    @property
    def makespan(self) -> float:
        """Offset of the last start (0 for an empty timeline)."""
        return max(self.starts.values(), default=0.0)

    def __len__(self) -> int:
        return len(self.starts)

    def at(self, name: str) -> float:
        """The absolute start time (``origin + offset``) of ``name``. Raises KeyError."""
        return self.origin + self.starts[name]

    def absolute(self) -> dict[str, float]:
        """Node -> ``origin + offset``."""
        return {name: self.origin + offset for name, offset in self.starts.items()}

    def steps(self) -> list[Step]:
        """Nodes grouped by start offset, earliest first."""
        out: list[Step] = []
        for name, offset in self.starts.items():  # already ordered by (offset, name)
            if out and out[-1].offset == offset:
                out[-1].nodes.append(name)
            else:
                out.append(Step(offset, [name]))
        return out

    def per_resource_counts(self, kind: str = "pdu") -> dict[str, dict[float, int]]:
        """Resource name -> {offset: nodes started then} for ``kind`` ``"pdu"`` (nodes
        with no PDU under :data:`NO_PDU`), ``"rack"`` or ``"global"`` (one key, ``""``).
        Counts every node, budgeted or not. Raises ValueError for another kind."""
        if kind not in ("pdu", "rack", "global"):
            raise ValueError(f"kind must be pdu, rack or global, not {kind!r}")
        out: dict[str, dict[float, int]] = {}
        for name, offset in self.starts.items():
            node = self.nodes[name]
            key = {"pdu": node.pdu or NO_PDU, "rack": node.rack, "global": ""}[kind]
            counts = out.setdefault(key, {})
            counts[offset] = counts.get(offset, 0) + 1
        return {k: out[k] for k in sorted(out, key=_pdu_order)}

    def verify(self, *, tolerance: float = 1e-6) -> list[Violation]:
        """:func:`verify` of this timeline's own offsets (empty unless there is a bug)."""
        return verify(self.starts, self.budgets, self.nodes.values(), tolerance=tolerance)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``: summary, budgets and steps (node sets folded)."""
        return {
            "nodes": len(self.starts),
            "makespan": self.makespan,
            "lower_bound": self.lower_bound,
            "budgets": self.budgets.to_dict(),
            "steps": [
                {"offset": step.offset, "count": len(step.nodes), "nodes": fold(step.nodes)}
                for step in self.steps()
            ],
        }


class _Track:
    """The sorted start offsets placed so far on one budgeted resource."""

    __slots__ = ("max_starts", "window", "times")

    def __init__(self, budget: Budget) -> None:
        self.max_starts = budget.max_starts
        self.window = budget.window
        self.times: list[float] = []

    def fits(self, t: float) -> bool:
        """Would one more start at ``t`` keep every window containing ``t`` in budget?

        Starts may already lie after ``t`` (a higher priority was placed later), so
        every window containing ``t`` is checked, not only the one ending at ``t``.
        """
        times, m, w = self.times, self.max_starts, self.window
        lo = bisect_right(times, t - w + EPSILON)  # first start less than w before t
        hi = bisect_left(times, t + w - EPSILON)  # first start w or more after t
        if hi - lo < m:
            return True
        at = bisect_right(times, t)
        if at - lo >= m or hi - bisect_left(times, t) >= m:
            return False
        near = times[lo:at] + [t] + times[at:hi]
        k = at - lo
        for i in range(max(0, k - m), min(k, len(near) - 1 - m) + 1):
            if near[i + m] - near[i] < w - EPSILON:
                return False
        return True

    def next_opening(self, t: float) -> float:
        """The earliest ``start + window`` after ``t`` (inf if none): where a window that
        blocks ``t`` can first have slid past one of its starts."""
        i = bisect_right(self.times, t - self.window)
        while i < len(self.times) and self.times[i] + self.window <= t:
            i += 1
        return self.times[i] + self.window if i < len(self.times) else math.inf


def plan_timeline(
    nodes: Iterable[NodeLike], budgets: Budgets, *, start: float = 0.0
) -> Timeline:
    """Give every node a start offset (seconds after ``start``) within every budget.

    Priority classes are planned in order, lowest value first: a class is placed as if
    the lower classes did not exist, so a lower-priority node never delays a
    higher-priority one; lower classes then fill the slots left free, so they may start
    before a higher-priority node whose own PDU or rack is full. Within a class, the
    planner moves forward in time and at each instant starts, while any node fits, the
    node whose busiest resource has the most work left (so the bottleneck never waits
    behind nodes that could go later), ties broken by natural node name. Each node
    starts at the earliest instant it fits at that point.

    Raises :class:`SettingsError` when ``nodes`` lists a name twice.
    """
    plan = _normalise(nodes)
    tracks: dict[Resource, _Track] = {}
    constraints: dict[str, tuple[Resource, ...]] = {}
    totals: dict[Resource, int] = {}
    for node in plan.values():
        keys: list[Resource] = []
        for resource, budget in budgets.constraints(node.rack, node.pdu):
            if resource not in tracks:
                tracks[resource] = _Track(budget)
            keys.append(resource)
            totals[resource] = totals.get(resource, 0) + 1
        constraints[node.name] = tuple(keys)
    lower_bound = max(
        (
            Budget(tracks[r].max_starts, tracks[r].window).min_span(n)
            for r, n in totals.items()
        ),
        default=0.0,
    )

    starts: dict[str, float] = {}
    by_priority: dict[int, list[str]] = {}
    for node in plan.values():
        by_priority.setdefault(node.priority, []).append(node.name)
    for priority in sorted(by_priority):
        _plan_class(by_priority[priority], constraints, tracks, starts)

    ordered = sorted(starts, key=lambda n: (starts[n], natural_key(n)))
    return Timeline(
        starts={name: starts[name] for name in ordered},
        nodes=plan,
        budgets=budgets,
        lower_bound=lower_bound,
        origin=start,
    )


def _plan_class(
    names: list[str],
    constraints: Mapping[str, tuple[Resource, ...]],
    tracks: Mapping[Resource, _Track],
    starts: dict[str, float],
) -> None:
    """Place one priority class's nodes into ``starts`` (and ``tracks``)."""
    order = {name: natural_key(name) for name in names}
    groups: dict[tuple[Resource, ...], deque[str]] = {}
    for name in sorted(names, key=order.__getitem__):
        groups.setdefault(constraints[name], deque()).append(name)
    # remaining work of each resource in this class, in seconds' worth of windows
    work: dict[Resource, float] = {}
    for key, queue in groups.items():
        for resource in key:
            work[resource] = work.get(resource, 0.0) + len(queue)
    for resource in work:
        work[resource] *= tracks[resource].window / tracks[resource].max_starts
    # A resource every group shares (the global cap, a lone rack) adds the same value to
    # every group's ranking, which leaves their order unchanged: leave it out, so that a
    # start only changes the rank of the groups that share its PDU or rack.
    shared = set.intersection(*(set(key) for key in groups)) if groups else set()
    ranked = {key: tuple(r for r in key if r not in shared) for key in groups}

    def rank(key: tuple[Resource, ...]) -> tuple[tuple[float, ...], str]:
        # busiest resource first (most work left), then the next busiest, then the name
        return tuple(sorted([-work[r] for r in ranked[key]])), order[groups[key][0]]

    # a group that did not fit at t cannot fit before its blocking resource's next opening
    blocked_until: dict[tuple[Resource, ...], float] = {}

    def fits(key: tuple[Resource, ...], t: float) -> bool:
        for resource in key:
            if not tracks[resource].fits(t):
                blocked_until[key] = tracks[resource].next_opening(t)
                return False
        return True

    t = 0.0
    while groups:
        # ranks only ever worsen (work left shrinks, the head moves on in name order), so a
        # heap entry whose rank is still current is the best group of all
        heap = [
            (rank(key), index, key)
            for index, key in enumerate(groups)
            if blocked_until.get(key, t) <= t and fits(key, t)
        ]
        heapify(heap)
        while heap:
            stored, index, key = heappop(heap)
            current = rank(key)
            if current != stored:
                heappush(heap, (current, index, key))
                continue
            if not fits(key, t):
                continue
            queue = groups[key]
            name = queue.popleft()
            starts[name] = t
            for resource in key:
                track = tracks[resource]
                insort(track.times, t)
                work[resource] -= track.window / track.max_starts
            if queue:
                heappush(heap, (rank(key), index, key))
            else:
                del groups[key]
        if not groups:
            break
        waiting = {r for key in groups for r in key}
        t_next = min((tracks[r].next_opening(t) for r in waiting), default=math.inf)
        if not math.isfinite(t_next):  # pragma: no cover - a blocked node has a track
            raise AssertionError("planner found no later instant for blocked nodes")
        t = t_next


# --------------------------------------------------------------------------- display


def _pdu_order(name: str) -> tuple[bool, str]:
    """Natural order, nodes without a PDU last."""
    return (name == NO_PDU, natural_key(name))


def _offset_text(offset: float) -> str:
    text = f"{offset:.1f}"
    if abs(float(text) - offset) > 1e-9:
        text = f"{offset:.3f}".rstrip("0")
    return f"+{text}s"


def _nodes_of(timeline: Timeline, nodes: Iterable[NodeLike] | None) -> dict[str, PlanNode]:
    return timeline.nodes if nodes is None else _normalise(nodes)


def render_timeline(timeline: Timeline, nodes: Iterable[NodeLike] | None = None) -> str:
    """The timeline as text for ``--dry-run``: a summary line, then one line per step::

        +0.0s    8 nodes  pdu-a1:4 pdu-a2:4  node[001-008]

    ``nodes`` defaults to the timeline's own. Raises KeyError when a planned node is
    missing from ``nodes``; SettingsError when ``nodes`` lists a name twice.
    """
    known = _nodes_of(timeline, nodes)
    steps = timeline.steps()
    lines = [
        f"{len(timeline)} node{'s' if len(timeline) != 1 else ''} in {len(steps)} "
        f"step{'s' if len(steps) != 1 else ''} over {timeline.makespan:g}s "
        f"(lower bound {timeline.lower_bound:g}s); budgets: {timeline.budgets.describe()}"
    ]
    width = max((len(_offset_text(s.offset)) for s in steps), default=0)
    count_width = max((len(str(len(s.nodes))) for s in steps), default=1)
    for step in steps:
        per_pdu: dict[str, int] = {}
        for name in step.nodes:
            pdu = known[name].pdu or NO_PDU
            per_pdu[pdu] = per_pdu.get(pdu, 0) + 1
        pdus = " ".join(f"{p}:{per_pdu[p]}" for p in sorted(per_pdu, key=_pdu_order))
        noun = "node " if len(step.nodes) == 1 else "nodes"
        lines.append(
            f"{_offset_text(step.offset):<{width}}  {len(step.nodes):>{count_width}} {noun}"
            f"  {pdus}  {fold(step.nodes)}"
        )
    return "\n".join(lines)


def plot_timeline(
    timeline: Timeline, nodes: Iterable[NodeLike] | None, path: str | Path
) -> Path:
    """Write a PNG of the timeline to ``path`` and return it: above, nodes started so
    far per PDU over time (one step line per PDU); below, nodes started at each step.
    ``nodes`` None means the timeline's own.

    Uses matplotlib's Agg canvas directly (no pyplot, no display, no global backend
    change). Raises :class:`ToolMissingError` when matplotlib is not installed,
    ``OSError`` when the file cannot be written, SettingsError/KeyError as
    :func:`render_timeline`.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ToolMissingError(
            "plotting needs matplotlib, which is not installed: pip install 'powerq[plot]'"
        ) from exc
    known = _nodes_of(timeline, nodes)
    target = Path(path)
    per_pdu: dict[str, list[float]] = {}
    for name, offset in timeline.starts.items():
        per_pdu.setdefault(known[name].pdu or NO_PDU, []).append(offset)
    end = max(timeline.makespan, timeline.lower_bound) or 1.0

    figure = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    palette = _PALETTE
    for index, pdu in enumerate(sorted(per_pdu, key=_pdu_order)):
        times = per_pdu[pdu]
        xs = [0.0, *times, end]
        ys = [0, *range(1, len(times) + 1), len(times)]
        top.step(xs, ys, where="post", color=palette[index % len(palette)], label=pdu,
                 linewidth=1.2)
    top.set_ylabel("nodes started per PDU (cumulative)")
    top.set_title(
        f"{len(timeline)} nodes, {len(per_pdu)} PDUs: finish at +{timeline.makespan:g}s"
        f" (lower bound {timeline.lower_bound:g}s)\nbudgets: {timeline.budgets.describe()}",
        fontsize=10,
    )
    top.grid(True, alpha=0.3)
    if len(per_pdu) <= 24:
        top.legend(fontsize=7, ncols=max(1, math.ceil(len(per_pdu) / 12)), loc="upper left")
    steps = timeline.steps()
    widths = min(1.0, end / max(len(steps), 1) * 0.6)
    bottom.bar([s.offset for s in steps], [len(s.nodes) for s in steps], width=widths,
               color="#4c72b0", align="center")
    if timeline.budgets.fleet is not None:
        bottom.axhline(timeline.budgets.fleet.max_starts, color="#c44e52", linestyle="--",
                       linewidth=1, label=f"global {timeline.budgets.fleet}")
        bottom.legend(fontsize=7, loc="upper right")
    bottom.set_ylabel("nodes per step")
    bottom.set_xlabel("seconds after the start")
    bottom.grid(True, alpha=0.3)
    figure.savefig(target, format="png")
    return target


_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
    "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)
