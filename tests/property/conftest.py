"""Hypothesis profiles for the property tests (issue 5, bad input).

``POWERQ_HYPOTHESIS_PROFILE`` picks one:

- ``default``: few examples per test, so that every property test together adds well
  under a minute to ``make test``;
- ``chaos``: at least 10,000 examples per test and no deadline, for ``make chaos``.

Neither writes an example database into the tree: a failure prints the seed and the
blob to reproduce it (``@reproduce_failure``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large, HealthCheck.large_base_example]

settings.register_profile(
    "default", max_examples=40, deadline=None, database=None, print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "chaos", max_examples=10_000, deadline=None, database=None, print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.load_profile(os.environ.get("POWERQ_HYPOTHESIS_PROFILE", "default"))


def examples(fraction: float, least: int = 5, chaos_cap: int | None = None) -> int:
    """``fraction`` of the active profile's ``max_examples`` (at least 5): for the tests
    whose examples are slow (a device round trip, a CLI run), in the default profile
    only; under ``chaos`` they keep the full count, or ``chaos_cap`` for tests whose every
    example waits out a protocol's own timeout. At least ``least``."""
    current = settings.default.max_examples
    if current >= 10_000:
        return current if chaos_cap is None else min(current, chaos_cap)
    return max(least, int(current * fraction))
