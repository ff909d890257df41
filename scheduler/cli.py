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
from typing import Any

import click

from drivers import registry
from drivers.errors import PowerError

from .config import Config
from .nodeset import fold
from .planner import Plan, PlanError, make_plan, plan_to_dict, submit
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
        _run_action(ctx.obj, action, nodeset, wait=wait, as_json=as_json, dry_run=dry_run,
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
_power_command("on", "Power NODESET on (nodes already on are left alone).")
_power_command("off", "Power NODESET off (hard unless --soft or power_off_mode=soft).", [_soft])
_power_command("cycle", "Power NODESET off then on (an off node is just powered on).", [_soft])
_power_command("query", "Read the power state of NODESET.")
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
    options = {k: v for k, v in options.items() if v is not None}
    if action != "boot":
        options = {k: v for k, v in options.items() if k == "soft" and v}
    config = obj.config
    index = obj.inventory().node_index()
    if not index:
        raise PlanError("the inventory is empty: load one with `powerq inventory load FILE`")
    plan = make_plan(action, nodeset, index, chunk_size=config.chunk_size, options=options)
    if dry_run:
        _print_plan(plan, as_json)
        return
    if action in ("off", "cycle") and len(plan.nodes) > config.confirm_threshold and not yes:
        if as_json or not sys.stdin.isatty():
            raise PlanError(
                f"{action} of {len(plan.nodes)} nodes needs confirmation (more than "
                f"{config.confirm_threshold}): add --yes"
            )
        click.confirm(
            f"{action} {len(plan.nodes)} nodes in {len(plan.racks)} rack(s) ({fold(plan.nodes)})?",
            abort=True,
        )

    from workers.dispatch import app_for, racks_without_worker, send_chunks

    app = app_for(config)

    def missing(racks: Any) -> list[str]:
        return racks_without_worker(app, racks, config.inspect_timeout)

    def send(job_id: str, p: Plan) -> int:
        return send_chunks(app, job_id, p.action, p.chunks, p.options)

    job_id = submit(plan, obj.store, racks_without_worker=missing, send=send, requested_by=who())
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
        click.echo(json.dumps({"job": job, "results": list(results.values())}, indent=2))
    else:
        _print_results(job, results)
    if not finished:
        click.echo(f"gave up waiting after {timeout:g} s; the job goes on", err=True)
        sys.exit(EXIT_FAILED)
    if job.get("error"):
        sys.exit(EXIT_FAILED)


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
            if job.get("status") == "failed":
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.2)
    finally:
        if bar_ctx is not None:
            bar_ctx.__exit__(None, None, None)


def _print_plan(plan: Plan, as_json: bool) -> None:
    data = plan_to_dict(plan)
    if as_json:
        click.echo(json.dumps({"dry_run": True, "plan": data}, indent=2))
        return
    opts = " ".join(f"{k}={v}" for k, v in plan.options.items())
    click.echo(f"dry run: {plan.action} {len(plan.nodes)} node(s) {opts}".rstrip() + "; nothing sent")
    click.echo(table([[q["queue"], str(q["count"]), q["nodes"]] for q in data["queues"]],
                     ["queue", "nodes", "node set"]))


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
        click.echo(json.dumps({"job": record, "results": list(results.values())}, indent=2))
        return
    click.echo(f"job {record['id']}: {record['action']} {record['nodeset']} by {record['requested_by']}, "
               f"status {record['status']}, {record['done']}/{record['total']} done")
    _print_results(record, results)


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
        data.append(item)
        rows.append([name, item["rack"], item["power_type"], state, age(item["age"]),
                     err.get("code", ""), err.get("message", "")])
    if as_json:
        click.echo(json.dumps({"nodes": data, "summary": summary}, indent=2))
        return
    click.echo(table(rows, ["node", "rack", "type", "state", "age", "last error", "message"]))
    click.echo(", ".join(f"{v} {k}" for k, v in sorted(summary.items())) + f" ({len(names)} nodes)")


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
@click.option("--concurrency", default=2, show_default=True, help="Chunks run at once")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", default=None, help="Worker name (default rack-<rack>@<host>)")
@click.pass_obj
def worker(obj: Ctx, racks: tuple[str, ...], concurrency: int, loglevel: str, hostname: str | None) -> None:
    """Run a worker for one or more racks' queues."""
    bad = [r for r in racks if not re.fullmatch(r"[A-Za-z0-9._-]+", r)]
    if bad:
        fail(PlanError(f"bad rack name(s): {', '.join(bad)}"), False)
    from workers.dispatch import run_worker

    run_worker(obj.config, list(racks), concurrency=concurrency, loglevel=loglevel, hostname=hostname)


@main.command()
@click.option("--every", default="60s", show_default=True, help="Poll interval (e.g. 60s, 5m)")
@click.option("--loglevel", default="INFO", show_default=True)
@click.pass_obj
def poll(obj: Ctx, every: str, loglevel: str) -> None:
    """Poll the whole fleet's power state every interval, spread across it (Celery beat)."""
    from workers.beat import run_beat

    run_beat(obj.config, parse_duration(every), loglevel=loglevel)


@main.command()
@click.pass_obj
def flower(obj: Ctx) -> None:
    """Run Flower for the powerq workers, with basic auth, bound to 127.0.0.1 by default."""
    import secrets as pysecrets

    config = obj.config
    auth = config.flower_basic_auth
    if not auth:
        auth = f"admin:{pysecrets.token_urlsafe(12)}"
        click.echo(f"Flower credentials: {auth}")
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
@click.option("--dir", "workdir", default=".demo/sim", show_default=True, type=click.Path(file_okay=False))
@click.option("--racks", default=3, show_default=True)
@click.option("--mix", default="ipmi=20,redfish=10,virsh=10", show_default=True,
              help="Nodes per rack of each simulated power type")
@click.option("--initial", default="mixed", show_default=True, type=click.Choice(["on", "off", "mixed"]),
              help="Power state the simulated nodes start in")
def sim(workdir: str, racks: int, mix: str, initial: str) -> None:
    """Run a simulated fleet (real protocol peers) and write DIR/inventory.yaml; until Ctrl-C."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "tests" / "peers").is_dir():
        fail(PlanError("powerq sim needs a source checkout (tests/peers is missing)"), False)
    sys.path.insert(0, str(root))
    from tests.peers import fleet

    sys.exit(fleet.main(["--dir", workdir, "--racks", str(racks), "--mix", mix, "--initial", initial]))


# -- information ---------------------------------------------------------------------------
@main.command("drivers")
@click.option("--json", "as_json", is_flag=True)
def drivers_cmd(as_json: bool) -> None:
    """The power types and their capabilities (the founding table's columns)."""
    cols = [("pxe_next_boot", "PXE next boot"), ("power_query", "Power querying"),
            ("chassis_probe", "Chassis/Pod"), ("detailed_errors", "Detailed errors"),
            ("bmc_enlistment", "BMC enlistment")]
    drivers = registry.all_drivers()
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


if __name__ == "__main__":  # pragma: no cover
    main()
