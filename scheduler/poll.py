"""Planning fleet polls: every node once per interval, spread evenly over it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PollChunk:
    rack: str
    index: int
    nodes: list[str]
    offset: float
    """Seconds after the start of each interval at which this chunk is queried."""


def poll_plan(index: Mapping[str, Any], every: float, chunk_size: int) -> list[PollChunk]:
    """Split the fleet into rack chunks of at most ``chunk_size`` nodes and give each an
    offset so that the chunks are spread evenly across the interval ``every``.

    ``index`` maps node name to an entry whose ``rack`` (attribute, or first item) is the
    node's rack. Racks are interleaved so no rack gets all its load at once.
    """
    if every <= 0 or chunk_size <= 0:
        raise ValueError("every and chunk_size must be positive")
    by_rack: dict[str, list[str]] = {}
    for name, entry in index.items():
        rack = getattr(entry, "rack", None) or (entry[0] if isinstance(entry, tuple | list) else entry["rack"])
        by_rack.setdefault(rack, []).append(name)
    per_rack: list[list[tuple[str, int, list[str]]]] = []
    for rack in sorted(by_rack):
        names = sorted(by_rack[rack])
        per_rack.append(
            [(rack, i, names[s : s + chunk_size]) for i, s in enumerate(range(0, len(names), chunk_size))]
        )
    ordered: list[tuple[str, int, list[str]]] = []
    depth = max((len(c) for c in per_rack), default=0)
    for level in range(depth):
        ordered.extend(chunks[level] for chunks in per_rack if level < len(chunks))
    step = every / len(ordered) if ordered else every
    return [PollChunk(rack, i, nodes, round(pos * step, 3)) for pos, (rack, i, nodes) in enumerate(ordered)]
