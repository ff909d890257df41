"""deploy/: the systemd units, the compose file, the environment example and the Dockerfile.

No container engine runs here, so this checks what can be checked without one: every unit
passes ``systemd-analyze verify`` and carries the hardening the README promises, every
command a unit or compose service runs is a real ``powerq`` subcommand with options that
exist, the environment example names only options ``powerq config`` knows (and all of
them), and the Dockerfile installs extras pyproject.toml declares.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from scheduler.cli import main as powerq_cli
from scheduler.config import Config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALLED_POWERQ = "/opt/powerq/venv/bin/powerq"
VENV_POWERQ = Path(sys.executable).parent / "powerq"


@cache
def powerq_help(*words: str) -> str:
    """``powerq WORDS --help`` through the installed console script."""
    done = subprocess.run([str(VENV_POWERQ), *words, "--help"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, (words, done.stdout + done.stderr)
    return done.stdout


def check_powerq_command(argv: list[str]) -> None:
    """``argv`` (without the program name) is a real powerq subcommand whose options exist
    and parse: its ``--help`` runs, and click parses the arguments without a usage error."""
    assert argv, "empty powerq command"
    command: click.Command = powerq_cli
    words: list[str] = []
    rest = list(argv)
    while isinstance(command, click.Group):
        assert rest and rest[0] in command.commands, (argv, sorted(command.commands))
        words.append(rest[0])
        command = command.commands[rest.pop(0)]
    help_text = powerq_help(*words)
    for arg in rest:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in help_text, (argv, arg)
    try:
        command.make_context(" ".join(words), rest)
    except click.ClickException as exc:
        raise AssertionError(f"powerq {' '.join(argv)}: {exc.format_message()}") from None


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_units_exist() -> None:
    names = {p.name for p in UNITS}
    assert names == {"powerq-worker@.service", "powerq-beat.service", "powerq-api.service",
                     "powerq-flower.service"}


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Each unit as systemd itself reads it, with ExecStart pointed at this venv's powerq
    (verify also checks the executable exists)."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install Debian's systemd package"
    targets = []
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_POWERQ, str(VENV_POWERQ)))
        name = unit.name.replace("@.service", "@r1.service")
        targets.append(str(tmp_path / name))
    done = subprocess.run([tool, "verify", *targets], capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    ours = [line for line in output.splitlines() if "powerq-" in line or str(tmp_path) in line]
    assert not ours, output


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_runs_powerq_hardened(unit: Path) -> None:
    parsed = read_unit(unit)
    service = parsed["Service"]
    assert service["EnvironmentFile"] == "/etc/powerq/powerq.env"
    assert service["User"] == "powerq" and service["Group"] == "powerq"
    assert service["Restart"] == "on-failure"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():
        assert service.get(key) == value, (unit.name, key, service.get(key))
    assert service["KillMode"] == "mixed"
    assert parsed["Install"]["WantedBy"] == "multi-user.target"
    argv = shlex.split(service["ExecStart"].replace("%i", "r1"))
    assert argv[0] == INSTALLED_POWERQ
    check_powerq_command(argv[1:])


def test_worker_unit_waits_for_its_chunk() -> None:
    """Stopping a worker lets its running chunk end: SIGTERM (Celery's warm shutdown) to
    the main process, SIGKILL only after the chunk's own hard time limit."""
    service = read_unit(DEPLOY / "systemd" / "powerq-worker@.service")["Service"]
    assert service["ExecStart"].split()[1:] == ["worker", "--rack", "%i"]
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    stop = service["TimeoutStopSec"]
    assert stop.isdigit() and int(stop) > Config().task_time_limit, stop


@cache
def config_names() -> frozenset[str]:
    """The variables ``powerq config`` lists."""
    done = subprocess.run([str(VENV_POWERQ), "config"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "POWERQ_SECRET_KEY_FILE": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    names = frozenset(re.findall(r"^(POWERQ_[A-Z0-9_]+)=", done.stdout, re.M))
    assert "POWERQ_REDIS_URL" in names and "POWERQ_BROKER_URL" in names
    return names


def test_env_example_names_every_option_and_only_those() -> None:
    text = (DEPLOY / "powerq.env.example").read_text()
    named = set(re.findall(r"^#?\s*(POWERQ_[A-Z0-9_]+)=", text, re.M))
    assert not named - config_names(), f"unknown options: {sorted(named - config_names())}"
    missing = config_names() - named
    assert not missing, f"deploy/powerq.env.example lacks {sorted(missing)}: add them (commented)"


def test_env_example_values_load() -> None:
    """The uncommented settings are valid values (types, ranges, URL schemes)."""
    environ = {}
    for line in (DEPLOY / "powerq.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            environ[key.strip()] = value.strip()
    assert "POWERQ_REDIS_URL" in environ and "POWERQ_SECRET_KEY_FILE" in environ
    config = Config.from_env(environ)
    assert config.effective_broker_url == config.redis_url


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_services() -> None:
    services = compose()["services"]
    workers = sorted(n for n in services if n.startswith("worker-"))
    assert {"redis", "api", "beat", "flower"} <= set(services) and len(workers) >= 2
    racks = [services[w]["command"][services[w]["command"].index("--rack") + 1] for w in workers]
    assert len(set(racks)) == len(racks), racks
    for name, service in services.items():
        assert "healthcheck" in service, name
        assert service.get("restart") == "unless-stopped", name


def test_compose_redis_has_password_and_persistence() -> None:
    redis = compose()["services"]["redis"]
    script = " ".join(redis["command"])
    assert "requirepass" in script and "appendonly yes" in script
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_compose_runs_real_powerq_commands() -> None:
    """Every powerq service's command (the image's entrypoint is `powerq`) and every
    healthcheck that calls powerq or Python."""
    services = compose()["services"]
    for name, service in services.items():
        if name == "redis":
            continue
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        check_powerq_command(list(service["command"]))
        for key in service.get("environment", {}):
            assert key in config_names(), (name, key)
        test = service["healthcheck"]["test"]
        if test[0] == "CMD-SHELL" and test[1].startswith("powerq "):
            check_powerq_command(shlex.split(test[1].split("|")[0])[1:])
        elif test[0] == "CMD" and test[1] == "python":
            assert test[2] == "-c"
            compile(test[3], f"{name} healthcheck", "exec")
        else:
            raise AssertionError(f"{name}: unexpected healthcheck {test}")
    for name in services:
        if name.startswith("worker-"):
            grace = services[name]["stop_grace_period"]
            assert grace.endswith("m") and int(grace[:-1]) * 60 > Config().task_time_limit


def test_dockerfile_extras_exist() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    extras_declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = re.findall(r"pip (?:install|wheel)[^\n]*?'[.\w-]*\[([\w,]+)\]'", text)
    assert len(installs) >= 2, installs
    for group in installs:
        extras = set(group.split(","))
        assert {"worker", "api", "flower"} <= extras
        assert extras <= extras_declared, extras - extras_declared
    assert re.search(r'^ENTRYPOINT \["powerq"\]$', text, re.M)
    for source in re.findall(r"^COPY (?!--)(\S+)", text, re.M):
        assert (ROOT / source).exists(), source
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for source in ("pyproject.toml", "README.md", "drivers", "workers", "scheduler"):
        assert f"!{source}" in ignore, source
