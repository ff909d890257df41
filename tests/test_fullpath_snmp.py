"""The SNMP PDU power types (apc, eaton, raritan) through the full path:
CLI -> Redis -> rack worker -> drivers/snmp.py -> the pysnmp PDU agents of
tests/peers/snmp_pdu.py, with the shared checks of tests/fullpath.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fullpath import FullPath, error_code, exercise
from tests.peers.common import SimNode
from tests.peers.snmp_pdu import PduAgent, PduFleet, V3User, start_pdu

pytestmark = pytest.mark.integration

COMMUNITY = "fp-pdu-community"
USER = V3User("fpops", "sha", "fp-auth-key-1", "aes", "fp-priv-key-1")


@dataclass
class Pdus:
    fleet: PduFleet
    agents: dict[str, PduAgent]
    nodes: dict[str, list[SimNode]]


@pytest.fixture(scope="module")
def pdus() -> Iterator[Pdus]:
    fleet = PduFleet()
    agents: dict[str, PduAgent] = {}
    nodes: dict[str, list[SimNode]] = {}
    layout = [  # kind, vendor, address, outlets, v3?
        ("apc", "apc_rpdu", "127.31.0.11", 2, False),
        ("apc_ms", "apc_masterswitch", "127.31.0.12", 1, True),
        ("eaton", "eaton", "127.31.0.13", 2, False),
        ("raritan", "raritan", "127.31.0.14", 2, True),
    ]
    for kind, vendor, address, count, v3 in layout:
        agent, sims = start_pdu(fleet, vendor, address, count, "fp", f"fp{kind.replace('_', '')}",
                                community=COMMUNITY, v3_user=USER, use_v3=v3)
        # Every agent accepts the v3 user too, so every type can be given a wrong key.
        agents[kind], nodes[kind] = agent, sims
    yield Pdus(fleet, agents, nodes)
    fleet.stop()


@pytest.mark.capability("apc", "power_query")
@pytest.mark.capability("eaton", "power_query")
@pytest.mark.capability("raritan", "power_query")
def test_snmp_pdus_on_off_cycle_query(fullpath: FullPath, pdus: Pdus) -> None:
    everyone = [n for sims in pdus.nodes.values() for n in sims]
    assert {n.power_type for n in everyone} == {"apc", "eaton", "raritan"}
    fullpath.load(n.inventory_entry() for n in everyone)
    # One exercise over the outlets of all four PDUs (apc RPDU v1 + MasterSwitch v3, eaton
    # v2c, raritan v3): every job carries every power type, each node checked on its own.
    exercise(fullpath, pdus.fleet.nodes, pdus.fleet.set_state, pdus.fleet.reset_counts,
             [n.name for n in everyone])


def _v3(entry: dict[str, Any], name: str, **changes: Any) -> dict[str, Any]:
    params = {k: v for k, v in entry["power_parameters"].items()
              if k not in ("community", "snmp_version") and not k.startswith("snmp_")}
    params.update({"snmp_version": "3", "snmp_user": USER.name,
                   "snmp_auth_protocol": USER.auth_protocol, "snmp_auth_key": USER.auth_key,
                   "snmp_priv_protocol": USER.priv_protocol, "snmp_priv_key": USER.priv_key,
                   **changes})
    return {**entry, "name": name, "power_parameters": params}


@pytest.mark.capability("apc", "detailed_errors")
@pytest.mark.capability("eaton", "detailed_errors")
@pytest.mark.capability("raritan", "detailed_errors")
def test_snmp_pdu_error_codes(fullpath: FullPath, pdus: Pdus) -> None:
    firsts = {"apc": pdus.nodes["apc"][0], "eaton": pdus.nodes["eaton"][0],
              "raritan": pdus.nodes["raritan"][0]}
    entries = []
    for power_type, node in firsts.items():
        good = node.inventory_entry()
        entries += [
            good,
            _v3(good, f"{power_type}-wrongkey", snmp_auth_key="not-the-auth-key", node_outlet=2),
            {**good, "name": f"{power_type}-noname", "power_parameters": {
                **good["power_parameters"], "power_address": "no-such-pdu.invalid"}},
        ]
    # Nothing listens there: UDP gets no answer, so the code is timeout (one type is enough:
    # each costs the call timeout times the attempts).
    silent = firsts["raritan"].inventory_entry()
    entries.append({**silent, "name": "raritan-dead", "power_parameters": {
        **silent["power_parameters"], "power_address": "127.31.9.9"}})
    fullpath.load(entries)

    for names, wanted in (([f"{t}-wrongkey" for t in firsts], {"auth_failed"}),
                          ([f"{t}-noname" for t in firsts], {"unreachable"}),
                          (["raritan-dead"], {"timeout", "unreachable"})):
        job = fullpath.run("query", ",".join(names))
        for name in names:
            result = job["by_node"][name]
            assert result["outcome"] == "error", result
            assert result["error"]["code"] in wanted, result
            assert USER.auth_key not in str(result) and "not-the-auth-key" not in str(result)

    for node in firsts.values():
        pdus.fleet.set_state(node.name, "off")
        pdus.fleet.set_fault(node.name, "busy")
    try:
        for node in firsts.values():
            assert error_code(fullpath, node.name, "on") == "busy"
            assert pdus.fleet.nodes()[node.name]["power"] == "off"
    finally:
        for node in firsts.values():
            pdus.fleet.set_fault(node.name, "none")
