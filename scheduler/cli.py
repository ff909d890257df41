"""The ``powerq`` command.

Exit codes: 0 success; 1 the job ran and some node failed (or a wait timed out);
2 the request was refused (bad input, unknown nodes, no worker) and nothing was queued.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from drivers import registry
from drivers.errors import PowerError

from .config import Config
from .nodeset import fold
from .planner import (
    ConfirmationRequired,
    Plan,
    PlanError,
    check_blast_radius,
    make_plan,
    plan_to_dict,
    submit,
)
from .store import Store

EXIT_FAILED = 1
EXIT_REFUSED = 2


# -- helpers --------------------------------------------------------------------------------
class Ctx:
    def __init__(self) -> None:
        self._config: Config | None = None
        self._store: Store | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = Config.from_env()
        return self._config

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.from_config(self.config)
        return self._store

    def inventory(self) -> Any:
        from .inventory import InventoryStore
        from .secrets import SecretBox

        return InventoryStore(self.store.client, self.config.key_prefix, SecretBox.from_config(self.config))


def fail(exc: PowerError, as_json: bool) -> None:
    """Print a structured error and exit 2 (refused: nothing was done)."""
    if as_json:
        body: dict[str, Any] = {"error": {"code": exc.code, "message": exc.message}}
        if exc.details.get("problems"):
            body["error"]["problems"] = exc.details["problems"]
        click.echo(json.dumps(body, indent=2))
    else:
        problems = exc.details.get("problems", [])
        head = exc.message.splitlines()[0] if problems else exc.message
        click.echo(f"error [{exc.code}]: {head}", err=True)
        for problem in problems[:50]:
            if not isinstance(problem, dict):  # a driver's settings problems are plain text
                click.echo(f"  {problem}", err=True)
                continue
            where = problem.get("node") or problem.get("rack") or ""
            field = f" {problem['field']}" if problem.get("field") else ""
            click.echo(f"  {where}{field}: {problem.get('reason', '')}", err=True)
        if len(problems) > 50:
            click.echo(f"  ... and {len(problems) - 50} more (--json for all)", err=True)
    sys.exit(EXIT_REFUSED)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every taxonomy error (and a dead Redis) into a clear message and exit 2."""
    import functools

    import redis

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except PowerError as exc:
            fail(exc, as_json)
        except redis.exceptions.AuthenticationError:
            fail(PowerError("Redis refused the credentials: check the password in POWERQ_REDIS_URL"),
                 as_json)
        except redis.exceptions.ConnectionError:
            fail(PowerError("cannot reach Redis: check POWERQ_REDIS_URL"), as_json)

    return wrapper


def parse_duration(text: str) -> float:
    """Seconds from ``60s``, ``5m``, ``1h``…; a bad value is a usage error."""
    from .budget import parse_duration as parse

    try:
        return parse(text, "--every")
    except PowerError as exc:
        raise click.BadParameter(exc.message) from None


def who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli:unknown"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


# -- the command group ---------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """powerq: power a fleet on, off and through a cycle through per-rack workers."""
    ctx.obj = Ctx()


# -- power actions -------------------------------------------------------------------------
def _power_command(action: str, help_text: str, extra: list[Callable[..., Any]] | None = None) -> None:
    def command(ctx: click.Context, nodeset: str, wait: bool, as_json: bool, dry_run: bool,
                yes: bool, timeout: float | None, **options: Any) -> None:
        _audited_run_action(ctx.obj, action, nodeset, wait=wait, as_json=as_json, dry_run=dry_run,
                            yes=yes, timeout=timeout, options=options)

    command.__doc__ = help_text
    decorated: Any = guarded(command)
    for option in reversed(extra or []):
        decorated = option(decorated)
    decorated = click.option("--timeout", type=float, default=None,
                             help="With --wait: give up waiting after this many seconds")(decorated)
    decorated = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation")(decorated)
    decorated = click.option("--dry-run", is_flag=True, help="Print the plan and send nothing")(decorated)
    decorated = click.option("--json", "as_json", is_flag=True, help="Machine-readable output")(decorated)
    decorated = click.option("--wait", "-w", is_flag=True, help="Show progress, then per-node results")(decorated)
    decorated = click.argument("nodeset")(decorated)
    decorated = click.pass_context(decorated)
    main.command(name=action)(decorated)


_soft = click.option("--soft", is_flag=True, default=None, help="Graceful (ACPI) power off")
_force = click.option("--force", is_flag=True, default=False,
                      help="Allow more nodes / racks than the configured maximum (POWERQ_MAX_NODES, POWERQ_MAX_RACKS)")
_plot = click.option("--plot", type=click.Path(dir_okay=False), default=None,
                     help="With --dry-run: save the power-on timeline as a PNG")
_power_command("on", "Power NODESET on, staggered within the power budgets (nodes already on are left alone).",
               [_plot])
_power_command("off", "Power NODESET off (hard unless --soft or power_off_mode=soft).", [_soft, _force])
_power_command("cycle", "Power NODESET off then on, the power-ons within the budgets (an off node is just powered on).",
               [_soft, _force, _plot])
_power_command("query", "Read the power state of NODESET.")
_power_command(
    "enlist",
    "Create a BMC account of powerq's own on NODESET's BMCs (ipmi, redfish), with a random "
    "password, check it works and use it from then on instead of the inventory's credentials.",
    [click.option("--username", default=None, help="BMC user name (default: powerq)")],
)
_power_command(
    "boot",
    "Set the next boot device of NODESET.",
    [
        click.option("--device", type=click.Choice(["pxe", "disk", "cdrom", "bios"]), default="pxe",
                     show_default=True, help="Next boot device"),
        click.option("--efi", is_flag=True, default=False, help="Boot in EFI mode"),
        click.option("--persistent", is_flag=True, default=False, help="Every boot, not just the next"),
    ],
)


def _run_action(obj: Ctx, action: str, nodeset: str, *, wait: bool, as_json: bool, dry_run: bool,
                yes: bool, timeout: float | None, options: dict[str, Any]) -> None:
    force = bool(options.pop("force", False))
    plot = options.pop("plot", None)
    options = {k: v for k, v in options.items() if v is not None}
    if action == "enlist":
        options = {k: v for k, v in options.items() if k == "username"}
    elif action != "boot":
        options = {k: v for k, v in options.items() if k == "soft" and v}
    if plot and not dry_run:
        raise PlanError("--plot goes with --dry-run: it draws the plan, it does not run it")
    config = obj.config
    inventory = obj.inventory()
    index = inventory.node_index()
    if not index:
        raise PlanError("the inventory is empty: load one with `powerq inventory load FILE`")
    plan = make_plan(action, nodeset, index, chunk_size=config.chunk_size, options=options,
                     budgets=inventory.budgets())
    if dry_run:
        _print_plan(plan, as_json, plot)
        return
    try:
        check_blast_radius(plan, config, yes=yes, force=force)
    except ConfirmationRequired:
        if as_json or not sys.stdin.isatty():
            raise
        click.confirm(
            f"{action} {len(plan.nodes)} nodes in {len(plan.racks)} rack(s) ({fold(plan.nodes)})?",
            abort=True,
        )

    from workers.dispatch import app_for, racks_without_worker, send_plan

    app = app_for(config)

    def missing(racks: Any) -> list[str]:
        return racks_without_worker(app, racks, config.inspect_timeout, obj.store.client,
                                    config.key_prefix)

    def send(job_id: str, p: Plan) -> int:
        return send_plan(app, job_id, p)

    job_id = submit(plan, obj.store, racks_without_worker=missing, send=send, requested_by=who(),
                    lead=config.release_lead,
                    max_chunk_seconds=config.visibility_timeout - config.task_time_limit)
    if not wait:
        if as_json:
            click.echo(json.dumps({"job": job_id, "nodes": len(plan.nodes), "queued": True}))
        else:
            click.echo(f"job {job_id}: {action} {len(plan.nodes)} node(s) queued "
                       f"({len(plan.chunks)} message(s)); `powerq job show {job_id}`")
        return
    finished = _wait(obj.store, job_id, len(plan.nodes), timeout, show=not as_json)
    job = obj.store.job(job_id) or {}
    results = obj.store.results(job_id)
    if as_json:
        click.echo(_json_out({"job": job, "results": list(results.values())}))
    else:
        _print_results(job, results)
    if not finished:
        click.echo(f"gave up waiting after {timeout:g} s; the job goes on", err=True)
        sys.exit(EXIT_FAILED)
    if job.get("error"):
        sys.exit(EXIT_FAILED)


def _json_out(body: Any) -> str:
    """A job's results as JSON: indented on a terminal; one line for a pipe or a file (a
    program reading it), which json's C encoder writes many times faster at fleet scale."""
    return json.dumps(body, indent=2) if sys.stdout.isatty() else json.dumps(body)


def _audited_run_action(obj: Ctx, action: str, nodeset: str, **kwargs: Any) -> None:
    """``_run_action`` with its refusals (bad input, confirmation declined or required,
    no worker) recorded in the audit stream; a dry run is not a request."""
    try:
        _run_action(obj, action, nodeset, **kwargs)
    except (PowerError, click.exceptions.Abort) as exc:
        if not kwargs.get("dry_run"):
            from .audit import record_refusal

            code = "not_confirmed" if isinstance(exc, click.exceptions.Abort) else None
            try:
                record_refusal(obj.store, who(), exc, action=action, nodeset=nodeset, code=code)
            except Exception:  # no store (Redis unreachable): the refusal itself is reported
                pass
        raise


def _wait(store: Store, job_id: str, total: int, timeout: float | None, show: bool) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    done = 0
    bar_ctx = click.progressbar(length=total, label="nodes", show_pos=True, file=sys.stderr) if show else None
    bar = bar_ctx.__enter__() if bar_ctx else None
    try:
        while True:
            job = store.job(job_id) or {}
            now_done = int(job.get("done", 0))
            if bar is not None and now_done > done:
                bar.update(now_done - done)
            done = now_done
            if job.get("status") in ("done", "failed") and done >= total:
                return True
            if job.get("status") == "cancelled":
                return True
            if job.get("status") == "failed":
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    finally:
        if bar_ctx is not None:
            bar_ctx.__exit__(None, None, None)


def _print_plan(plan: Plan, as_json: bool, plot: str | None = None) -> None:
    data = plan_to_dict(plan)
    if plot:
        if plan.timeline is None:
            raise PlanError(
                f"nothing to plot: {plan.action} has no power-on timeline"
                + ("" if plan.action in ("on", "cycle") else " (only on and cycle do)")
                + ("; the inventory sets no power budgets" if plan.action in ("on", "cycle") else "")
            )
        from .budget import plot_timeline

        data["plot"] = str(plot_timeline(plan.timeline, None, plot))
    if as_json:
        click.echo(json.dumps({"dry_run": True, "plan": data}, indent=2))
        return
    opts = " ".join(f"{k}={v}" for k, v in plan.options.items())
    click.echo(f"dry run: {plan.action} {len(plan.nodes)} node(s) {opts}".rstrip() + "; nothing sent")
    click.echo(table([[q["queue"], str(q["count"]), q["nodes"]] for q in data["queues"]],
                     ["queue", "nodes", "node set"]))
    if plan.timeline is not None:
        from .budget import render_timeline

        click.echo("")
        click.echo(render_timeline(plan.timeline))
    if plot:
        click.echo(f"timeline plot: {data['plot']}")


def _print_results(job: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    rows = []
    failures = [r for r in results.values() if r.get("outcome") == "error"]
    shown = list(results.values()) if len(results) <= 200 else failures
    for r in shown:
        err = r.get("error") or {}
        took = (r.get("finished") or 0) - (r.get("started") or 0)
        rows.append([
            r["node"], r.get("outcome", ""), r.get("state_before") or "-", r.get("state_after") or "-",
            str(r.get("attempts", 0)), f"{took:.2f}s", err.get("code") or r.get("note") or "",
            err.get("message", ""),
        ])
    if rows:
        click.echo(table(rows, ["node", "outcome", "before", "after", "tries", "took", "code/note", "message"]))
    if len(results) > 200:
        click.echo(f"({len(results) - len(shown)} successful nodes not listed; --json for all)")
    took = (job.get("finished") or time.time()) - (job.get("created") or time.time())
    click.echo(
        f"job {job.get('id')}: {job.get('action')} {job.get('total')} node(s): "
        f"{job.get('ok')} ok, {job.get('error')} failed, {job.get('skipped')} skipped in {took:.1f}s"
    )


# -- jobs and status -----------------------------------------------------------------------
@main.group()
def job() -> None:
    """Jobs: one operator request each."""


@job.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def job_show(obj: Ctx, job_id: str, as_json: bool) -> None:
    """Show a job's summary and per-node results."""
    record = obj.store.job(job_id)
    if record is None:
        raise PlanError(f"no job {job_id!r} (jobs expire after {obj.config.result_ttl} s)")
    results = obj.store.results(job_id)
    if as_json:
        click.echo(_json_out({"job": record, "results": list(results.values())}))
        return
    click.echo(f"job {record['id']}: {record['action']} {record['nodeset']} by {record['requested_by']}, "
               f"status {record['status']}, {record['done']}/{record['total']} done")
    _print_results(record, results)


@job.command("cancel")
@click.argument("job_id")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the workers have stopped releasing the job's nodes")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait at most")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def job_cancel(obj: Ctx, job_id: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Stop releasing a job's nodes and report what already ran.

    Nodes whose power action was already sent finish (a cycle that powered a node off
    always powers it back on); every node not yet started is skipped with note
    ``cancelled``."""
    record = obj.store.cancel(job_id, who())
    if record is None:
        raise PlanError(f"no job {job_id!r} (jobs expire after {obj.config.result_ttl} s)")
    if wait and record.get("status") not in ("done", "failed", "cancelled"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = obj.store.job(job_id) or record
            if record.get("status") in ("done", "failed", "cancelled"):
                break
            time.sleep(0.2)
    results = obj.store.results(job_id)
    acted = sorted(n for n, r in results.items() if r.get("outcome") != "skipped" or r.get("note") != "cancelled")
    stopped = sorted(n for n, r in results.items() if r.get("outcome") == "skipped" and r.get("note") == "cancelled")
    if as_json:
        click.echo(json.dumps({"job": record, "ran": acted, "cancelled": stopped,
                               "results": list(results.values())}, indent=2))
        return
    click.echo(f"job {job_id}: {record.get('status')}; {len(acted)} node(s) ran"
               + (f" ({fold(acted)})" if acted else "")
               + f", {len(stopped)} not started" + (f" ({fold(stopped)})" if stopped else ""))
    pending = int(record.get("total", 0)) - len(results)
    if pending > 0:
        click.echo(f"{pending} node(s) not yet reported: `powerq job show {job_id}` later")


@job.command("list")
@click.option("--count", default=20, show_default=True)
@click.pass_obj
@guarded
def job_list(obj: Ctx, count: int) -> None:
    """List recent jobs."""
    rows = []
    for job_id in obj.store.recent_jobs(count):
        j = obj.store.job(job_id)
        if j:
            rows.append([j["id"], j["action"], j["nodeset"], j["status"], f"{j['done']}/{j['total']}",
                         str(j["error"]), j["requested_by"]])
    click.echo(table(rows, ["job", "action", "node set", "status", "done", "failed", "by"]))


@main.command()
@click.argument("nodeset", required=False, default="@all")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def status(obj: Ctx, nodeset: str, as_json: bool) -> None:
    """Latest known power state of NODESET (default: every node), its age and last error."""
    from .nodeset import expand
    from .planner import resolver_for

    index = obj.inventory().node_index()
    names = [n for n in expand(nodeset, resolver_for(index)) if n in index] if index else []
    states = obj.store.states(names)
    now = time.time()
    parked_bmcs, parked_by_node = _parked_view(obj, names, now)  # parking (issue 5)
    rows, data = [], []
    summary: dict[str, int] = {}
    for name in names:
        entry = index[name]
        st = states.get(name, {})
        state = st.get("state") or "never read"
        summary[state] = summary.get(state, 0) + 1
        err = st.get("error") or {}
        at = st.get("at")
        item = {"node": name, "rack": _field(entry, "rack", 0), "power_type": _field(entry, "power_type", 1),
                "state": st.get("state"), "age": None if at is None else round(now - at, 1),
                "job": st.get("job"), "error": err or None}
        if parked_bmcs:  # parking (issue 5)
            item["parked"] = parked_by_node.get(name)
            if item["parked"]:
                err = {"code": "parked", "message": _parked_text(item["parked"])}
        data.append(item)
        rows.append([name, item["rack"], item["power_type"], state, age(item["age"]),
                     err.get("code", ""), err.get("message", "")])
    # Fleet freshness (issue 4): how old the known states are, over the nodes that have one.
    ages = _age_percentiles([i["age"] for i in data if i["age"] is not None])
    never = sum(1 for i in data if i["age"] is None)
    if as_json:
        body: dict[str, Any] = {"nodes": data, "summary": summary,
                                "state_age": {"percentiles": ages, "never_read": never}}
        if parked_bmcs:  # parking (issue 5)
            body["parked"] = parked_bmcs
        click.echo(json.dumps(body, indent=2))
        return
    click.echo(table(rows, ["node", "rack", "type", "state", "age", "last error", "message"]))
    click.echo(", ".join(f"{v} {k}" for k, v in sorted(summary.items())) + f" ({len(names)} nodes)")
    if ages:
        click.echo("state age: " + ", ".join(f"{k} {age(v)}" for k, v in ages.items())
                   + (f"; {never} node(s) never read" if never else ""))
    if parked_bmcs:  # parking (issue 5)
        behind = sum(1 for n in names if parked_by_node.get(n))
        click.echo(f"{len(parked_bmcs)} BMC(s) parked, {behind} of these nodes behind them: "
                   + "; ".join(_parked_text(p) for p in parked_bmcs[:5])
                   + ("; ..." if len(parked_bmcs) > 5 else "")
                   + " (`powerq unpark BMC|NODESET` releases early)")


def _age_percentiles(ages: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / max of state ages (seconds), as ``powerq_state_age_seconds``."""
    from .metrics import percentiles

    named = {"0.5": "p50", "0.9": "p90", "0.99": "p99", "1": "max"}
    return {named[q]: round(v, 1) for q, v in percentiles(ages, tuple(named)).items()}


def _field(entry: Any, name: str, pos: int) -> Any:
    from .planner import _entry_field

    return _entry_field(entry, name, pos)


# -- inventory -----------------------------------------------------------------------------
@main.group()
def inventory() -> None:
    """The inventory: nodes, racks, power types and parameters."""


@inventory.command("load")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--secrets", "secrets_path", type=click.Path(dir_okay=False), default=None,
              help="YAML file of secrets referenced as {file: key}")
@click.option("--check", is_flag=True, help="Validate only; store nothing")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def inventory_load(obj: Ctx, path: str, secrets_path: str | None, check: bool, as_json: bool) -> None:
    """Validate every node of PATH and store the inventory (nothing is stored if any node is invalid)."""
    from .inventory import load_inventory

    inv = load_inventory(path, secrets_path=secrets_path)
    if not check:
        obj.inventory().save(inv)
    racks: dict[str, int] = {}
    types: dict[str, int] = {}
    for node in inv.nodes.values():
        racks[node.rack] = racks.get(node.rack, 0) + 1
        types[node.power_type] = types.get(node.power_type, 0) + 1
    if as_json:
        click.echo(json.dumps({"nodes": len(inv.nodes), "racks": racks, "power_types": types,
                               "stored": not check}))
        return
    verb = "valid" if check else "loaded"
    click.echo(f"{verb}: {len(inv.nodes)} nodes in {len(racks)} rack(s): "
               + ", ".join(f"{r} {n}" for r, n in sorted(racks.items()))
               + "; power types: " + ", ".join(f"{t} {n}" for t, n in sorted(types.items())))


@inventory.command("forget-enlisted")
@click.argument("nodeset")
@click.pass_obj
@guarded
def inventory_forget_enlisted(obj: Ctx, nodeset: str) -> None:
    """Drop the BMC credentials `powerq enlist` stored for NODESET: the inventory's apply again
    (the accounts stay on the BMCs)."""
    from .nodeset import expand

    store = obj.inventory()
    names = expand(nodeset, store.resolver())
    dropped = store.forget_enlisted(names)
    click.echo(f"{dropped} node(s) back on the inventory's credentials")


@inventory.command("show")
@click.argument("nodeset", required=False, default="@all")
@click.pass_obj
@guarded
def inventory_show(obj: Ctx, nodeset: str) -> None:
    """Show stored nodes with their parameters (secrets masked)."""
    from .nodeset import expand
    from .planner import resolver_for

    inv = obj.inventory()
    index = inv.node_index()
    for name in [n for n in expand(nodeset, resolver_for(index)) if n in index]:
        click.echo(json.dumps(inv.public_view(name), sort_keys=True))


# -- processes -----------------------------------------------------------------------------
@main.command()
@click.option("--rack", "racks", multiple=True, required=True, help="Rack whose queue to consume (repeatable)")
@click.option("--concurrency", type=click.IntRange(min=1), default=None,
              help="Chunks run at once (default: 2, or 2 per rack served). A power-on timeline "
                   "keeps one chunk per rack running for its whole length")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", default=None, help="Worker name (default rack-<rack>@<host>)")
@click.pass_obj
def worker(obj: Ctx, racks: tuple[str, ...], concurrency: int | None, loglevel: str,
           hostname: str | None) -> None:
    """Run a worker for one or more racks' queues."""
    bad = [r for r in racks if not re.fullmatch(r"[A-Za-z0-9._-]+", r)]
    if bad:
        fail(PlanError(f"bad rack name(s): {', '.join(bad)}"), False)
    from workers.dispatch import run_worker

    from .logs import setup_logging

    setup_logging(obj.config.log_format, loglevel)  # before Celery's first line (issue 7)
    run_worker(obj.config, list(racks), concurrency=concurrency or max(2, 2 * len(set(racks))),
               loglevel=loglevel, hostname=hostname)


@main.command()
@click.option("--every", default="60s", show_default=True, help="Poll interval (e.g. 60s, 5m)")
@click.option("--loglevel", default="INFO", show_default=True)
@click.pass_obj
def poll(obj: Ctx, every: str, loglevel: str) -> None:
    """Poll the whole fleet's power state every interval, spread across it (Celery beat)."""
    from workers.beat import run_beat

    from .logs import setup_logging

    setup_logging(obj.config.log_format, loglevel)  # before Celery's first line (issue 7)
    run_beat(obj.config, parse_duration(every), loglevel=loglevel)


@main.command()
@click.pass_obj
def flower(obj: Ctx) -> None:
    """Run Flower for the powerq workers, with basic auth, bound to 127.0.0.1 by default."""
    import secrets as pysecrets

    config = obj.config
    auth = config.flower_basic_auth
    if not auth:
        # Generated once and kept in a 0600 file beside the Fernet key: never printed, as
        # this command's output usually ends up in a journal or a log file.
        path = Path(os.path.expanduser(config.secret_key_file)).with_name("flower.auth")
        if path.is_file():
            auth = path.read_text().strip()
        if not auth or ":" not in auth:
            auth = f"admin:{pysecrets.token_urlsafe(12)}"
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(auth + "\n")
        click.echo(f"Flower credentials (user:password): in {path}")
    click.echo(f"Flower on http://{config.flower_address}:{config.flower_port}/")
    # Credentials and the broker URL travel in the environment, not in argv (ps shows argv).
    env = dict(os.environ, FLOWER_BASIC_AUTH=auth, FLOWER_UNAUTHENTICATED_API="false")
    os.execvpe(sys.executable, [
        sys.executable, "-m", "celery", "-A", "workers.app", "flower",
        f"--address={config.flower_address}", f"--port={config.flower_port}",
    ], env)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def workers(obj: Ctx, as_json: bool) -> None:
    """Which workers consume which rack queues right now."""
    from workers.dispatch import app_for, consumed_queues

    queues = consumed_queues(app_for(obj.config), obj.config.inspect_timeout)
    racks = {q: w for q, w in sorted(queues.items()) if q.startswith("powerq.rack.")}
    if as_json:
        click.echo(json.dumps(racks, indent=2))
        return
    click.echo(table([[q, ", ".join(w)] for q, w in racks.items()], ["queue", "workers"]))


@main.command()
@click.argument("action", required=False, type=click.Choice(["up", "down", "status"]))
@click.option("--dir", "workdir", default=".demo/sim", show_default=True, type=click.Path(file_okay=False))
@click.option("--racks", type=click.IntRange(min=1), default=None,
              help="Racks x mix layout: number of racks  [default: 3]")
@click.option("--mix", default=None,
              help="Racks x mix layout: nodes per rack of each simulated power type  "
                   "[default: ipmi=20,redfish=10,virsh=10]")
@click.option("--ipmi", type=click.IntRange(min=0), default=None,
              help="Fleet at scale: IPMI BMCs in all (e.g. 5000), each on its own address, port 623")
@click.option("--redfish", type=click.IntRange(min=0), default=None, help="Fleet at scale: Redfish systems in all")
@click.option("--virsh", type=click.IntRange(min=0), default=None, help="Fleet at scale: libvirt domains in all")
@click.option("--rack-size", type=click.IntRange(min=1), default=500, show_default=True,
              help="Fleet at scale: nodes per rack (each power type fills racks of its own)")
@click.option("--ipmi-base", default="127.100.0.1", show_default=True, help="Fleet at scale: first IPMI address")
@click.option("--redfish-base", default="127.110.0.1", show_default=True,
              help="Fleet at scale: first Redfish address")
@click.option("--ipmi-shards", type=click.IntRange(min=1), default=None,
              help="Fleet at scale: IPMI simulator processes (default: one per 1,700 BMCs, at most 4)")
@click.option("--latency", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Seconds every IPMI and Redfish reply waits (on a timer: never holds up another BMC)")
@click.option("--jitter", type=click.FloatRange(min=0), default=None,
              help="Replies wait --latency plus or minus up to this many seconds  [default: latency / 5]")
@click.option("--initial", default="mixed", show_default=True, type=click.Choice(["on", "off", "mixed"]),
              help="Power state the simulated nodes start in")
@click.option("--foreground", is_flag=True, help="up: run in this process until Ctrl-C, as without `up`")
@click.option("--timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="up: seconds to wait for the fleet to start; down: for it to stop")
def sim(action: str | None, workdir: str, racks: int | None, mix: str | None, ipmi: int | None,
        redfish: int | None, virsh: int | None, rack_size: int, ipmi_base: str, redfish_base: str,
        ipmi_shards: int | None, latency: float, jitter: float | None, initial: str, foreground: bool,
        timeout: float) -> None:
    """Run a simulated fleet (real protocol peers) and write DIR/inventory.yaml (+ secrets.yaml).

    \b
    powerq sim [--racks 3 --mix ipmi=20,redfish=10,virsh=10]   in the foreground, until Ctrl-C
    powerq sim up --ipmi 5000 --redfish 500 [--rack-size 500]  in the background; state in DIR/fleet.json
    powerq sim status                                         is it running, what it serves
    powerq sim down                                           stop it and every peer process
    """
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "tests" / "peers").is_dir():
        fail(PlanError("powerq sim needs a source checkout (tests/peers is missing)"), False)
    sys.path.insert(0, str(root))
    from tests.peers import fleet

    where = Path(workdir)
    if action == "down":
        sys.exit(fleet.down(where, timeout=timeout))
    if action == "status":
        state = fleet.running(where.resolve())
        if state is None:
            click.echo(f"no simulated fleet runs in {where.resolve()}")
            sys.exit(EXIT_FAILED)
        types = ", ".join(f"{k} {v}" for k, v in state["types"].items())
        click.echo(f"running (pid {state['pid']}, {len(state['pids'])} peer processes): {state['nodes']} nodes "
                   f"({types}) in {len(state['rack_sizes'])} racks, latency {state['latency'] * 1000:g} ms "
                   f"± {state['jitter'] * 1000:g} ms; inventory {state['inventory']}")
        return
    scale = any(n is not None for n in (ipmi, redfish, virsh))
    if scale and (racks is not None or mix is not None):
        fail(PlanError("use either --racks/--mix or --ipmi/--redfish/--virsh, not both"), False)
    if scale and not (ipmi or redfish or virsh):
        fail(PlanError("the fleet needs at least one node"), False)
    jitter = latency / 5 if jitter is None else jitter
    argv = ["--latency", str(latency), "--jitter", str(jitter), "--initial", initial]
    if scale:
        argv += ["--ipmi", str(ipmi or 0), "--redfish", str(redfish or 0), "--virsh", str(virsh or 0),
                 "--rack-size", str(rack_size), "--ipmi-base", ipmi_base, "--redfish-base", redfish_base]
        if ipmi_shards is not None:
            argv += ["--ipmi-shards", str(ipmi_shards)]
    else:
        argv += ["--racks", str(racks or 3), "--mix", mix or "ipmi=20,redfish=10,virsh=10"]
    if action == "up" and not foreground:
        sys.exit(fleet.up(argv, where, timeout=timeout))
    sys.exit(fleet.main(["--dir", workdir, *argv]))


# -- information ---------------------------------------------------------------------------
@main.command("probe")
@click.argument("power_type")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="A chassis parameter (MAAS name), repeatable: -p power_address=10.0.0.5 -p power_user=admin")
@click.option("--rack", default="unassigned", show_default=True, help="Rack of the nodes written")
@click.option("--prefix", default="", help="Prefix of the node names written")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write the inventory entries to this YAML file (secrets into <name>.secrets.yaml, 0600)")
@click.option("--timeout", type=float, default=None, help="Seconds per device call (default POWERQ_CALL_TIMEOUT)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def probe_cmd(obj: Ctx, power_type: str, params: tuple[str, ...], rack: str, prefix: str,
              out_path: str | None, timeout: float | None, as_json: bool) -> None:
    """List the machines behind a chassis or pod (ucsm, mscm, msftocs, rsd, sm15k, vmware,
    virsh...) and write ready inventory entries. Runs from this host."""
    from pathlib import Path

    from . import probe as chassis

    given = chassis.parse_params(params)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", rack):
        raise PlanError(f"bad rack name {rack!r}")
    machines = chassis.probe(power_type, given, timeout=timeout or obj.config.call_timeout)
    nodes, secrets = chassis.entries(power_type, given, machines, rack=rack, prefix=prefix)
    secrets_path = chassis.write(Path(out_path), nodes, secrets) if out_path else None
    if as_json:
        click.echo(json.dumps({
            "machines": [{"name": e["name"], "probed_as": m.name, "power": str(m.power),
                          "description": m.description, "mac_addresses": list(m.mac_addresses),
                          "power_parameters": dict(m.power_parameters)}
                         for e, m in zip(nodes, machines, strict=True)],
            "written": out_path, "secrets_file": str(secrets_path) if secrets_path else None,
        }, indent=2))
        return
    rows = [[e["name"], str(m.power), ", ".join(f"{k}={v}" for k, v in m.power_parameters.items()),
             ", ".join(m.mac_addresses), m.description] for e, m in zip(nodes, machines, strict=True)]
    click.echo(table(rows, ["node", "power", "parameters", "MACs", "device says"]))
    click.echo(f"{len(nodes)} machine(s) behind {power_type} {given.get('power_address', '')}".rstrip())
    if out_path:
        click.echo(f"wrote {out_path}" + (f" and {secrets_path} (mode 0600)" if secrets_path else "")
                   + f"; load with `powerq inventory load {out_path}`")


def _params_text(driver: Any) -> str:
    model = driver.settings_model
    out = []
    for name in model.model_fields:
        meta = model.field_meta(name)
        out.append(name + ("*" if meta.get("secret") else "") + ("(n)" if meta.get("scope") == "node" else ""))
    return ", ".join(out) or "—"


@main.command("drivers")
@click.option("--json", "as_json", is_flag=True)
@click.option("--markdown", is_flag=True, help="The table with every parameter, as in the README")
def drivers_cmd(as_json: bool, markdown: bool) -> None:
    """The power types and their capabilities (the founding table's columns)."""
    cols = [("pxe_next_boot", "PXE next boot"), ("power_query", "Power querying"),
            ("chassis_probe", "Chassis/Pod"), ("detailed_errors", "Detailed errors"),
            ("bmc_enlistment", "BMC enlistment")]
    drivers = registry.all_drivers()
    if markdown:
        click.echo("| power_type | device | " + " | ".join(h for _, h in cols) + " | parameters (`*` secret, `(n)` per node) |")
        click.echo("|---|---|" + "---|" * len(cols) + "---|")
        for name, d in drivers.items():
            flags = " | ".join("yes" if getattr(d.capabilities, c) else "" for c, _ in cols)
            click.echo(f"| `{name}` | {d.description} | {flags} | {_params_text(d)} |")
        return
    if as_json:
        click.echo(json.dumps({name: {"description": d.description,
                                      **{c: getattr(d.capabilities, c) for c, _ in cols}}
                               for name, d in drivers.items()}, indent=2))
        return
    rows = [[name, d.description] + ["X" if getattr(d.capabilities, c) else "" for c, _ in cols]
            for name, d in drivers.items()]
    click.echo(table(rows, ["power_type", "device"] + [h for _, h in cols]))


@main.command("config")
@click.pass_obj
@guarded
def config_cmd(obj: Ctx) -> None:
    """Every option, its current value (secrets masked) and what it does."""
    for var, value, help_text in obj.config.describe():
        click.echo(f"{var}={value}\n    {help_text}")


# -- API (issue 7) --------------------------------------------------------------------------
@main.command("api")
@click.option("--host", default=None, help="Address to bind (default POWERQ_API_HOST, 127.0.0.1)")
@click.option("--port", default=None, type=int, help="Port (default POWERQ_API_PORT, 8470)")
@click.option("--loglevel", default="info", show_default=True)
@click.pass_obj
@guarded
def api_cmd(obj: Ctx, host: str | None, port: int | None, loglevel: str) -> None:
    """Serve the REST API and the MAAS webhook (uvicorn)."""
    import dataclasses
    import logging

    import uvicorn

    from .api import create_app
    from .logs import setup_logging

    setup_logging(obj.config.log_format, loglevel)  # text or json, secrets masked (issue 7)

    overrides: dict[str, Any] = {
        k: v for k, v in (("api_host", host), ("api_port", port)) if v is not None
    }
    config = dataclasses.replace(obj.config, **overrides)
    app = create_app(config)
    logging.getLogger("powerq.api").info(
        "powerq API on http://%s:%s/ (schema: /openapi.json)", config.api_host, config.api_port)
    # log_config=None: uvicorn's loggers propagate to the handler set up above.
    uvicorn.run(app, host=config.api_host, port=config.api_port, log_level=loglevel.lower(),
                proxy_headers=False, log_config=None)


@main.group("token")
def token_group() -> None:
    """API tokens (stored hashed; each name shows as requested_by `api:NAME`)."""


@token_group.command("add")
@click.argument("name")
@click.option("--scope", type=click.Choice(["read", "operate", "admin"]), default="operate",
              show_default=True, help="read: GETs; operate: also power actions and MAAS; "
                                      "admin: also inventory loads")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def token_add(obj: Ctx, name: str, scope: str, as_json: bool) -> None:
    """Create token NAME and print it: the only time it is shown."""
    from .tokens import TokenStore

    token = TokenStore(obj.store.client, obj.config.key_prefix).add(name, scope)
    if as_json:
        click.echo(json.dumps({"name": name, "scope": scope, "token": token}))
    else:
        click.echo(token)
        click.echo(f"token {name!r} ({scope}) created; it is not shown again", err=True)


@token_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def token_list(obj: Ctx, as_json: bool) -> None:
    """List tokens (names, scopes, creation and last use; never the tokens)."""
    from .tokens import TokenStore

    infos = TokenStore(obj.store.client, obj.config.key_prefix).list()
    if as_json:
        click.echo(json.dumps([{"name": i.name, "scope": i.scope, "created": i.created,
                                "last_used": i.last_used} for i in infos], indent=2))
        return
    now = time.time()
    click.echo(table([[i.name, i.scope, age(now - i.created) + " ago",
                       "-" if i.last_used is None else age(now - i.last_used) + " ago"]
                      for i in infos], ["name", "scope", "created", "last used"]))


@token_group.command("revoke")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def token_revoke(obj: Ctx, name: str, as_json: bool) -> None:
    """Revoke token NAME at once."""
    from .tokens import TokenError, TokenStore

    if not TokenStore(obj.store.client, obj.config.key_prefix).revoke(name):
        raise TokenError(f"no token named {name!r}")
    click.echo(json.dumps({"revoked": name}) if as_json else f"token {name!r} revoked")


# -- keys and audit (issue 5) -----------------------------------------------------------------
@main.group("keys")
def keys_group() -> None:
    """The Fernet keys that seal inventory secrets in Redis (never shown: fingerprints only)."""


def _print_keys_report(report: dict[str, Any], as_json: bool, head: str) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(head)
    for line in report.get("unreadable") or []:
        click.echo(f"  warning: {line}: no configured key decrypts it; load the inventory again",
                   err=True)


@keys_group.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def keys_status(obj: Ctx, as_json: bool) -> None:
    """How many keys, which one is primary, how many stored secrets each one opens."""
    from .secrets import key_status

    report = key_status(obj.config, obj.store.client, obj.config.key_prefix)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    sealed = report["sealed"]
    click.echo(f"{report['keys']} key(s) from {report['source']}; primary {report['primary']}")
    for index, (fp, n) in enumerate(zip(report["fingerprints"], sealed["by_key"], strict=True)):
        click.echo(f"  {index + 1}. {fp}{' (primary)' if index == 0 else ''}: "
                   f"{n} stored secret(s)")
    if sealed["unreadable"]:
        click.echo(f"  {sealed['unreadable']} stored secret(s) no key decrypts", err=True)


@keys_group.command("rotate")
@click.option("--drop-old", is_flag=True, help="Then drop the old keys (as `powerq keys prune`)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def keys_rotate(obj: Ctx, drop_old: bool, as_json: bool) -> None:
    """Make a new primary key (key file) and re-encrypt every stored secret under it.

    With POWERQ_SECRET_KEY, put a new key (`powerq keys generate`) first in it on every
    host, restart the workers, then run this: it re-encrypts under the first key."""
    from .secrets import prune, rotate

    report = rotate(obj.config, obj.store.client, obj.config.key_prefix)
    if drop_old:
        report["prune"] = prune(obj.config, obj.store.client, obj.config.key_prefix)
    head = (f"{'new ' if report['generated'] else ''}primary key {report['primary']} "
            f"({report['keys']} key(s) in {report['source']}); "
            f"{report['values']} stored secret(s) re-encrypted")
    if drop_old:
        head += "; " + _prune_text(report["prune"])
    _print_keys_report(report, as_json, head)


def _prune_text(report: dict[str, Any]) -> str:
    if report["dropped"]:
        return f"dropped {len(report['dropped'])} old key(s): {', '.join(report['dropped'])}"
    if report["removable"]:
        return ("no stored secret needs the old key(s) "
                f"{', '.join(report['removable'])}: remove them from POWERQ_SECRET_KEY")
    return "no old key to drop"


@keys_group.command("prune")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def keys_prune(obj: Ctx, as_json: bool) -> None:
    """Drop every key but the primary, once no stored secret needs one (checked first)."""
    from .secrets import prune

    report = prune(obj.config, obj.store.client, obj.config.key_prefix)
    _print_keys_report(report, as_json, _prune_text(report))


@keys_group.command("generate")
def keys_generate() -> None:
    """Print a new random key (for POWERQ_SECRET_KEY; a key file is managed by `rotate`)."""
    from .secrets import generate_key

    click.echo(generate_key())


@main.command("audit")
@click.option("--count", "-n", default=50, show_default=True, type=click.IntRange(1, 100_000),
              help="Newest entries to show")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def audit_cmd(obj: Ctx, count: int, as_json: bool) -> None:
    """Who asked for which power action, when, and how it ended (newest first)."""
    from .audit import read

    entries = read(obj.store.client, obj.config.key_prefix, count)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    rows = []
    for e in entries:
        at = float(e.get("at") or 0)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"
        if e["kind"] == "outcome":
            what = f"{e.get('status')}: ok {e.get('ok')} error {e.get('error')} skipped {e.get('skipped')}"
        elif e["kind"] == "refused":
            what = f"{e.get('code')}: {e.get('message', '')}"[:100]
        else:
            what = f"{e.get('nodes')} node(s) {e.get('options', '')}"
        target = e.get("nodeset") or e.get("path", "")
        rows.append([when, e["kind"], e.get("who", "-"), e.get("action", "") or e.get("method", ""),
                     target[:40], e.get("job", "") or "-", what])
    click.echo(table(rows, ["at", "kind", "who", "action", "nodes", "job", "detail"]))


# -- end of keys and audit (issue 5) ----------------------------------------------------------


# -- parking (issue 5) --------------------------------------------------------------------------
def _parked_view(obj: Ctx, names: list[str], now: float) -> tuple[list[dict[str, Any]],
                                                                  dict[str, dict[str, Any]]]:
    """(every BMC parked now, with the listed nodes behind it; node -> its BMC's entry).
    Nodes are matched to BMCs (by building their drivers, offline) only when one is parked."""
    from workers.bmcguard import bmc_keys_of, parked

    current = parked(obj.store.client, obj.config.key_prefix, now)
    if not current:
        return [], {}
    keys = bmc_keys_of(obj.inventory().load_nodes(names), obj.config.call_timeout) if names else {}
    entries: dict[str, dict[str, Any]] = {bmc: {"bmc": bmc, "until": info.get("until"), "failures": info.get("failures"),
                     "code": info.get("code"), "nodes": []} for bmc, info in current.items()}
    by_node: dict[str, dict[str, Any]] = {}
    for name in names:
        entry = entries.get(keys.get(name, ""))
        if entry is not None:
            entry["nodes"].append(name)
            by_node[name] = {k: v for k, v in entry.items() if k != "nodes"}
    return sorted(entries.values(), key=lambda e: e["bmc"]), by_node


def _parked_text(entry: dict[str, Any]) -> str:
    until = time.strftime("%H:%M:%S", time.localtime(float(entry.get("until") or 0)))
    return (f"{entry['bmc']} parked until {until} after {entry.get('failures')} failures "
            f"(last: {entry.get('code')})")


@main.command("unpark")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@guarded
def unpark_cmd(obj: Ctx, target: str, as_json: bool) -> None:
    """Release a parked BMC before its cool-down ends. TARGET is a BMC key as `powerq
    status` shows it (e.g. ipmi:10.0.0.5:623) or a node set (the BMCs behind its nodes).
    Its count of failures is forgotten too."""
    from workers.bmcguard import bmc_keys_of, parked, unpark

    from .nodeset import expand
    from .planner import resolver_for

    client, prefix = obj.store.client, obj.config.key_prefix
    if target in parked(client, prefix):
        keys = [target]
    else:
        index = obj.inventory().node_index()
        try:
            names = [n for n in expand(target, resolver_for(index)) if n in index] if index else []
        except PowerError:
            names = []
        keys = (sorted(set(bmc_keys_of(obj.inventory().load_nodes(names),
                                       obj.config.call_timeout).values())) if names else [target])
    released = unpark(client, prefix, keys)
    if as_json:
        click.echo(json.dumps({"released": released, "checked": keys}, indent=2))
    elif released:
        click.echo(f"released {len(released)} BMC(s): {', '.join(released)}")
    else:
        click.echo(f"no parked BMC behind {target} (failure counts cleared)")
# -- end of parking (issue 5) -------------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main()
