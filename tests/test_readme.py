"""The README says what the code does: its power-type table is the one `powerq drivers`
prints, and its sample inventory is the file in docs/examples, which loads."""

from __future__ import annotations

import re
import subprocess
import sys

from scheduler.inventory import load_inventory
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def _between(name: str) -> str:
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", README, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


def test_power_type_table_is_what_powerq_drivers_prints() -> None:
    out = subprocess.run([sys.executable, "-m", "scheduler.cli", "drivers", "--markdown"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.rstrip("\n")
    assert _between("power-types") == out, "README's table is stale: paste `powerq drivers --markdown`"


def test_sample_inventory_is_the_example_file_and_loads() -> None:
    path = ROOT / "docs" / "examples" / "every-power-type.yaml"
    assert _between("sample-inventory") == "```yaml\n" + path.read_text().rstrip("\n") + "\n```"
    inventory = load_inventory(path)
    from drivers import registry

    shipped = {n for n, c in registry.all_drivers().items() if c.__module__.startswith("drivers.")}
    assert {n.power_type for n in inventory.nodes.values()} == shipped
