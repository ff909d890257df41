"""virsh through the full path, and `powerq probe` of a libvirt hypervisor: the entries it
writes load as they are and drive the domains."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.fullpath import FullPath, error_code, exercise
from tests.peers.libvirt_sim import LibvirtFleet, make_nodes, start_fleet

pytestmark = pytest.mark.integration

SECRET = "virsh-Probe-Pass-7"


@pytest.fixture(scope="module")
def hypervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtFleet]:
    with start_fleet(make_nodes(3, "fp", prefix="fpvm"), tmp_path_factory.mktemp("fp-virsh")) as running:
        yield running


@pytest.mark.capability("virsh", "power_query", "pxe_next_boot", "detailed_errors")
def test_virsh_on_off_cycle_query_boot(fullpath: FullPath, hypervisor: LibvirtFleet) -> None:
    entries = hypervisor.inventory()
    fullpath.load(entries)
    names = [e["name"] for e in entries]
    exercise(fullpath, hypervisor.nodes, hypervisor.set_state, hypervisor.reset, names, boot=True)
    dead = {**entries[0], "name": "deadvm",
            "power_parameters": {**entries[0]["power_parameters"],
                                 "power_address": "test+unix:///default?socket=/nonexistent/sock"}}
    fullpath.load([entries[0], dead])
    assert error_code(fullpath, "deadvm") == "unreachable"
    missing = {**entries[0], "name": "ghost",
               "power_parameters": {**entries[0]["power_parameters"], "power_id": "no-such-domain"}}
    fullpath.load([missing])
    assert error_code(fullpath, "ghost") == "not_found"


@pytest.mark.capability("virsh", "detailed_errors")
def test_virsh_password_errors(fullpath: FullPath, hypervisor: LibvirtFleet) -> None:
    """Through libvirtd's SASL-protected TCP listener: the right password works, a wrong
    one is auth_failed, and so is the right one while the peer's auth fault holds.
    libvirt has no busy reply to test (see tests/peers/libvirt_sim.py)."""
    if hypervisor.tcp_uri is None:
        pytest.fail("the fleet has no TCP listener: saslpasswd2 (sasl2-bin) is missing; "
                    "make test installs it")
    first, second = (n.name for n in hypervisor.sim_nodes[:2])
    good = hypervisor.tcp_entry(first)
    wrong = {**hypervisor.tcp_entry(second, "not-the-virsh-password"), "name": "virsh-wrongpw"}
    fullpath.load([good, wrong])
    hypervisor.set_state(first, "on")
    job = fullpath.run("query", first)
    assert job["by_node"][first]["outcome"] == "ok", job["by_node"][first]
    assert job["by_node"][first]["state_after"] == "on"
    assert error_code(fullpath, "virsh-wrongpw") == "auth_failed"
    hypervisor.fault(first, "auth")
    try:
        assert error_code(fullpath, first) == "auth_failed"
    finally:
        hypervisor.fault(first, "none")
    assert fullpath.run("query", first)["by_node"][first]["outcome"] == "ok"


@pytest.mark.capability("virsh", "chassis_probe")
def test_probe_writes_entries_that_load_and_work(fullpath: FullPath, hypervisor: LibvirtFleet,
                                                 tmp_path: Path) -> None:
    uri = hypervisor.inventory()[0]["power_parameters"]["power_address"]
    out = tmp_path / "probed.yaml"
    run = fullpath.pq("probe", "virsh", "-p", f"power_address={uri}", "-p", f"power_pass={SECRET}",
                      "--rack", "fp", "--prefix", "hv1-", "--out", str(out), "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    peers = hypervisor.nodes()
    assert {m["probed_as"]: m["power"] for m in report["machines"]} == {n: p["power"] for n, p in peers.items()}
    assert SECRET not in run.stdout and SECRET not in out.read_text()
    secrets_file = tmp_path / "probed.secrets.yaml"
    assert stat.S_IMODE(os.stat(secrets_file).st_mode) == 0o600
    assert SECRET in yaml.safe_load(secrets_file.read_text()).values()
    doc = yaml.safe_load(out.read_text())
    assert sorted(n["name"] for n in doc["nodes"]) == sorted(f"hv1-{n}" for n in peers)
    load = fullpath.pq("inventory", "load", str(out))
    assert load.returncode == 0, load.stdout + load.stderr
    job = fullpath.run("query", "@all")
    for name, peer in peers.items():
        assert job["by_node"][f"hv1-{name}"]["state_after"] == peer["power"]


def test_probe_refuses_bad_input_before_touching_anything(fullpath: FullPath) -> None:
    no_address = fullpath.pq("probe", "virsh", "-p", "power_pass=x")
    assert no_address.returncode == 2 and "power_address" in no_address.stderr
    not_a_pair = fullpath.pq("probe", "virsh", "-p", "power_address")
    assert not_a_pair.returncode == 2 and "KEY=VALUE" in not_a_pair.stderr
    no_probe = fullpath.pq("probe", "manual")
    assert no_probe.returncode == 2 and "no chassis" in no_probe.stderr
    unknown = fullpath.pq("probe", "no-such-type", "-p", "a=b")
    assert unknown.returncode == 2 and "unknown power type" in unknown.stderr
