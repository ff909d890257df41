"""BMC enlistment at the driver level: ``create_user`` of the ipmi and redfish drivers
against their peers (pyghmi's BMC server with a user table, tests/peers/ipmi_bmc.py;
sushy-tools' emulator behind an AccountService, tests/peers/redfish_sim.py).

Each test uses a node of its own (the fleets are shared by the module), so the user
tables do not depend on the order the tests run in.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from drivers.base import PowerDriver, PowerState
from drivers.errors import AuthError, BusyError, PowerError, SettingsError
from drivers.ipmi import IPMIDriver
from drivers.redfish import RedfishDriver
from tests.peers import ipmi_bmc, redfish_sim
from tests.peers.common import SimNode, free_port

ADMIN_PASS = "Adm1n-Enlist-pw"
NEW_PASS = "Xq7vLp2mR9tKw4Zs"  # 16 characters, as `powerq enlist` makes them
OTHER_PASS = "Hb3nWc8yT5eJu1Qa"
USER = "powerq"
# Loopback blocks of this run's own, so that two test runs at once do not meet.
IPMI_BLOCK = f"127.32.{os.getpid() % 250}"
REDFISH_BLOCK = f"127.35.{os.getpid() % 250}"
IPMI_MAX_USERS = 4  # user 1 (null), 2 (admin) and two free ids
REDFISH_MAX_ACCOUNTS = 3  # the admin and two more


# -- fleets -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ipmi_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ipmi_bmc.IpmiFleet]:
    nodes = ipmi_bmc.make_nodes(7, "en", first_address=f"{IPMI_BLOCK}.1", password=ADMIN_PASS,
                                prefix="enlist")
    with ipmi_bmc.start_fleet(nodes, tmp_path_factory.mktemp("enlist-ipmi"),
                              max_users=IPMI_MAX_USERS) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def redfish_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redfish_sim.RedfishFleet]:
    first = f"{REDFISH_BLOCK}.1"
    nodes = redfish_sim.make_nodes(6, "en", first_address=first, port=free_port(first),
                                   password=ADMIN_PASS)
    with redfish_sim.start_fleet(nodes, tmp_path_factory.mktemp("enlist-redfish"),
                                 max_accounts=REDFISH_MAX_ACCOUNTS) as fleet:
        yield fleet


def ipmi_node(fleet: ipmi_bmc.IpmiFleet, index: int) -> SimNode:
    node = fleet.sim_nodes[index]
    fleet.fault(node.name, "none")
    fleet.set_state(node.name, "off")
    return node


def redfish_node(fleet: redfish_sim.RedfishFleet, index: int) -> SimNode:
    node = fleet.sim_nodes[index]
    fleet.fault(node.name, "none")
    fleet.set_state(node.name, "off")
    return node


def make(cls: type[PowerDriver], node: SimNode, **override: Any) -> Any:
    return cls(cls.validate({**node.power_parameters, **override}), timeout=5.0)


def accounts(fleet: Any, node: SimNode) -> dict[str, dict[str, Any]]:
    """The peer's accounts of ``node`` by name."""
    return {a["name"]: a for a in fleet.node(node.name)["accounts"] if a["name"]}


def enlisted_query(cls: type[PowerDriver], node: SimNode, updates: dict[str, Any]) -> PowerState:
    with make(cls, node, **updates) as fresh:
        return fresh.query()


# -- ipmi -------------------------------------------------------------------------------


@pytest.mark.capability("ipmi", "bmc_enlistment")
def test_ipmi_create_user_logs_in_and_controls_power(ipmi_fleet: ipmi_bmc.IpmiFleet) -> None:
    node = ipmi_node(ipmi_fleet, 0)
    with make(IPMIDriver, node) as admin:
        assert admin.query() is PowerState.OFF  # an open session is logged out first
        updates = admin.create_user(USER, NEW_PASS)
    assert updates == {"power_user": USER, "power_pass": NEW_PASS}
    users = accounts(ipmi_fleet, node)
    assert users[USER] == {"uid": 3, "name": USER, "enabled": True, "privilege": "OPERATOR",
                           "ipmi_msg": True}
    assert users["admin"]["privilege"] == "ADMINISTRATOR"
    assert ipmi_fleet.node(node.name)["counts"]["users"] == 4  # name, password, access, enable
    with make(IPMIDriver, node, **updates) as fresh:
        assert fresh.query() is PowerState.OFF
        fresh.power_on()
        assert fresh.query() is PowerState.ON
    assert ipmi_fleet.node(node.name)["power"] == "on"
    assert ipmi_fleet.node(node.name)["counts"]["open_sessions"] == 0


def test_ipmi_created_user_works_with_ipmitool(ipmi_fleet: ipmi_bmc.IpmiFleet) -> None:
    """A second client (ipmitool, lanplus, OPERATOR) logs in with the new account."""
    node = ipmi_node(ipmi_fleet, 1)
    with make(IPMIDriver, node) as admin:
        admin.create_user(USER, NEW_PASS)
    out = subprocess.run(
        ["ipmitool", "-I", "lanplus", "-C", "3", "-L", "OPERATOR", "-H", node.power_parameters["power_address"],
         "-U", USER, "-E", "chassis", "power", "status"],
        env={**os.environ, "IPMI_PASSWORD": NEW_PASS}, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "Chassis Power is off" in out.stdout
    # The account is limited to OPERATOR: ipmitool's ADMINISTRATOR login is refused.
    refused = subprocess.run(
        ["ipmitool", "-I", "lanplus", "-C", "3", "-L", "ADMINISTRATOR", "-H",
         node.power_parameters["power_address"], "-U", USER, "-E", "chassis", "power", "status"],
        env={**os.environ, "IPMI_PASSWORD": NEW_PASS}, capture_output=True, text=True, timeout=30,
    )
    assert refused.returncode != 0


def test_ipmi_rerun_resets_the_same_user(ipmi_fleet: ipmi_bmc.IpmiFleet) -> None:
    node = ipmi_node(ipmi_fleet, 2)
    with make(IPMIDriver, node) as admin:
        admin.create_user(USER, NEW_PASS)
        first = accounts(ipmi_fleet, node)
        updates = admin.create_user(USER, OTHER_PASS)
    assert accounts(ipmi_fleet, node) == first  # same uid, no second slot taken
    assert enlisted_query(IPMIDriver, node, updates) is PowerState.OFF
    with pytest.raises(AuthError) as info:
        enlisted_query(IPMIDriver, node, {"power_user": USER, "power_pass": NEW_PASS})
    assert info.value.code == "auth_failed"


def test_ipmi_privilege_level_sets_the_user_limit(ipmi_fleet: ipmi_bmc.IpmiFleet) -> None:
    node = ipmi_node(ipmi_fleet, 3)
    with make(IPMIDriver, node, privilege_level="USER") as admin:
        updates = admin.create_user(USER, NEW_PASS)
    assert accounts(ipmi_fleet, node)[USER]["privilege"] == "USER"
    with make(IPMIDriver, node, privilege_level="USER", **updates) as fresh:
        assert fresh.query() is PowerState.OFF


def test_ipmi_wrong_admin_password_is_auth_failed(ipmi_fleet: ipmi_bmc.IpmiFleet) -> None:
    node = ipmi_node(ipmi_fleet, 4)
    before = accounts(ipmi_fleet, node)
    with make(IPMIDriver, node, power_pass="not-the-password") as admin, \
            pytest.raises(AuthError) as info:
        admin.create_user(USER, NEW_PASS)
    assert info.value.code == "auth_failed"
    assert accounts(ipmi_fleet, node) == before


def test_ipmi_operator_cannot_create_users(ipmi_fleet: ipmi_bmc.IpmiFleet) -> None:
    """User management needs an ADMINISTRATOR session: an OPERATOR account's is refused."""
    node = ipmi_node(ipmi_fleet, 4)
    with make(IPMIDriver, node) as admin:
        updates = admin.create_user(USER, NEW_PASS)
    with make(IPMIDriver, node, **updates) as operator, pytest.raises(AuthError) as info:
        operator.create_user("another", OTHER_PASS)
    assert info.value.code == "auth_failed"
    assert "another" not in accounts(ipmi_fleet, node)


def test_ipmi_no_free_user_id_is_busy(ipmi_fleet: ipmi_bmc.IpmiFleet) -> None:
    node = ipmi_node(ipmi_fleet, 5)
    with make(IPMIDriver, node) as admin:
        admin.create_user("first", NEW_PASS)
        admin.create_user("second", NEW_PASS)
        full = accounts(ipmi_fleet, node)
        assert len(full) == IPMI_MAX_USERS - 1
        with pytest.raises(BusyError) as info:
            admin.create_user(USER, NEW_PASS)
        assert info.value.code == "busy"
        admin.create_user("second", OTHER_PASS)  # an existing name still resets
    assert accounts(ipmi_fleet, node) == full


def test_ipmi_refuses_bad_names_and_the_admin_itself(ipmi_fleet: ipmi_bmc.IpmiFleet) -> None:
    node = ipmi_node(ipmi_fleet, 6)
    with make(IPMIDriver, node) as admin:
        for name, password in (("admin", NEW_PASS), ("x" * 17, NEW_PASS), (USER, "p" * 21), ("", NEW_PASS)):
            with pytest.raises(SettingsError):
                admin.create_user(name, password)
    assert ipmi_fleet.node(node.name)["counts"]["sessions"] == 0  # refused before any login


# -- redfish ----------------------------------------------------------------------------


def _basic(node: SimNode, method: str, path: str, user: str, password: str,
           body: Any = None) -> tuple[int, Any]:
    """One plain request to the peer with basic authentication."""
    url = node.power_parameters["power_address"] + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            raw = reply.read()
            return reply.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.mark.capability("redfish", "bmc_enlistment")
def test_redfish_create_account_logs_in_and_controls_power(redfish_fleet: redfish_sim.RedfishFleet) -> None:
    node = redfish_node(redfish_fleet, 0)
    with make(RedfishDriver, node) as admin:
        assert admin.query() is PowerState.OFF  # the same session then creates the account
        updates = admin.create_user(USER, NEW_PASS)
    assert updates == {"power_user": USER, "power_pass": NEW_PASS}
    users = accounts(redfish_fleet, node)
    assert users[USER] == {"id": "2", "name": USER, "role": "Operator", "enabled": True, "locked": False}
    assert redfish_fleet.node(node.name)["counts"]["users"] == 1
    with make(RedfishDriver, node, **updates) as fresh:  # a session login as the new account
        fresh.power_on()
        assert fresh.query() is PowerState.ON
    assert redfish_fleet.node(node.name)["power"] == "on"
    status, system = _basic(node, "GET", "/redfish/v1/Systems/" + node.name, USER, NEW_PASS)
    assert status == 200 and system["PowerState"] == "On"  # basic authentication too
    # An Operator cannot manage accounts.
    status, _ = _basic(node, "POST", "/redfish/v1/AccountService/Accounts", USER, NEW_PASS,
                       {"UserName": "x", "Password": OTHER_PASS, "RoleId": "Administrator"})
    assert status == 403
    assert redfish_fleet.node(node.name)["counts"]["open_sessions"] == 0


def test_redfish_rerun_resets_the_same_account(redfish_fleet: redfish_sim.RedfishFleet) -> None:
    node = redfish_node(redfish_fleet, 1)
    with make(RedfishDriver, node) as admin:
        admin.create_user(USER, NEW_PASS)
    first = accounts(redfish_fleet, node)
    # Someone disabled the account and made it read-only in between.
    status, _ = _basic(node, "PATCH", "/redfish/v1/AccountService/Accounts/2", "admin", ADMIN_PASS,
                       {"Enabled": False, "RoleId": "ReadOnly"})
    assert status == 200
    with make(RedfishDriver, node) as admin:
        updates = admin.create_user(USER, OTHER_PASS)
    assert accounts(redfish_fleet, node) == first  # same id, enabled, Operator again
    assert enlisted_query(RedfishDriver, node, updates) is PowerState.OFF
    with pytest.raises(AuthError) as info:
        enlisted_query(RedfishDriver, node, {"power_user": USER, "power_pass": NEW_PASS})
    assert info.value.code == "auth_failed"


def test_redfish_wrong_admin_password_is_auth_failed(redfish_fleet: redfish_sim.RedfishFleet) -> None:
    node = redfish_node(redfish_fleet, 2)
    with make(RedfishDriver, node, power_pass="not-the-password") as admin, \
            pytest.raises(AuthError) as info:
        admin.create_user(USER, NEW_PASS)
    assert info.value.code == "auth_failed"
    assert set(accounts(redfish_fleet, node)) == {"admin"}


def test_redfish_operator_cannot_create_accounts(redfish_fleet: redfish_sim.RedfishFleet) -> None:
    node = redfish_node(redfish_fleet, 2)
    with make(RedfishDriver, node) as admin:
        updates = admin.create_user(USER, NEW_PASS)
    with make(RedfishDriver, node, **updates) as operator, pytest.raises(AuthError) as info:
        operator.create_user("another", OTHER_PASS)
    assert info.value.code == "auth_failed"
    assert "another" not in accounts(redfish_fleet, node)


def test_redfish_no_free_account_is_busy(redfish_fleet: redfish_sim.RedfishFleet) -> None:
    node = redfish_node(redfish_fleet, 3)
    with make(RedfishDriver, node) as admin:
        admin.create_user("first", NEW_PASS)
        admin.create_user("second", NEW_PASS)
        full = accounts(redfish_fleet, node)
        assert len(full) == REDFISH_MAX_ACCOUNTS
        with pytest.raises(BusyError) as info:
            admin.create_user(USER, NEW_PASS)
        assert info.value.code == "busy"
        admin.create_user("second", OTHER_PASS)  # an existing name still resets
    assert accounts(redfish_fleet, node) == full


def test_redfish_refused_password_is_device_error_without_the_password(
        redfish_fleet: redfish_sim.RedfishFleet) -> None:
    node = redfish_node(redfish_fleet, 4)
    too_long = NEW_PASS + "-and-more-than-20"
    with make(RedfishDriver, node) as admin, pytest.raises(PowerError) as info:
        admin.create_user(USER, too_long)
    assert info.value.code == "device_error"
    assert too_long not in str(info.value) and too_long not in json.dumps(info.value.to_dict())
    with make(RedfishDriver, node) as admin, pytest.raises(SettingsError):
        admin.create_user("admin", NEW_PASS)
    assert set(accounts(redfish_fleet, node)) == {"admin"}


# -- secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ipmi", "redfish"])
def test_the_new_password_never_shows(kind: str, request: pytest.FixtureRequest) -> None:
    if kind == "ipmi":
        fleet: Any = request.getfixturevalue("ipmi_fleet")
        cls: type[PowerDriver] = IPMIDriver
    else:
        fleet = request.getfixturevalue("redfish_fleet")
        cls = RedfishDriver
    node = fleet.sim_nodes[-1]
    fleet.fault(node.name, "none")
    seen: list[str] = []
    with make(cls, node) as admin:
        updates = admin.create_user(USER, NEW_PASS)
        seen += [repr(admin), repr(admin.settings), str(admin.settings)]
        fleet.fault(node.name, "auth")
        try:
            with pytest.raises(AuthError) as info:
                admin.create_user(USER, OTHER_PASS)
        finally:
            fleet.fault(node.name, "none")
        seen += [str(info.value), repr(info.value), json.dumps(info.value.to_dict())]
    fresh = make(cls, node, **updates)
    seen += [repr(fresh), repr(fresh.settings), str(fresh.settings)]
    fresh.close()
    seen.append(json.dumps(fleet.nodes()))  # the control API
    for password in (NEW_PASS, OTHER_PASS):
        assert not any(password in text for text in seen)
    assert USER in json.dumps(fleet.nodes())

