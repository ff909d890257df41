"""The capability matrix is honest: every capability a driver declares has a test that
exercises it against that power type's peer, marked ``@pytest.mark.capability(TYPE, CAP...)``.

The marks are read from the test sources (not from a run), so this holds for the whole
suite whatever subset of it runs.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from drivers import registry
from drivers.base import Capabilities
from tests.conftest import ROOT

TESTS = Path(__file__).resolve().parent
CAPABILITIES = tuple(f.name for f in fields(Capabilities))
SEED = ("ipmi", "redfish", "virsh", "vmware", "apc", "fence_cdu", "dli", "ucsm", "mscm", "moonshot",
        "hmc", "amt", "manual", "msftocs", "nova", "rsd", "sm15k", "wedge")
BEYOND_SEED = ("webhook", "eaton", "raritan", "openbmc")


def _is_capability_mark(node: ast.AST) -> bool:
    # pytest.mark.capability(...)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "capability" and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "mark")


def shipped() -> dict[str, type]:
    """The drivers of drivers/ (tests register test-only ones of their own)."""
    return {n: c for n, c in registry.all_drivers().items() if c.__module__.startswith("drivers.")}


def evidence() -> dict[str, dict[str, list[str]]]:
    """power_type -> capability -> the tests (file::function) marked as exercising it."""
    found: dict[str, dict[str, list[str]]] = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test"):
                continue
            for deco in fn.decorator_list:
                if not _is_capability_mark(deco):
                    continue
                assert isinstance(deco, ast.Call)
                args = [a.value for a in deco.args if isinstance(a, ast.Constant)]
                assert len(args) == len(deco.args) >= 2, f"{path.name}::{fn.name}: capability(TYPE, CAP...) takes literals"
                power_type, *caps = args
                for cap in caps:
                    assert cap in CAPABILITIES, f"{path.name}::{fn.name}: unknown capability {cap!r}"
                    found.setdefault(power_type, {}).setdefault(cap, []).append(f"{path.name}::{fn.name}")
    return found


FULL_PATH = ("test_fullpath", "test_e2e")
"""Test modules that drive a power type through the whole path (CLI -> rack queue ->
worker -> driver -> peer), not the driver alone."""


def test_every_declared_capability_has_a_test_against_its_peer() -> None:
    marks = evidence()
    missing = [
        f"{name}.{cap}"
        for name, driver in shipped().items()
        for cap in CAPABILITIES
        if getattr(driver.capabilities, cap)
        and not any(t.startswith(FULL_PATH) for t in marks.get(name, {}).get(cap, []))
    ]
    assert not missing, ("declared but never exercised through the full path against a peer: "
                         + ", ".join(missing))


def test_marks_name_registered_power_types() -> None:
    unknown = sorted(set(evidence()) - set(shipped()))
    assert not unknown, f"capability marks for power types that do not exist: {unknown}"


def test_powerq_drivers_prints_the_matrix_from_the_declared_capabilities() -> None:
    out = subprocess.run([sys.executable, "-m", "scheduler.cli", "drivers", "--json"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    table = json.loads(out.stdout)
    assert set(table) == set(shipped())
    for name, driver in shipped().items():
        assert {c: table[name][c] for c in CAPABILITIES} == {
            c: getattr(driver.capabilities, c) for c in CAPABILITIES}
    text = subprocess.run([sys.executable, "-m", "scheduler.cli", "drivers"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    assert "PXE next boot" in text and "BMC enlistment" in text


def test_every_seed_power_type_and_the_four_beyond_it_are_registered() -> None:
    missing = [n for n in SEED + BEYOND_SEED if n not in shipped()]
    assert len(shipped()) == len(SEED) + len(BEYOND_SEED)
    assert not missing, f"power types not yet built: {missing}"
