"""``make bench``: powerq against FreeIPMI, pyghmi and ipmitool on one simulated IPMI fleet.

- :mod:`tests.bench.stack` — the simulated fleet (``tests/peers/ipmi_bmc.py``) split into
  racks, and a powerq stack of its own (Redis, worker processes, the CLI) with the
  measuring points: worker CPU and peak memory from ``/proc``, messages pushed to the
  rack queues (Redis keyspace notifications), states in the store against the peer's.
- :mod:`tests.bench.references` — the reference clients on the same fleet.
- :mod:`tests.bench.report` — median / range, the tables, ``docs/benchmarks.md``;
  :mod:`tests.bench.plot` — ``docs/benchmarks.png``.
- :mod:`tests.bench.run` — ``python -m tests.bench.run [--sizes 1000,5000] [--reps 3]``
  (``make bench``); ``--render RESULTS.json`` draws a saved run again.

A benchmark, not a test: ``tests/test_bench_smoke.py`` runs it at a tiny size and checks
that it works, never how fast.
"""
