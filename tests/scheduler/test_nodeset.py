"""Node set expansion and folding (scheduler/nodeset.py)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.errors import SettingsError
from scheduler.nodeset import MAX_NODES, NodeSetError, expand, fold, natural_sorted

GROUPS = {
    ("rack", "r1"): {"n1", "n2", "n3"},
    ("rack", "r2"): {"n4", "n5"},
    ("type", "ipmi"): {"n1", "n4"},
    ("all", ""): {"n1", "n2", "n3", "n4", "n5"},
}


def resolver(kind: str, value: str) -> set[str]:
    if kind not in {"rack", "type", "all"}:
        raise NodeSetError(f"unknown group kind {kind!r}")
    return GROUPS[(kind, value)]


# --------------------------------------------------------------------------- expansion


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("node[001-003]", ["node001", "node002", "node003"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("node[1,3,5-7]", ["node1", "node3", "node5", "node6", "node7"]),
        ("node[1-9/4]", ["node1", "node5", "node9"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("[1-2]x", ["1x", "2x"]),
        ("a,b", ["a", "b"]),
        ("b,a,a", ["a", "b"]),
        ("node[1-10]!node5", [f"node{i}" for i in (1, 2, 3, 4, 6, 7, 8, 9, 10)]),
        ("node[1-5]&node[4-9]", ["node4", "node5"]),
        ("node[1-3]^node[2-4]", ["node1", "node4"]),
        # equal precedence, left to right, as in ClusterShell
        ("a,b!b,c", ["a", "c"]),
        ("a,b!b", ["a"]),
        (" node[1-2] , node3 ", ["node1", "node2", "node3"]),
        ("node[10,2,1]", ["node1", "node2", "node10"]),
        ("node[1,01]", ["node1", "node01"]),
        ("my-host.example_1", ["my-host.example_1"]),
    ],
)
def test_expand(expr: str, names: list[str]) -> None:
    assert expand(expr) == names


def test_natural_order() -> None:
    assert natural_sorted(["node10", "node2", "node1", "a", "node01", "b1c10", "b1c9"]) == [
        "a",
        "b1c9",
        "b1c10",
        "node1",
        "node01",
        "node2",
        "node10",
    ]


def test_groups() -> None:
    assert expand("@rack:r1", resolver) == ["n1", "n2", "n3"]
    assert expand("@all!@type:ipmi", resolver) == ["n2", "n3", "n5"]
    assert expand("@rack:r[1-2]&@type:ipmi", resolver) == ["n1", "n4"]
    assert expand("@rack:r2,x9", resolver) == ["n4", "n5", "x9"]


def test_group_errors_point_at_the_group() -> None:
    with pytest.raises(NodeSetError) as err:
        expand("n1,@pdu:p1", resolver)
    assert err.value.position == 3
    assert "@pdu:p1" in err.value.message and "unknown group kind" in err.value.message

    with pytest.raises(NodeSetError, match="unknown group @rack:r9"):
        expand("@rack:r9", resolver)  # the resolver raised KeyError

    with pytest.raises(NodeSetError, match="groups need an inventory"):
        expand("@all")


@pytest.mark.parametrize(
    ("expr", "position", "words"),
    [
        ("node[1-3", 4, "unbalanced '['"),
        ("node1-3]", 7, "unbalanced ']'"),
        ("node[[1]]", 5, "nested"),
        ("node[5-1]", 5, "reversed range"),
        ("node[]", 4, "empty brackets"),
        ("node[1,,2]", 7, "empty range"),
        ("node[a-b]", 5, "numbers"),
        ("node[1-b]", 7, "numbers"),
        ("node[1-3/0]", 9, "step"),
        ("node[1-010]", 7, "padding"),
        ("node#1", 4, "bad character '#'"),
        ("node 1", 5, "unexpected character"),
        ("a,,b", 2, "missing"),
        ("a,", 2, "missing"),
        (",a", 0, "missing"),
        ("!a", 0, "missing"),
        ("@", 1, "group kind"),
        ("@rack:", 6, "missing group name"),
        ("node[0-2000000]", 5, "larger than"),
        ("a[1-1000]b[1-1001]", 0, "larger than"),
    ],
)
def test_bad_input_points_at_the_fault(expr: str, position: int, words: str) -> None:
    with pytest.raises(NodeSetError) as err:
        expand(expr, resolver)
    assert err.value.position == position, err.value.message
    assert words in err.value.message
    assert f"position {position}" in err.value.message
    assert err.value.code == "bad_nodeset"
    assert isinstance(err.value, SettingsError)
    assert err.value.to_dict()["details"]["position"] == position


@pytest.mark.parametrize("expr", ["", "   ", "\t"])
def test_empty(expr: str) -> None:
    with pytest.raises(NodeSetError, match="empty node set"):
        expand(expr)


def test_not_a_string() -> None:
    with pytest.raises(NodeSetError):
        expand(None)  # type: ignore[arg-type]


def test_size_limit_is_checked_before_expanding() -> None:
    with pytest.raises(NodeSetError, match="larger than"):
        expand("n[0-99999999999999999999999]")
    with pytest.raises(NodeSetError, match="larger than"):
        expand(f"a[1-{MAX_NODES}],b[1-2]")


# --------------------------------------------------------------------------- folding


@pytest.mark.parametrize(
    ("names", "folded"),
    [
        ([], ""),
        (["a"], "a"),
        (["node1", "node2", "node3", "node5"], "node[1-3,5]"),
        (["node001", "node002", "node010"], "node[001-002,010]"),
        (["node098", "node099", "node100"], "node[098-100]"),
        (["node9", "node10", "node11"], "node[9-11]"),
        (["r1n01", "r1n02", "r2n01", "r2n02"], "r[1-2]n[01-02]"),
        (["r1n1", "r1n2", "r2n1"], "r1n[1-2],r2n1"),
        (["b", "a", "node2", "node1"], "a,b,node[1-2]"),
        (["n1", "n01"], "n[1,01]"),
        (["x1-y2", "x1-y3"], "x1-y[2-3]"),
    ],
)
def test_fold(names: list[str], folded: str) -> None:
    assert fold(names) == folded
    if names:
        assert expand(folded) == natural_sorted(set(names))


# --------------------------------------------------------------------------- properties

_number = st.integers(0, 120).flatmap(
    lambda n: st.sampled_from([str(n), str(n).zfill(3), str(n).zfill(2)])
)
_text = st.text(alphabet="abn.-_", min_size=1, max_size=3)


@st.composite
def node_names(draw: st.DrawFn) -> str:
    """Names of 0-3 numeric fields separated by text, as fleets name nodes."""
    fields = draw(st.integers(0, 3))
    name = draw(st.one_of(st.just(""), _text)) if fields else draw(_text)
    for i in range(fields):
        name += draw(_number)
        if i < fields - 1 or draw(st.booleans()):
            name += draw(_text)
    return name


@st.composite
def range_text(draw: st.DrawFn) -> str:
    lo = draw(st.integers(0, 60))
    hi = draw(st.integers(lo, lo + 40))
    width = draw(st.sampled_from([0, 0, 2, 3]))
    return f"{str(lo).zfill(width)}-{str(hi).zfill(width)}" if hi > lo else str(lo).zfill(width)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    out = draw(_text)
    for _ in range(draw(st.integers(0, 2))):
        items = draw(st.lists(range_text(), min_size=1, max_size=3))
        out += "[" + ",".join(items) + "]" + draw(st.one_of(st.just(""), _text))
    return out


@st.composite
def expressions(draw: st.DrawFn) -> str:
    expr = draw(patterns())
    for _ in range(draw(st.integers(0, 3))):
        expr += draw(st.sampled_from([",", "!", "&", "^", ","])) + draw(patterns())
    return expr


@settings(max_examples=300, deadline=None)
@given(st.lists(node_names(), max_size=40))
def test_fold_then_expand_round_trips(names: list[str]) -> None:
    folded = fold(names)
    assert expand(folded) == natural_sorted(set(names)) if names else folded == ""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions())
def test_expand_fold_expand_round_trips(expr: str) -> None:
    names = expand(expr)
    if names:
        assert expand(fold(names)) == names
    assert len(names) == len(set(names))
    assert names == natural_sorted(names)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet="ab01-[],!&^@:/ \t.#_", max_size=30) | st.text(max_size=20))
def test_garbage_only_raises_nodeset_error(expr: str) -> None:
    try:
        names = expand(expr, resolver)
    except NodeSetError as exc:
        assert exc.code == "bad_nodeset"
    else:
        assert all(isinstance(n, str) and n for n in names)
