"""Hypothesis strategies shared by the property tests: odd values as YAML / JSON
documents can hold them, and secrets that are easy to spot in a message."""

from __future__ import annotations

import datetime
import string
from typing import Any

from hypothesis import strategies as st

NAME_CHARS = string.ascii_letters + string.digits + "._-"

names = st.text(NAME_CHARS, min_size=1, max_size=12)
"""Valid node / rack / tag names."""

odd_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\x00", "\n", "é", "ノード", "💥", "a" * 5000, "../../etc",
                     "[1-3]", "@all", "null", "~", "0x10", "1e999", "-1", "  x  ", "\ud800"
                     .encode("utf-8", "surrogatepass").decode("utf-8", "replace")]),
)
"""Strings an operator (or a fuzzer) might type, huge and unicode ones included."""

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    odd_text,
    st.binary(max_size=20),
    st.dates(),
    st.datetimes(timezones=st.just(datetime.UTC)),
)
"""Scalars YAML's safe loader can produce (``!!binary`` gives bytes, dates give dates)."""

values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(odd_text, st.integers(), st.booleans()), inner, max_size=4),
    ),
    max_leaves=12,
)
"""Any value a YAML / JSON document can hold, nested."""

json_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=15,
)
"""Values ``json.dumps`` writes as standard JSON."""

secrets = st.text(string.ascii_letters + string.digits, min_size=6, max_size=16).map(
    lambda s: f"Zk{s}Qx"
)
"""Secret values that cannot appear in a message by chance."""
