"""Chassis / pod probe: list the machines behind a chassis and write inventory entries.

``powerq probe POWER_TYPE --param k=v ...`` validates the chassis-scope parameters (no
device is touched if they are wrong), calls the driver's ``probe_chassis`` from this host,
and turns every machine found into a ready inventory entry: the chassis parameters plus
the machine's own (``uuid``, ``node_id``, ``power_id``...). Secrets never go into the
entries: each is written as ``{file: KEY}`` and its value into a separate secrets file
(mode 0600) that the inventory names with ``secrets_file:``, so both load as they are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from drivers import registry
from drivers.base import ProbedMachine
from drivers.errors import SettingsError

_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def parse_params(pairs: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{k: v}``. Raises :class:`SettingsError` naming every bad pair."""
    out: dict[str, str] = {}
    bad = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            bad.append(pair.split("=", 1)[0] or "(empty)")
            continue
        out[key.strip()] = value
    if bad:
        raise SettingsError("--param takes KEY=VALUE: " + ", ".join(bad))
    return out


def node_name(prefix: str, machine: ProbedMachine) -> str:
    """A node name from the probe's suggestion: characters an inventory accepts only."""
    base = _NAME_BAD.sub("-", machine.name).strip("-.") or "node"
    return f"{prefix}{base}" if prefix else base


def probe(power_type: str, params: Mapping[str, Any], *, timeout: float) -> list[ProbedMachine]:
    """Validate the chassis parameters, then ask the device. Raises the taxonomy's errors
    (:class:`SettingsError` before touching anything, ``UnsupportedError`` for a power
    type without a chassis probe)."""
    driver = registry.get(power_type)
    if not driver.capabilities.chassis_probe:
        from drivers.errors import UnsupportedError

        raise UnsupportedError(f"power type {power_type} has no chassis / pod probe")
    driver.validate_chassis(params)
    return driver.probe_chassis(params, timeout=timeout)


def entries(
    power_type: str,
    params: Mapping[str, Any],
    machines: Sequence[ProbedMachine],
    *,
    rack: str,
    prefix: str = "",
    secret_key: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Inventory node entries for ``machines`` and the secrets they reference.

    Every entry is checked against the driver's settings model. Raises
    :class:`SettingsError` when one does not validate or two machines would get one name.
    """
    driver = registry.get(power_type)
    secret_fields = driver.settings_model.secret_fields()
    key = secret_key or f"{power_type}-{_NAME_BAD.sub('-', str(params.get('power_address', 'chassis')))}"
    secrets: dict[str, str] = {}
    shared: dict[str, Any] = {}
    for name, value in params.items():
        if name in secret_fields:
            ref = f"{key}-{name}"
            secrets[ref] = str(value)
            shared[name] = {"file": ref}
        else:
            shared[name] = value
    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for machine in machines:
        name = node_name(prefix, machine)
        if name in seen:
            raise SettingsError(f"two machines would both be named {name!r}: use --prefix or rename")
        seen[name] = machine.name
        own = {**params, **machine.power_parameters}
        driver.validate(own)  # ready to load, or say why not
        entry: dict[str, Any] = {
            "name": name,
            "rack": rack,
            "power_type": power_type,
            "power_parameters": {**shared, **machine.power_parameters},
        }
        if machine.mac_addresses and "mac_address" in driver.settings_model.model_fields:
            entry["power_parameters"].setdefault("mac_address", machine.mac_addresses[0])
        out.append(entry)
    return out, secrets


def write(out: Path, nodes: list[dict[str, Any]], secrets: Mapping[str, str]) -> Path | None:
    """Write the inventory (and, when there are secrets, ``<out stem>.secrets.yaml``, mode
    0600, named by the inventory's ``secrets_file``). Returns the secrets file's path."""
    doc: dict[str, Any] = {}
    secrets_path = None
    if secrets:
        secrets_path = out.with_name(out.stem + ".secrets.yaml")
        fd = os.open(secrets_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(dict(secrets), fh)
        os.chmod(secrets_path, 0o600)
        doc["secrets_file"] = secrets_path.name
    doc["nodes"] = nodes
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return secrets_path
