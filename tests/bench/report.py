"""The benchmark's tables and ``docs/benchmarks.md``, from the raw results of
:mod:`tests.bench.run` (plain JSON-able data, so a saved ``--json`` file renders again).

Results: ``{"sizes", "reps", "settings", "machine", "versions", "commands", "runs": [run]}``
where a run is ``{"size", "rep", "client", "seconds", "correct", "total", "cpu",
"fleet_cpu", "errors", "error", ...}`` (``seconds`` extrapolated to the whole fleet for a
sampled client; powerq runs add ``job_seconds``, ``submit_seconds``, ``messages``,
``chunks``, ``peak_mb``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CLIENTS: tuple[tuple[str, str], ...] = (
    ("pq_cold", "powerq cold poll, end to end"),
    ("pq_warm", "powerq warm poll, end to end"),
    ("pq_cycle", "powerq batch cycle (off, confirm, on, confirm)"),
    ("ipmipower_f1024", "ipmipower --stat, fan-out 1024"),
    ("ipmipower_x5", "five ipmipower --stat processes"),
    ("pyghmi", "pyghmi, 200 threads, new sessions"),
    ("ipmitool", "ipmitool one process per node, 8 at a time"),
)
LABELS = dict(CLIENTS)
REFERENCES = ("ipmipower_f1024", "ipmipower_x5", "pyghmi", "ipmitool")
POLLS = ("pq_cold", "pq_warm")

Summary = tuple[float, float, float]


def runs_of(results: dict[str, Any], client: str, size: int) -> list[dict[str, Any]]:
    return [r for r in results["runs"] if r["client"] == client and r["size"] == size]


def summary(values: Iterable[float | None]) -> Summary | None:
    """(median, min, max) of the finite values, None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None
    return statistics.median(finite), min(finite), max(finite)


def seconds_of(results: dict[str, Any], client: str, size: int,
               key: str = "seconds") -> Summary | None:
    return summary(r.get(key) for r in runs_of(results, client, size) if not r.get("error"))


def fmt_s(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 10:
        return f"{value:.1f} s"
    return f"{value:.2f} s"


def fmt_summary(s: Summary | None, reps: int, approx: bool = False) -> str:
    if s is None:
        return "—"
    head = ("~" if approx else "") + fmt_s(s[0])
    if reps <= 1 or s[1] == s[2]:
        return head
    return f"{head} ({fmt_s(s[1]).removesuffix(' s')}–{fmt_s(s[2])})"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _sampled(results: dict[str, Any], client: str) -> dict[int, int]:
    """size -> sample size, for the sizes where ``client`` read a sample only."""
    out = {}
    for run in results["runs"]:
        if run["client"] == client and run.get("sample"):
            out[run["size"]] = int(run["sample"])
    return out


def correct_text(results: dict[str, Any], client: str) -> str:
    runs = [r for r in results["runs"] if r["client"] == client]
    if not runs:
        return "—"
    failed = [r for r in runs if r.get("error")]
    short = [r for r in runs if not r.get("error") and r["correct"] < r["total"]]
    sampled = any(r.get("sample") for r in runs)
    if not failed and not short:
        return ("all of the sample" if sampled else "all") + ", every run"
    parts = []
    for size in results["sizes"]:
        mine = [r for r in runs if r["size"] == size]
        bad = [r for r in mine if r.get("error") or r["correct"] < r["total"]]
        if not mine:
            continue
        if not bad:
            parts.append(f"{size:,}: all, every run")
            continue
        worst = min((r for r in mine if not r.get("error")), key=lambda r: r["correct"], default=None)
        text = f"{size:,}: {len(mine) - len(bad)} of {len(mine)} runs all correct"
        if worst is not None:
            text += f"; worst {worst['correct']:,} of {worst['total']:,}"
            errors = worst.get("errors") or {}
            if errors:
                text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) + ")"
        if any(r.get("error") for r in mine):
            text += f"; {sum(1 for r in mine if r.get('error'))} run(s) failed"
        parts.append(text)
    return "; ".join(parts)


# -- tables --------------------------------------------------------------------------------------
def main_table(results: dict[str, Any]) -> str:
    sizes, reps = results["sizes"], results["reps"]
    headers = ["client", *[f"{s:,} BMCs" for s in sizes], "correct"]
    rows = []
    for client, label in CLIENTS:
        if not any(r["client"] == client for r in results["runs"]):
            continue
        sampled = _sampled(results, client)
        if sampled:
            label += " (" + ", ".join(f"{n:,} of {s:,} nodes timed and scaled up" for s, n in sampled.items()) + ")"
        cells = [fmt_summary(seconds_of(results, client, s), reps, approx=s in sampled) for s in sizes]
        rows.append([label, *cells, correct_text(results, client)])
    return table(headers, rows)


def ratio_table(results: dict[str, Any]) -> str:
    """Reference time ÷ powerq time, medians: how many times faster powerq is (< 1: slower)."""
    sizes = results["sizes"]
    headers = ["reference", *[f"{s:,}: ÷ cold / ÷ warm / ÷ warm job" for s in sizes]]
    rows = []
    for ref in REFERENCES:
        if not any(r["client"] == ref for r in results["runs"]):
            continue
        cells = []
        for size in sizes:
            ref_s = seconds_of(results, ref, size)
            parts = []
            for poll, key in (("pq_cold", "seconds"), ("pq_warm", "seconds"), ("pq_warm", "job_seconds")):
                pq = seconds_of(results, poll, size, key)
                parts.append(f"{ref_s[0] / pq[0]:.2f}×" if ref_s and pq and pq[0] > 0 else "—")
            cells.append(" / ".join(parts))
        rows.append([LABELS[ref], *cells])
    return table(headers, rows)


def _median_of(results: dict[str, Any], client: str, size: int, key: str) -> float | None:
    s = seconds_of(results, client, size, key)
    return None if s is None else s[0]


def powerq_table(results: dict[str, Any]) -> str:
    sizes, reps = results["sizes"], results["reps"]
    headers = ["powerq", *[f"{s:,} BMCs" for s in sizes]]

    def row(label: str, cell: Callable[[int], str]) -> list[str]:
        return [label, *[cell(s) for s in sizes]]

    def timed(client: str, key: str) -> Callable[[int], str]:
        return lambda s: fmt_summary(seconds_of(results, client, s, key), reps)

    def messages(client: str) -> Callable[[int], str]:
        def cell(size: int) -> str:
            runs = [r for r in runs_of(results, client, size) if not r.get("error")]
            if not runs:
                return "—"
            pushed = sorted({int(r["messages"]) for r in runs})
            chunks = sorted({int(r["chunks"]) for r in runs})
            return f"{'/'.join(map(str, pushed))} for {'/'.join(map(str, chunks))} chunk(s)"
        return cell

    def peak(size: int) -> str:
        values = [max(r.get("peak_mb") or [0.0]) for r in runs_of(results, "pq_cycle", size)
                  if r.get("peak_mb")]
        s = summary(values)
        if s is None:
            return "—"
        return f"{s[0]:.0f} MB" + (f" ({s[1]:.0f}–{s[2]:.0f})" if reps > 1 and s[1] != s[2] else "")

    def errors(size: int) -> str:
        total: dict[str, int] = {}
        for client in ("pq_cold", "pq_warm", "pq_cycle"):
            for run in runs_of(results, client, size):
                for code, n in (run.get("errors") or {}).items():
                    total[code] = total.get(code, 0) + int(n)
        return ", ".join(f"{k} {v}" for k, v in sorted(total.items())) or "none"

    rows = [
        row("cold poll: end to end (CLI started → CLI printed every result)", timed("pq_cold", "seconds")),
        row("cold poll: job recorded → every state stored", timed("pq_cold", "job_seconds")),
        row("warm poll: end to end", timed("pq_warm", "seconds")),
        row("warm poll: job recorded → every state stored", timed("pq_warm", "job_seconds")),
        row("batch cycle: end to end", timed("pq_cycle", "seconds")),
        row("batch cycle: job recorded → last node confirmed on", timed("pq_cycle", "job_seconds")),
        row("CLI started → job recorded (poll: start, inventory, plan, worker check)",
            timed("pq_cold", "submit_seconds")),
        row("the same CLI with --dry-run, start to exit (start, inventory, plan; nothing sent)",
            timed("pq_cold", "dry_run_seconds")),
        row("CLI process CPU seconds, cold poll", timed("pq_cold", "cli_cpu")),
        row("broker messages pushed to rack queues, cold poll", messages("pq_cold")),
        row("broker messages pushed to rack queues, warm poll", messages("pq_warm")),
        row("worker CPU seconds, cold poll", timed("pq_cold", "cpu")),
        row("worker CPU seconds, warm poll", timed("pq_warm", "cpu")),
        row("worker CPU seconds, batch cycle", timed("pq_cycle", "cpu")),
        row("worker peak memory (largest VmHWM of one worker process)", peak),
        row("node errors over all runs", errors),
    ]
    return table(headers, rows)


def cpu_table(results: dict[str, Any]) -> str:
    """CPU per client and the CPU-bound floor: (client + simulator CPU) ÷ cores."""
    sizes = results["sizes"]
    cores = int(results["machine"].get("cores") or 1)
    headers = ["client", *[f"{s:,}: client CPU / fleet CPU / floor" for s in sizes]]
    rows = []
    for client, label in CLIENTS:
        if not any(r["client"] == client for r in results["runs"]):
            continue
        cells = []
        for size in sizes:
            cpu = _median_of(results, client, size, "cpu")
            fleet = _median_of(results, client, size, "fleet_cpu")
            if cpu is None or fleet is None:
                cells.append("—")
                continue
            cells.append(f"{cpu:.2f} s / {fleet:.2f} s / {(cpu + fleet) / cores:.2f} s")
        rows.append([label, *cells])
    return table(headers, rows)


def targets_table(results: dict[str, Any]) -> tuple[int, str]:
    """The issue's targets, checked at the largest size measured."""
    size = max(results["sizes"])
    cold = seconds_of(results, "pq_cold", size)
    warm = seconds_of(results, "pq_warm", size)
    cycle = seconds_of(results, "pq_cycle", size)
    f1024 = seconds_of(results, "ipmipower_f1024", size)
    pyghmi = seconds_of(results, "pyghmi", size)
    ipmitool = seconds_of(results, "ipmitool", size)

    def med(s: Summary | None) -> float | None:
        return None if s is None else s[0]

    def check(ok: bool | None) -> str:
        return "—" if ok is None else ("met" if ok else "**not met**")

    def both(*parts: bool | None) -> bool | None:
        return None if any(p is None for p in parts) else all(bool(p) for p in parts)

    def le(a: float | None, b: float | None) -> bool | None:
        return None if a is None or b is None else a <= b

    def ratio(a: Summary | None, b: Summary | None) -> float | None:
        return None if a is None or b is None or b[0] <= 0 else a[0] / b[0]

    polls = [r for c in POLLS for r in runs_of(results, c, size)]
    missing = sum(r["total"] - r["correct"] for r in polls) + sum(1 for r in polls if r.get("error"))
    over = [r for r in polls if not r.get("error") and int(r["messages"]) > int(r["chunks"])]
    peak = max((max(r.get("peak_mb") or [0.0]) for r in runs_of(results, "pq_cycle", size)), default=None)
    r_pyghmi, r_f1024, r_tool = ratio(pyghmi, cold), ratio(cold, f1024), ratio(ipmitool, cold)
    rows = [
        ["warm poll end to end ≤ 2 s, faster than ipmipower -F 1024",
         f"{fmt_s(med(warm))} vs ipmipower {fmt_s(med(f1024))}",
         check(both(le(med(warm), 2.0), le(med(warm), med(f1024))))],
        ["cold poll end to end ≤ 6 s", fmt_s(med(cold)), check(le(med(cold), 6.0))],
        ["cold poll ≥ 2.5× faster than pyghmi with threads",
         "—" if r_pyghmi is None else f"{r_pyghmi:.2f}×", check(None if r_pyghmi is None else r_pyghmi >= 2.5)],
        ["cold poll within 2× of ipmipower -F 1024",
         "—" if r_f1024 is None else f"{r_f1024:.2f}× its time", check(None if r_f1024 is None else r_f1024 <= 2.0)],
        ["≥ 50× faster than ipmitool one per node (cold poll)",
         "—" if r_tool is None else f"{r_tool:.1f}×", check(None if r_tool is None else r_tool >= 50)],
        ["0 nodes missing or timed out (every poll run)", f"{missing}", check(missing == 0 if polls else None)],
        ["≤ 1 broker message per rack chunk per poll",
         f"{len(over)} of {len(polls)} polls over", check(not over if polls else None)],
        ["batch cycle ≤ 15 s", fmt_s(med(cycle)), check(le(med(cycle), 15.0))],
        ["worker peak memory ≤ 300 MB", "—" if peak is None else f"{peak:.0f} MB",
         check(None if peak is None else peak <= 300)],
    ]
    return size, table(["target", f"measured at {size:,} BMCs (medians)", ""], rows)


def profile_text(results: dict[str, Any]) -> str:
    """Where powerq's end-to-end time goes at the largest size, and the floors."""
    size = max(results["sizes"])
    cores = int(results["machine"].get("cores") or 1)
    latency = float(results["settings"]["latency"])
    lines = [f"At {size:,} BMCs (medians):", ""]
    rows = []
    for client in ("pq_cold", "pq_warm", "pq_cycle"):
        e2e = _median_of(results, client, size, "seconds")
        submit = _median_of(results, client, size, "submit_seconds")
        job = _median_of(results, client, size, "job_seconds")
        cpu = _median_of(results, client, size, "cpu")
        fleet = _median_of(results, client, size, "fleet_cpu")
        if e2e is None:
            continue
        tail = None if submit is None or job is None else e2e - submit - job
        floor = None if cpu is None or fleet is None else (cpu + fleet) / cores
        rows.append([LABELS[client], fmt_s(e2e), fmt_s(submit), fmt_s(job), fmt_s(tail),
                     "—" if cpu is None else f"{cpu:.2f} s", "—" if fleet is None else f"{fleet:.2f} s",
                     fmt_s(floor)])
    lines.append(table(["", "end to end", "CLI start → job recorded", "job recorded → all stored",
                        "stored → CLI exit", "worker CPU", "simulator CPU", "CPU floor on "
                        f"{cores} cores"], rows))
    dry = _median_of(results, "pq_cold", size, "dry_run_seconds")
    cli = _median_of(results, "pq_cold", size, "cli_cpu")
    if dry is not None:
        lines += ["", f"`powerq query @all --dry-run --json` (start, inventory, plan; no worker asked, "
                  f"nothing sent) takes {fmt_s(dry)} from start to exit; the CLI process of a cold "
                  f"poll uses {fmt_s(cli)} of CPU."]
    lines += [
        "",
        "- *CLI start → job recorded*: the `powerq` process starting (Python; pydantic, redis "
        "and Celery imports are about 0.4 s of it), reading the inventory, planning, and checking "
        "that every rack has a worker (their presence beats in Redis: no broadcast unless a rack "
        f"has none, which would wait `POWERQ_INSPECT_TIMEOUT` = "
        f"{results['settings'].get('inspect_timeout', '?')} s).",
        "- *stored → CLI exit*: the CLI's wait loop noticing the job is done (it polls the job "
        "every 0.05 s) and printing every result as JSON.",
        "- The benchmark compiles powerq's modules to bytecode before it starts (`python -m "
        "compileall`), as an installed package has them; these machines set "
        "`PYTHONDONTWRITEBYTECODE=1`, which would otherwise make every CLI start compile them.",
        f"- Network floor: the BMCs answer after {latency * 1000:g} ms and all of them side by side, "
        "so a read of the whole fleet needs at least one reply latency per round trip "
        f"({latency * 1000:g} ms warm: Get Chassis Status; a new RMCP+ session adds about four: "
        "open session, RAKP 1, RAKP 3, set privilege).",
        "- CPU floor: the simulator runs on the same cores, so (worker CPU + simulator CPU) ÷ "
        "cores bounds how fast any client can be on this machine.",
        "",
        "The batch cycle runs in each chunk's IPMI batch (`workers/fastpath.py`): a node's "
        "five calls (read, off, confirm, on, confirm; five round trips, "
        f"{5 * latency * 1000:g} ms of reply latency) are coroutines on the worker's RMCP+ "
        "client, the journal entries of exactly-once delivery are written a phase at a time, "
        "and the chunk's BMC leases are taken, renewed and released together. Before that "
        "(git 31be3e0, 2026-11-26, the same benchmark on a machine of this kind) each node ran "
        "in a thread of its own and each call was handed to the client's event loop and back: "
        "the cycle of 5,000 BMCs took 19.9–26.5 s with 25–32 s of worker CPU, a fifth of it "
        "thread switching under the GIL and much of the rest Redis round trips made per node "
        "(a journal entry before the off and the on, a lease take and release).",
    ]
    return "\n".join(lines)


def plot_values(results: dict[str, Any]) -> tuple[list[str], dict[tuple[str, int], Summary | None]]:
    labels: list[str] = []
    values: dict[tuple[str, int], Summary | None] = {}
    for client, label in CLIENTS:
        if not any(r["client"] == client for r in results["runs"]):
            continue
        if _sampled(results, client):
            label += " (scaled up from a sample)"
        labels.append(label)
        for size in results["sizes"]:
            values[(label, size)] = seconds_of(results, client, size)
    return labels, values


def write_plot(results: dict[str, Any], path: Path) -> Path:
    from tests.bench.plot import plot_times

    labels, values = plot_values(results)
    settings = results["settings"]
    title = (f"Every simulated IPMI BMC read (the cycle: off, confirm, on, confirm); replies "
             f"after {settings['latency'] * 1000:g} ms; {results['reps']} repetition(s)\n"
             f"{results['machine'].get('cpu', '?')}, {results['machine'].get('cores', '?')} cores, "
             f"{results['started']}")
    return plot_times(labels, results["sizes"], values, path, title=title)


def text_tables(results: dict[str, Any]) -> str:
    """What ``make bench`` prints."""
    size, targets = targets_table(results)
    return "\n\n".join([
        *busy_note(results)[:1],
        main_table(results),
        "powerq ÷ references (reference time ÷ powerq time; above 1: powerq faster)\n" + ratio_table(results),
        powerq_table(results),
        cpu_table(results),
        f"Targets (issue 4), at {size:,} BMCs\n" + targets,
    ])


def busy_note(results: dict[str, Any]) -> list[str]:
    """A warning when other work was running on the machine (load average above its cores)."""
    share = results["machine"].get("other_cpu_share")
    if share is None or share <= 0.10:
        return []
    return [f"**The machine was not quiet**: other work (not the benchmark's processes) used "
            f"{share:.0%} of all CPU time during the run. Every client shared the cores with it; "
            "read the times as upper bounds and the ratios as rough.", ""]


def render_markdown(results: dict[str, Any], png_name: str) -> str:
    """The whole of ``docs/benchmarks.md``."""
    machine, versions, settings = results["machine"], results["versions"], results["settings"]
    size, targets = targets_table(results)
    commands = results["commands"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{results['argv']}` on {results['started']} (`make bench` runs it with "
        "`--sizes 1000,5000 --reps 3`); do not edit by hand, run it again. A benchmark, not a "
        "test: `make test` only runs `tests/test_bench_smoke.py`, which checks that the harness "
        "works at a tiny size.",
        "",
        f"{', '.join(f'{s:,}' for s in results['sizes'])} simulated IPMI BMCs "
        "(`tests/peers/ipmi_bmc.py`: pyghmi's BMC server, every BMC on its own loopback address "
        f"and port 623, {settings['shard_size']} per simulator process), replies delayed "
        f"{settings['latency_how']}; a third of the nodes off. The fleet is split into racks of at "
        f"most {settings['per_rack']:,}; powerq runs {settings['workers']} worker process(es), "
        "each rack served by exactly one. Every client reads the same fleet in the same run, "
        f"{results['reps']} repetition(s) per size: median (min–max). *Correct* compares each "
        "client's answer for every node with the simulated BMC's state (read through its "
        "control API); for powerq, also that the node's state in the store was written by that job.",
        "",
        *busy_note(results),
        f"![time per client for {' and '.join(f'{s:,}' for s in results['sizes'])} BMCs]({png_name})",
        "",
        main_table(results),
        "",
        "- *end to end*: `powerq query @all --wait --json` from the moment the CLI starts until it "
        "has printed every node's result, i.e. job submitted → every node's state in the store → "
        "read back. *Cold*: worker processes just started (no sessions); *warm*: the same again "
        "right after. *Batch cycle*: `powerq cycle @all --yes --force --wait` (off, confirm, on, "
        "confirm; an off node is just powered on).",
        "- ipmipower, ipmitool: the processes' wall time. pyghmi: timed inside its process, first "
        "login to last answer (interpreter start and imports left out).",
    ]
    sampled = _sampled(results, "ipmitool")
    if sampled:
        lines.append("- ipmitool: " + "; ".join(
            f"at {s:,} BMCs, {n:,} nodes spread over the fleet were timed and the time scaled up "
            f"linearly (× {s / n:g})" for s, n in sampled.items())
            + ": one process per node, 8 at a time, takes time in proportion to the nodes.")
    lines += [
        "",
        "## powerq ÷ references",
        "",
        "Reference time ÷ powerq time (medians): above 1, powerq is that many times faster. "
        "*cold*, *warm*: powerq end to end; *warm job*: the warm poll's job alone (recorded → "
        "every state stored), without the CLI's start and worker check.",
        "",
        ratio_table(results),
        "",
        "## powerq in detail",
        "",
        powerq_table(results),
        "",
        "Broker messages are counted exactly: every push onto a `powerq.rack.*` list in the "
        "broker's Redis, seen through Redis keyspace notifications, against the job's chunk count. "
        "Worker CPU is user + system time from `/proc/<pid>/stat` of the worker processes (and "
        "their children) before and after; peak memory is their `VmHWM` from `/proc/<pid>/status` "
        "after the cycle (cold poll, warm poll and cycle all ran in those processes).",
        "",
        f"## Targets (issue 4), at {size:,} BMCs",
        "",
    ]
    if size < 5000:
        lines += [f"The targets are stated for 5,000 BMCs; this run's largest fleet was {size:,}.", ""]
    lines += [
        targets,
        "",
        "## Where powerq's time goes, and the floor of this machine",
        "",
        profile_text(results),
        "",
        "CPU seconds per client (medians) and the CPU-bound floor:",
        "",
        cpu_table(results),
        "",
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu')}, {machine.get('cores')} cores; memory {machine.get('memory')}",
        f"- Linux {machine.get('kernel')}; load average at the start {machine.get('load_start')}, "
        f"at the end {machine.get('load_end')}"
        + ("" if machine.get("other_cpu_share") is None else
           f"; other work used {float(machine['other_cpu_share']):.0%} of all CPU time during the "
           "run (all processes' CPU from /proc/stat minus the benchmark's own)"),
        "",
        "## Versions",
        "",
        *[f"- {name}: {value}" for name, value in versions.items()],
        "",
        "## Commands",
        "",
        f"- The harness: `{results['argv']}` (`make bench` = `python -m tests.bench.run "
        "--sizes 1000,5000 --reps 3`).",
        f"- powerq environment: {settings['env']}",
        *[f"- {LABELS.get(k, k)}: `{v}`" for k, v in commands.items()],
        "",
    ]
    return "\n".join(lines)
