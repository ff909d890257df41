"""``make bench`` at a tiny size: the harness works end to end (every client's row, every
node read correctly, the markdown and the plot written). It checks behaviour, never speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import report
from tests.bench.references import hostlist
from tests.conftest import ROOT

NODES = 60
SAMPLE = 16
FIRST = "127.58.0.200"  # the fleet crosses a /24: ipmipower gets a hostlist of two parts


def test_hostlist_folds_addresses_the_way_freeipmi_reads_them() -> None:
    assert hostlist(["127.50.0.1", "127.50.0.2", "127.50.0.3"]) == "127.50.0.[1-3]"
    whole = [f"127.50.{c}.{d}" for c in range(3) for d in range(1, 255)] + ["127.50.3.1", "127.50.3.2"]
    assert hostlist(whole) == "127.50.[0-2].[1-254],127.50.3.[1-2]"
    assert hostlist(["127.50.0.7", "127.50.0.9", "127.50.1.7"]) == "127.50.0.[7,9],127.50.1.7"


def test_summary_is_median_and_range() -> None:
    assert report.summary([3.0, 1.0, 2.0, None, float("nan")]) == (2.0, 1.0, 3.0)
    assert report.summary([None]) is None


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_bench_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    raw = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench.run", "--sizes", str(NODES), "--reps", "1",
         "--ipmitool-sample", str(SAMPLE), "--first-address", FIRST, "--out", str(out),
         "--json", str(raw)],
        cwd=ROOT, capture_output=True, text=True, timeout=220,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads(raw.read_text())

    by_client = {r["client"]: r for r in results["runs"]}
    assert set(by_client) == {key for key, _ in report.CLIENTS}, sorted(by_client)
    assert len(results["runs"]) == len(report.CLIENTS)  # one repetition: one run each
    for client, run_ in by_client.items():
        assert run_["error"] is None, (client, run_["error"], run.stderr[-3000:])
        assert run_["correct"] == run_["total"], (client, run_)
        assert run_["seconds"] > 0 and run_["cpu"] is not None, (client, run_)
    assert by_client["ipmitool"]["total"] == SAMPLE and by_client["ipmitool"]["sample"] == SAMPLE
    assert by_client["ipmitool"]["seconds"] > by_client["ipmitool"]["measured_seconds"]  # scaled up
    for client in ("ipmipower_f1024", "ipmipower_x5", "pyghmi", "pq_cold", "pq_warm", "pq_cycle"):
        assert by_client[client]["total"] == NODES
    for client in ("pq_cold", "pq_warm"):
        poll = by_client[client]
        assert poll["chunks"] >= 2 and poll["messages"] >= 1, poll  # two racks; pushes are seen
        assert 0 < poll["job_seconds"] < poll["seconds"], poll
    peak = by_client["pq_cycle"]["peak_mb"]
    assert len(peak) == 2 and all(mb > 10 for mb in peak), peak  # two worker processes read

    text = (out / "benchmarks.md").read_text()
    for _, label in report.CLIENTS:
        assert f"| {label}" in text, label
    for heading in ("## Machine", "## Versions", "## Commands", "## Targets"):
        assert heading in text
    assert "![time per client" in text and "(benchmarks.png)" in text
    assert "bench-ipmi-pass" not in text and "bench-ipmi-pass" not in run.stdout + run.stderr
    assert f"| {report.LABELS['pq_cold']} |" in run.stdout  # the table is printed too

    from matplotlib.image import imread

    image = imread(out / "benchmarks.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
