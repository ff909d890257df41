"""The HTTP power types through the full path (CLI -> Redis -> rack worker -> driver ->
simulated device), with the shared checks of tests/fullpath.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fullpath import FullPath, check_probe, error_code, exercise
from tests.peers import http_devices as hd
from tests.peers.common import free_port

pytestmark = pytest.mark.integration

PW = hd.PASSWORD
Entry = dict[str, Any]


def entry(name: str, power_type: str, **params: Any) -> Entry:
    return {"name": name, "power_type": power_type, "power_parameters": params}


UUIDS = ["5c7a1d3e-0000-4000-8000-0000000000a1", "5c7a1d3e-0000-4000-8000-0000000000a2"]


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[hd.HttpFleet, dict[str, list[Entry]]]]:
    """One device (or two) of each HTTP power type, and inventory entries by type."""
    with hd.HttpFleet() as f:
        by_type: dict[str, list[Entry]] = {}
        wh = f.add(hd.WebhookDevice([hd.Node(f"wh{i}", f"m{i}") for i in (1, 2)]))
        by_type["webhook"] = [entry(n.name, "webhook", power_user="admin", power_pass=PW, **wh.uris(n))
                              for n in wh.nodes.values()]
        dli = f.add(hd.DliDevice([hd.Node(f"dli{i}", str(i)) for i in (1, 2, 5)]))
        by_type["dli"] = [entry(n.name, "dli", power_address=dli.url, power_user="admin",
                                power_pass=PW, outlet_id=int(n.key)) for n in dli.nodes.values()]
        ucs = f.add(hd.UcsmDevice([hd.Node("ucs1", UUIDS[0]),
                                   hd.Node("ucs2", UUIDS[1], extra={"rack": True})]))
        by_type["ucsm"] = [entry(n.name, "ucsm", power_address=ucs.url, power_user="admin",
                                 power_pass=PW, uuid=n.key) for n in ucs.nodes.values()]
        obmcs = [f.add(hd.OpenBmcDevice([hd.Node(f"obmc{i}", "host0")])) for i in (1, 2)]
        by_type["openbmc"] = [entry(f"obmc{i}", "openbmc", power_address=d.url, power_user="admin",
                                    power_pass=PW) for i, d in enumerate(obmcs, 1)]
        rsd = f.add(hd.RsdDevice([hd.Node("rsd1", "1"),
                                  hd.Node("rsd2", "2", extra={"composed": "Allocated"})]))
        by_type["rsd"] = [entry(n.name, "rsd", power_address=rsd.url, power_user="admin",
                                power_pass=PW, node_id=n.key) for n in rsd.nodes.values()]
        ocs = f.add(hd.MsftOcsDevice([hd.Node(f"ocs{i}", str(i)) for i in (1, 3)]))
        by_type["msftocs"] = [entry(n.name, "msftocs", power_address="127.0.0.1", power_port=ocs.port,
                                    power_user="admin", power_pass=PW, blade_id=int(n.key))
                              for n in ocs.nodes.values()]
        yield f, by_type


def with_params(e: Entry, name: str, **params: Any) -> Entry:
    return {**e, "name": name, "power_parameters": {**e["power_parameters"], **params}}


def codes(fp: FullPath, names: list[str]) -> dict[str, str]:
    """The error code of each node after one ``query`` of all of them."""
    job = fp.run("query", ",".join(names))
    return {n: (job["by_node"][n].get("error") or {}).get("code", "") for n in names}


@pytest.mark.capability("webhook", "power_query")
@pytest.mark.capability("dli", "power_query")
@pytest.mark.capability("ucsm", "power_query")
def test_power_types_without_next_boot(
    fullpath: FullPath, fleet: tuple[hd.HttpFleet, dict[str, list[Entry]]]
) -> None:
    """webhook, dli and ucsm: on / query / off / cycle with the peers' states and counts."""
    f, by_type = fleet
    entries = by_type["webhook"] + by_type["dli"] + by_type["ucsm"]
    fullpath.load(entries)
    exercise(fullpath, f.nodes, f.set_state, f.reset_counts, [e["name"] for e in entries])
    assert f.node("ucs1")["counts"]["open_sessions"] == 0  # every UCS login logged out


@pytest.mark.capability("openbmc", "power_query", "pxe_next_boot")
@pytest.mark.capability("rsd", "power_query", "pxe_next_boot")
@pytest.mark.capability("msftocs", "power_query", "pxe_next_boot")
def test_power_types_with_next_boot(
    fullpath: FullPath, fleet: tuple[hd.HttpFleet, dict[str, list[Entry]]]
) -> None:
    """openbmc, rsd and msftocs: the same plus next boot to PXE."""
    f, by_type = fleet
    entries = by_type["openbmc"] + by_type["rsd"] + by_type["msftocs"]
    fullpath.load(entries)
    exercise(fullpath, f.nodes, f.set_state, f.reset_counts, [e["name"] for e in entries], boot=True)
    assert f.node("rsd2")["assemble"] == 1  # the Allocated node was assembled before powering on
    for name in ("obmc1", "obmc2"):
        assert f.node(name)["counts"]["open_sessions"] == 0  # every session logged out


@pytest.mark.capability("webhook", "detailed_errors")
@pytest.mark.capability("dli", "detailed_errors")
@pytest.mark.capability("ucsm", "detailed_errors")
@pytest.mark.capability("openbmc", "detailed_errors")
@pytest.mark.capability("rsd", "detailed_errors")
@pytest.mark.capability("msftocs", "detailed_errors")
def test_error_codes(fullpath: FullPath, fleet: tuple[hd.HttpFleet, dict[str, list[Entry]]]) -> None:
    """Wrong password -> auth_failed, nothing listening -> unreachable, the device's busy
    reply -> busy: for every HTTP power type."""
    f, by_type = fleet
    dead = f"http://127.0.0.1:{free_port()}"
    dead_params: dict[str, dict[str, Any]] = {
        "webhook": {"power_on_uri": dead + "/on", "power_off_uri": dead + "/off",
                    "power_query_uri": dead + "/q"},
        "msftocs": {"power_port": free_port()},
    }
    entries, wrong, gone, busy = [], [], [], []
    for power_type, typed in by_type.items():
        good = typed[0]
        entries += [
            good,
            with_params(good, f"wrongpw-{power_type}", power_user="other", power_pass="not-the-password"),
            with_params(good, f"dead-{power_type}", **dead_params.get(power_type, {"power_address": dead})),
        ]
        wrong.append(f"wrongpw-{power_type}")
        gone.append(f"dead-{power_type}")
        busy.append(good["name"])
    fullpath.load(entries)
    assert codes(fullpath, wrong) == dict.fromkeys(wrong, "auth_failed")
    assert set(codes(fullpath, gone).values()) <= {"unreachable", "timeout"}
    for name in busy:
        f.set_fault(name, "busy")
    try:
        assert codes(fullpath, busy) == dict.fromkeys(busy, "busy")
    finally:
        for name in busy:
            f.set_fault(name, "none")
    # A single-node error_code() as the other power types use it, for good measure.
    assert error_code(fullpath, "wrongpw-ucsm") == "auth_failed"


@pytest.mark.capability("rsd", "chassis_probe")
@pytest.mark.capability("msftocs", "chassis_probe")
@pytest.mark.capability("ucsm", "chassis_probe")
@pytest.mark.parametrize("power_type", ["rsd", "msftocs", "ucsm"])
def test_probe_through_the_cli(fullpath: FullPath, fleet: tuple[hd.HttpFleet, dict[str, list[Entry]]],
                               power_type: str, tmp_path: Path) -> None:
    check_probe(fullpath, tmp_path, fleet[1][power_type])
