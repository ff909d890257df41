"""wedge, mscm, hmc and fence_cdu (SSH, telnet and SNMP) through the full path, against the
CLI peer of tests/peers/ssh_cli.py and the Sentry3 SNMP agent of tests/peers/snmp_pdu.py,
with the shared checks of tests/fullpath.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fullpath import FullPath, check_probe, error_code, exercise
from tests.peers import snmp_pdu, ssh_cli
from tests.peers.common import free_port

pytestmark = pytest.mark.integration

SNMP_V3 = snmp_pdu.V3User("fpcdu", "sha", "fpcdu-auth-key", "aes", "fpcdu-priv-key")


class Peers:
    """The CLI peer and the Sentry3 SNMP agent, seen as one for exercise()."""

    def __init__(self, workdir: Path) -> None:
        self.cli = ssh_cli.start_peer(workdir, ssh_cli.make_fleet("fpcli"))
        self.snmp = snmp_pdu.PduFleet()
        agent, _ = snmp_pdu.start_pdu(self.snmp, "sentry3", "127.0.0.1", 2, "fp", "fpcdu-snmp",
                                      v3_user=SNMP_V3)
        params = {"power_address": f"127.0.0.1:{agent.port}", "power_protocol": "snmp",
                  "snmp_version": "3", "snmp_user": SNMP_V3.name, "snmp_auth_protocol": "sha",
                  "snmp_auth_key": SNMP_V3.auth_key, "snmp_priv_protocol": "aes",
                  "snmp_priv_key": SNMP_V3.priv_key}
        self.snmp_entries = [{"name": f"fpcdu-snmp-{n}", "power_type": "fence_cdu",
                              "power_parameters": {**params, "power_id": f".A{n}"}} for n in (1, 2)]

    def stop(self) -> None:
        self.cli.stop()
        self.snmp.stop()

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {**self.cli.nodes(), **self.snmp.nodes()}

    def _of(self, name: str) -> Any:
        return self.snmp if name.startswith("fpcdu-snmp") else self.cli

    def set_state(self, name: str, power: str) -> None:
        self._of(name).set_state(name, power)

    def set_fault(self, name: str, fault: str) -> None:
        self._of(name).set_fault(name, fault)

    def reset_counts(self) -> None:
        self.cli.reset_counts()
        self.snmp.reset_counts()

    def entries(self, kind: str) -> list[dict[str, Any]]:
        """Inventory entries; fence_cdu: .A1 over SSH, .A2 over telnet, two over SNMP."""
        if kind == "fence_cdu":
            ssh = ssh_cli.sim_nodes(self.cli, protocol="ssh")["fence_cdu"][0]
            telnet = ssh_cli.sim_nodes(self.cli, protocol="telnet")["fence_cdu"][1]
            return [ssh.inventory_entry(), telnet.inventory_entry(), *self.snmp_entries]
        return [n.inventory_entry() for n in ssh_cli.sim_nodes(self.cli)[kind]]


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    p = Peers(Path(tmp_path_factory.mktemp("fp-ssh-cli")))
    yield p
    p.stop()


@pytest.mark.capability("mscm", "power_query", "pxe_next_boot")
@pytest.mark.capability("hmc", "power_query", "pxe_next_boot")
@pytest.mark.capability("wedge", "power_query")
@pytest.mark.capability("fence_cdu", "power_query")
@pytest.mark.parametrize("kinds", [("mscm", "hmc"), ("wedge", "fence_cdu")])
def test_on_off_cycle_query(fullpath: FullPath, peers: Peers, kinds: tuple[str, ...]) -> None:
    nodes = [e for kind in kinds for e in peers.entries(kind)]
    fullpath.load(nodes)
    exercise(fullpath, peers.nodes, peers.set_state, peers.reset_counts, [n["name"] for n in nodes],
             boot="mscm" in kinds)  # next boot: mscm (bootonce pxe) and hmc (network-all)


@pytest.mark.capability("wedge", "detailed_errors")
@pytest.mark.capability("mscm", "detailed_errors")
@pytest.mark.capability("hmc", "detailed_errors")
@pytest.mark.capability("fence_cdu", "detailed_errors")
def test_error_codes(fullpath: FullPath, peers: Peers) -> None:
    inventory, cases = [], []
    for kind in ("wedge", "mscm", "hmc", "fence_cdu"):
        for first, good in ((peers.entries(kind)[0], peers.entries(kind)[1]),
                            *([(peers.snmp_entries[0], peers.snmp_entries[1])] if kind == "fence_cdu" else [])):
            snmp = "snmp" in good["name"]
            key = "snmp_auth_key" if snmp else "power_pass"
            wrong = {**first, "name": f"{first['name']}-wrongpw",
                     "power_parameters": {**first["power_parameters"], key: "not-the-password"}}
            dead_params = ({"power_address": f"127.0.0.1:{free_port()}"} if snmp
                           else {"power_port": free_port()})
            dead = {**good, "name": f"{good['name']}-dead",
                    "power_parameters": {**good["power_parameters"], **dead_params}}
            inventory += [good, wrong, dead]
            cases.append((good["name"], wrong["name"], dead["name"], snmp))
    fullpath.load(inventory)
    for good, wrong, dead, snmp in cases:
        assert error_code(fullpath, wrong) == "auth_failed", wrong
        assert error_code(fullpath, dead) in (("unreachable", "timeout") if snmp else ("unreachable",)), dead
        peers.set_state(good, "off")
        peers.set_fault(good, "busy")  # CLI: "Too many sessions"; SNMP: genErr to SETs
        try:
            assert error_code(fullpath, good, "on") == "busy", good
        finally:
            peers.set_fault(good, "none")


@pytest.mark.capability("mscm", "chassis_probe")
def test_mscm_probe_through_the_cli(fullpath: FullPath, peers: Peers, tmp_path: Path) -> None:
    check_probe(fullpath, tmp_path, peers.entries("mscm"))
