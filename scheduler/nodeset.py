"""Node sets in ClusterShell syntax, parsed here (no ClusterShell dependency).

::

    node[001-040]          ranges; zero padding is kept (node001 ... node040)
    node[1,3,5-7]          lists of numbers and ranges; ``a-b/2`` steps by 2
    r[1-2]n[01-03]         several bracket groups: the cross product
    a,b                    union
    node[1-10]!node5       difference
    node[1-10]&node[5-20]  intersection
    node[1-3]^node[2-4]    symmetric difference
    @rack:r12 @type:ipmi @tag:gpu @all
                           groups, resolved by the caller's resolver(kind, value);
                           the value may hold brackets: ``@rack:r[1-3]``

Operators have equal precedence and apply left to right, as in ClusterShell:
``a,b!c`` is ``(a,b)!c``. Blanks around operators are allowed.

:func:`expand` returns names in natural order (``node2`` before ``node10``) without
duplicates; :func:`fold` compresses names back into bracket syntax. Every bad input
raises :class:`NodeSetError` (code ``bad_nodeset``) naming the position; nothing else.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from drivers.errors import SettingsError

__all__ = [
    "MAX_NODES",
    "NodeSetError",
    "Resolver",
    "expand",
    "fold",
    "natural_key",
    "natural_sorted",
]

MAX_NODES = 1_000_000
"""The most names one range, one term or one whole expression may produce."""

Resolver = Callable[[str, str], set[str]]
"""``resolver(kind, value) -> names`` for ``@kind:value`` (``@all`` gives ``("all", "")``).
It raises :class:`NodeSetError` (or ``KeyError``) for an unknown kind or value."""

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_KIND_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_OPERATORS = frozenset(",!&^")
_BLANKS = frozenset(" \t")
_DIGITS_RE = re.compile(r"(\d+)")
_MAX_DIGITS = 1000
"""Longest range bound or step read as a number (Python refuses int() past 4,300 digits)."""


class NodeSetError(SettingsError):
    """A node set expression that cannot be expanded. ``position`` is 0-based (or None)."""

    code = "bad_nodeset"
    default_message = "invalid node set"

    def __init__(
        self,
        message: str | None = None,
        *,
        expression: str | None = None,
        position: int | None = None,
        **details: Any,
    ) -> None:
        self.expression = expression
        self.position = position
        self.reason = message or self.default_message
        text = self.reason
        if position is not None:
            text = f"{text} at position {position}"
        if expression is not None:
            shown = expression if len(expression) <= 120 else expression[:117] + "..."
            text = f"{text} in node set {shown!r}"
        if position is not None:
            details["position"] = position
        super().__init__(text, **details)


def _number_key(digits: str) -> str:
    """A string that orders digit runs by value, then by length (``1`` before ``01``)."""
    value = digits.lstrip("0") or "0"
    return chr(len(value)) + value + chr(len(digits))


def natural_key(name: str) -> str:
    """Sort key putting ``node2`` before ``node10`` (and ``node1`` before ``node01``).

    Digit runs are encoded as ``\\x00`` + their :func:`_number_key`, so that a number sorts
    before any text at the same place, as a (text, number, text, ...) tuple would; a
    string key sorts several times faster than a tuple.
    """
    return _DIGITS_RE.sub(lambda m: "\x00" + _number_key(m.group()), name)


def natural_sorted(names: Iterable[str]) -> list[str]:
    """``names`` in natural order, duplicates kept."""
    return sorted(names, key=natural_key)


# --------------------------------------------------------------------------- parsing


def _is_number(text: str) -> bool:
    return bool(text) and text.isascii() and text.isdigit()


class _Parser:
    def __init__(self, expr: str, resolver: Resolver | None) -> None:
        self.expr = expr
        self.resolver = resolver
        self.pos = 0
        self._groups: dict[tuple[str, str], set[str]] = {}

    def error(self, message: str, position: int | None = None) -> NodeSetError:
        return NodeSetError(
            message, expression=self.expr, position=self.pos if position is None else position
        )

    def peek(self) -> str:
        return self.expr[self.pos] if self.pos < len(self.expr) else ""

    def skip_blanks(self) -> None:
        while self.peek() in _BLANKS:
            self.pos += 1

    def parse(self) -> set[str]:
        if not self.expr.strip():
            raise NodeSetError("empty node set")
        self.skip_blanks()
        result = self.term()
        while True:
            self.skip_blanks()
            op = self.peek()
            if not op:
                return result
            if op not in _OPERATORS:
                raise self.error(f"unexpected character {op!r}")
            self.pos += 1
            self.skip_blanks()
            right = self.term()
            if op == ",":
                result |= right
            elif op == "!":
                result -= right
            elif op == "&":
                result &= right
            else:
                result ^= right
            if len(result) > MAX_NODES:
                raise self.error(f"node set larger than {MAX_NODES:,} names")

    def term(self) -> set[str]:
        start = self.pos
        c = self.peek()
        if not c:
            raise self.error("missing node name or group")
        if c == "@":
            return self.group()
        if c in _OPERATORS:
            raise self.error(f"missing node name or group before {c!r}")
        return set(self.pattern("node name", start))

    def pattern(self, what: str, start: int) -> list[str]:
        """Read a name pattern (text and bracket groups) and expand it."""
        pieces: list[list[str]] = []
        text: list[str] = []
        size = 1
        while True:
            c = self.peek()
            if c in _NAME_CHARS:
                text.append(c)
                self.pos += 1
            elif c == "[":
                if text:
                    pieces.append(["".join(text)])
                    text = []
                numbers = self.brackets()
                size *= len(numbers)
                if size > MAX_NODES:
                    raise self.error(f"range larger than {MAX_NODES:,} names", start)
                pieces.append(numbers)
            elif c == "]":
                raise self.error("unbalanced ']'")
            elif not c or c in _OPERATORS or c in _BLANKS:
                break
            else:
                raise self.error(f"bad character {c!r}")
        if text:
            pieces.append(["".join(text)])
        if not pieces:
            raise self.error(f"missing {what}")
        return ["".join(p) for p in itertools.product(*pieces)]

    def brackets(self) -> list[str]:
        """Read ``[...]`` at the current position; return its numbers as strings."""
        open_at = self.pos
        close = self.expr.find("]", open_at + 1)
        nested = self.expr.find("[", open_at + 1)
        if close < 0:
            raise self.error("unbalanced '['", open_at)
        if 0 <= nested < close:
            raise self.error("nested '['", nested)
        body = self.expr[open_at + 1 : close]
        if not body.strip():
            raise self.error("empty brackets", open_at)
        numbers: list[str] = []
        offset = open_at + 1
        for item in body.split(","):
            numbers.extend(self.range_item(item, offset))
            if len(numbers) > MAX_NODES:
                raise self.error(f"range larger than {MAX_NODES:,} names", open_at)
            offset += len(item) + 1
        self.pos = close + 1
        return list(dict.fromkeys(numbers))

    def range_item(self, item: str, at: int) -> list[str]:
        lead = len(item) - len(item.lstrip(" \t"))
        spec = item.strip(" \t")
        at += lead
        if not spec:
            raise self.error("empty range", at)
        step = 1
        if "/" in spec:
            spec, _, step_text = spec.partition("/")
            if (not step_text.isdigit() or not step_text.isascii()
                    or len(step_text) > _MAX_DIGITS or int(step_text) == 0):
                raise self.error("bad range step", at + len(spec) + 1)
            step = int(step_text)
        lo_text, dash, hi_text = spec.partition("-")
        hi_at = at + len(lo_text) + 1
        if not _is_number(lo_text):
            raise self.error("range bounds must be numbers", at)
        if not dash:
            if step != 1:
                raise self.error("a step needs a range", at)
            return [lo_text]
        if not _is_number(hi_text):
            raise self.error("range bounds must be numbers", hi_at)
        width = len(lo_text) if len(lo_text) > 1 and lo_text.startswith("0") else 0
        if len(hi_text) > 1 and hi_text.startswith("0") and len(hi_text) != width:
            raise self.error("inconsistent zero padding", hi_at)
        if max(len(lo_text), len(hi_text)) > _MAX_DIGITS:
            raise self.error(f"range bounds longer than {_MAX_DIGITS} digits", at)
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise self.error(f"reversed range {lo_text}-{hi_text}", at)
        if (hi - lo) // step + 1 > MAX_NODES:
            raise self.error(f"range larger than {MAX_NODES:,} names", at)
        return [str(n).zfill(width) for n in range(lo, hi + 1, step)]

    def group(self) -> set[str]:
        start = self.pos
        self.pos += 1  # '@'
        kind_start = self.pos
        while self.peek() in _KIND_CHARS:
            self.pos += 1
        kind = self.expr[kind_start : self.pos]
        if not kind:
            raise self.error("missing group kind after '@' (e.g. @rack:r12, @type:ipmi, @all)")
        values = [""]
        if self.peek() == ":":
            self.pos += 1
            values = self.pattern("group name", self.pos)
        if self.resolver is None:
            raise self.error("groups need an inventory to resolve them", start)
        names: set[str] = set()
        for value in values:
            key = (kind, value)
            if key not in self._groups:
                self._groups[key] = self.resolve(kind, value, start)
            names |= self._groups[key]
            if len(names) > MAX_NODES:
                raise self.error(f"node set larger than {MAX_NODES:,} names", start)
        return names

    def resolve(self, kind: str, value: str, at: int) -> set[str]:
        assert self.resolver is not None
        label = f"@{kind}:{value}" if value else f"@{kind}"
        try:
            names = self.resolver(kind, value)
        except NodeSetError as exc:
            raise self.error(f"{label}: {exc.reason}", at) from None
        except LookupError:
            raise self.error(f"unknown group {label}", at) from None
        return set(names)


def expand(expr: str, resolver: Resolver | None = None) -> list[str]:
    """Expand a node set expression into names, natural-sorted and without duplicates.

    ``resolver(kind, value)`` returns the names of group ``@kind:value`` (``@all`` calls
    it with ``("all", "")``); without a resolver any group is an error.

    Raises :class:`NodeSetError` for any bad input (empty, bad character, unbalanced or
    nested brackets, reversed range, inconsistent padding, more than :data:`MAX_NODES`
    names, unknown group), with the 0-based position of the fault.
    """
    if not isinstance(expr, str):
        raise NodeSetError(f"a node set must be a string, not {type(expr).__name__}")
    return natural_sorted(_Parser(expr, resolver).parse())


# --------------------------------------------------------------------------- folding


def _fold_numbers(numbers: Iterable[str]) -> str:
    """Fold numeric strings into a bracket body (or a bare number when there is one)."""
    ordered = sorted(set(numbers), key=_number_key)
    if len(ordered) == 1:
        return ordered[0]
    runs: list[tuple[str, str]] = []
    first = last = ordered[0]
    width = len(first) if len(first) > 1 and first.startswith("0") else 0
    for s in ordered[1:]:
        if len(last) <= _MAX_DIGITS and s == str(int(last) + 1).zfill(width):
            last = s
            continue
        runs.append((first, last))
        first = last = s
        width = len(s) if len(s) > 1 and s.startswith("0") else 0
    runs.append((first, last))
    return "[" + ",".join(a if a == b else f"{a}-{b}" for a, b in runs) + "]"


def fold(names: Iterable[str]) -> str:
    """Compress names into one node set expression: ``expand(fold(x)) == sorted(set(x))``.

    Names sharing their text and differing in numbers fold into bracket ranges, over
    several numeric fields at once (``r1n1, r1n2, r2n1, r2n2`` -> ``r[1-2]n[1-2]``).
    Never raises for node names made of [A-Za-z0-9._-].
    """
    by_shape: dict[tuple[str, ...], set[tuple[str, ...]]] = defaultdict(set)
    for name in set(names):
        parts = _DIGITS_RE.split(name)
        by_shape[tuple(parts[0::2])].add(tuple(parts[1::2]))

    out: list[tuple[str, str]] = []
    for texts, points in by_shape.items():
        dims = len(texts) - 1
        if dims == 0:
            out.append((natural_key(texts[0]), texts[0]))
            continue
        if dims == 1:  # the common case, without the box machinery
            nums = frozenset(p[0] for p in points)
            first = texts[0] + min(nums, key=_number_key) + texts[1]
            out.append((natural_key(first), texts[0] + _fold_numbers(nums) + texts[1]))
            continue
        boxes: set[tuple[frozenset[str], ...]] = {tuple(frozenset([n]) for n in p) for p in points}
        for axis in reversed(range(dims)):
            merged: dict[tuple[frozenset[str], ...], set[str]] = defaultdict(set)
            for box in boxes:
                merged[box[:axis] + box[axis + 1 :]].update(box[axis])
            boxes = {key[:axis] + (frozenset(vals),) + key[axis:] for key, vals in merged.items()}
        for box in boxes:
            text = texts[0] + "".join(
                _fold_numbers(nums) + texts[i + 1] for i, nums in enumerate(box)
            )
            first = texts[0] + "".join(
                min(nums, key=_number_key) + texts[i + 1] for i, nums in enumerate(box)
            )
            out.append((natural_key(first), text))
    out.sort()
    return ",".join(text for _, text in out)
