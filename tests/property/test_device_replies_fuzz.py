"""Real drivers against devices that answer with garbage: hypothesis-generated HTTP
replies (Redfish and the other HTTP power types), SNMP values of the wrong type, and
garbage or truncated RMCP+ packets to pyghmi. A driver call returns normally or raises
a :class:`PowerError` subclass (device_error, timeout, unreachable...), never anything
else, and never runs much past its timeout."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from drivers import registry
from drivers.base import BootDevice, PowerDriver, PowerState
from drivers.errors import PowerError
from tests.property.conftest import examples
from tests.property.strategies import json_values

TIMEOUT = 0.6
"""Each driver call's timeout: small, so that stalls cost little."""
SECRET = "ZkDevPass01Qx"


def bounded(call: Callable[[], Any], limit: float) -> str:
    """Run one driver call: it returns or raises a PowerError within ``limit`` seconds.
    Returns what happened, for hypothesis' statistics."""
    started = time.monotonic()
    try:
        result = call()
    except PowerError as exc:
        assert SECRET not in f"{exc.message} {exc.details!r}", exc.message
        outcome = exc.code
    else:
        assert result is None or isinstance(result, PowerState | list | dict), result
        outcome = "ok"
    took = time.monotonic() - started
    assert took < limit, f"the call took {took:.1f}s (limit {limit:.1f}s), ending in {outcome}"
    return outcome


OPERATIONS: dict[str, Callable[[PowerDriver], Any]] = {
    "query": lambda d: d.query(),
    "on": lambda d: d.power_on(),
    "off": lambda d: d.power_off(),
    "soft_off": lambda d: d.power_off(soft=True),
    "cycle": lambda d: d.power_cycle(),
    "boot": lambda d: d.set_boot_device(BootDevice.PXE, efi=True),
}


# --------------------------------------------------------------------------- HTTP


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    short: bool = False
    """Announce more bytes than sent, then close (a truncated reply)."""
    stall: bool = False
    """Send nothing until the client gives up."""
    location: str | None = None


class GarbageServer:
    """An HTTP server of the test's own that answers the n-th request with the n-th
    generated reply (the last one again once they run out)."""

    def __init__(self) -> None:
        self.replies: list[Reply] = [Reply(200, "application/json", b"{}")]
        self.count = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(min(length, 1 << 20))
                with outer.lock:
                    reply = outer.replies[min(outer.count, len(outer.replies) - 1)]
                    outer.count += 1
                if reply.stall:
                    time.sleep(TIMEOUT * 2)
                    self.close_connection = True
                    return
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(reply.body) + (10 if reply.short else 0)))
                    if reply.location is not None:
                        self.send_header("Location", reply.location)
                    self.send_header("X-Auth-Token", "tok")
                    self.send_header("X-Subject-Token", "tok")
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if reply.short:
                    self.close_connection = True

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, replies: list[Reply]) -> None:
        with self.lock:
            self.replies = replies or [Reply(200, "application/json", b"{}")]
            self.count = 0

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def http() -> Iterator[GarbageServer]:
    server = GarbageServer()
    yield server
    server.stop()


def http_params(url: str, port: int) -> dict[str, dict[str, Any]]:
    auth = {"power_user": "admin", "power_pass": SECRET}
    return {
        "redfish": {"power_address": url, **auth, "node_id": "1"},
        "openbmc": {"power_address": url, **auth},
        "dli": {"power_address": url, **auth, "outlet_id": 1},
        "rsd": {"power_address": url, **auth, "node_id": "1"},
        "ucsm": {"power_address": url + "/", **auth, "uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"},
        "msftocs": {"power_address": "127.0.0.1", "power_port": port, **auth, "blade_id": 1},
        "amt": {"power_address": f"127.0.0.1:{port}", "power_pass": SECRET},
        "webhook": {"power_on_uri": url + "/on", "power_off_uri": url + "/off",
                    "power_query_uri": url + "/q", **auth},
        "nova": {"os_authurl": url + "/v3", "os_username": "a", "os_password": SECRET,
                 "os_tenantname": "t", "nova_id": "x"},
    }


REDFISH_KEYS = ["@odata.id", "Id", "Members", "Systems", "PowerState", "Actions", "Boot",
                "SessionService", "Sessions", "#ComputerSystem.Reset", "target",
                "ResetType@Redfish.AllowableValues", "BootSourceOverrideTarget", "Links",
                "RedfishVersion", "UUID", "Name", "Oem", "error", "token", "state", "Status",
                "status", "value", "data", "power", "outlets", "server", "project", "catalog"]

json_docs = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
              st.text(max_size=12), st.sampled_from(["On", "Off", "PoweringOn", "/redfish/v1/Systems/1",
                                                     "/redfish/v1", "", "running", "stopped"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(REDFISH_KEYS), st.text(max_size=8)), inner,
                        max_size=6),
    ),
    max_leaves=20,
)
xml_bodies = st.one_of(
    st.sampled_from([b"<", b"<a>", b"<?xml version='1.0'?><a><b>1</b></a>", b"<a/><b/>",
                     b"<!DOCTYPE a [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><a>&e;</a>",
                     b"<!DOCTYPE a [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;&a;'>]><a>&b;</a>",
                     b"<s:Envelope xmlns:s='http://www.w3.org/2003/05/soap-envelope'><s:Body>"
                     b"<x>2</x></s:Body></s:Envelope>",
                     b"<configResolveClass><outConfigs><computeBlade operPower='on'/>"
                     b"</outConfigs></configResolveClass>", b"<aaaLogin outCookie=''/>"]),
    st.text(max_size=40).map(lambda t: f"<a x='{t}'>{t}</a>".encode("utf-8", "replace")),
)
bodies = st.one_of(
    json_docs.map(lambda d: json.dumps(d).encode()),
    json_docs.map(lambda d: json.dumps(d).encode()[: max(0, len(json.dumps(d)) // 2)]),
    json_values.map(lambda d: json.dumps(d).encode()),
    xml_bodies,
    st.binary(max_size=64),
    st.sampled_from([b"", b"null", b"[]", b"{}", b"\xff\xfe", b"on", b"off", b"1", b"0",
                     b"status: running", b"<<<garbage", b"{" * 5000, b"x" * 100_000]),
)
statuses = st.one_of(st.sampled_from([200, 200, 200, 201, 202, 204, 301, 302, 400, 401, 403,
                                      404, 405, 409, 412, 429, 500, 501, 503, 504]),
                     st.integers(100, 599))
replies = st.builds(
    Reply,
    status=statuses,
    content_type=st.sampled_from(["application/json", "text/xml", "application/soap+xml",
                                  "text/plain", "text/html", "application/octet-stream", ""]),
    body=bodies,
    short=st.integers(0, 5).map(lambda n: n == 0),
    stall=st.integers(0, 40).map(lambda n: n == 0),
    location=st.one_of(st.none(), st.sampled_from(["/redfish/v1/SessionService/Sessions/1",
                                                   "http://127.0.0.1:1/x", "::", ""])),
)

HTTP_TYPES = ["redfish", "openbmc", "dli", "rsd", "ucsm", "msftocs", "amt", "webhook", "nova"]


@pytest.mark.parametrize("power_type", HTTP_TYPES)
@settings(max_examples=examples(0.25))
@given(script=st.lists(replies, min_size=1, max_size=6), op=st.sampled_from(sorted(OPERATIONS)))
def test_http_devices_answering_garbage(http: GarbageServer, power_type: str, script: list[Reply],
                                        op: str) -> None:
    cls = registry.get(power_type)
    params = http_params(http.url, http.port)[power_type]
    http.serve(script)
    driver = cls(cls.validate(params), timeout=TIMEOUT)
    try:
        # Each call may take a few requests (login, find the system, act): each one is
        # bounded by the timeout; a stalled one costs one timeout.
        event(bounded(lambda: OPERATIONS[op](driver), limit=TIMEOUT * 8 + 2))
    finally:
        started = time.monotonic()
        driver.close()  # never raises, and does not hang either
        assert time.monotonic() - started < TIMEOUT * 4 + 1


# --------------------------------------------------------------------------- SNMP


def snmp_values() -> st.SearchStrategy[Any]:
    """Values of every SNMP type, and of the wrong one for an outlet state."""
    from pyasn1.type import univ
    from pysnmp.proto import rfc1902, rfc1905

    return st.one_of(
        st.integers(-(2**31), 2**31 - 1).map(rfc1902.Integer32),
        st.binary(max_size=16).map(rfc1902.OctetString),
        st.integers(0, 2**32 - 1).map(rfc1902.Counter32),
        st.integers(0, 2**32 - 1).map(rfc1902.Gauge32),
        st.integers(0, 2**32 - 1).map(rfc1902.TimeTicks),
        st.integers(0, 2**64 - 1).map(rfc1902.Counter64),
        st.binary(min_size=4, max_size=4).map(rfc1902.IpAddress),
        st.lists(st.integers(0, 2**16), min_size=2, max_size=6).map(
            lambda xs: rfc1902.ObjectIdentifier([1, 3, *xs])),
        st.just(univ.Null("")),
        st.sampled_from([rfc1905.noSuchObject, rfc1905.noSuchInstance, rfc1905.endOfMibView]),
    )


@pytest.fixture(scope="module")
def pdus() -> Iterator[dict[str, Any]]:
    from tests.peers.snmp_pdu import PduFleet, start_pdu

    fleet = PduFleet()
    out: dict[str, Any] = {}
    try:
        for vendor in ("apc_rpdu", "eaton", "raritan"):
            agent, nodes = start_pdu(fleet, vendor, "127.0.0.1", 2, "rs", f"fz-{vendor}")
            for node in nodes:
                fleet.set_fault(node.name, "garbage")
            out[nodes[0].power_type] = (agent, nodes[0])
        yield out
    finally:
        fleet.stop()


@pytest.mark.parametrize("power_type", ["apc", "eaton", "raritan"])
@settings(max_examples=examples(0.25))
@given(data=st.data(), op=st.sampled_from(["query", "on", "off", "cycle"]))
def test_snmp_pdus_answering_wrong_types(pdus: dict[str, Any], power_type: str,
                                         data: st.DataObject, op: str) -> None:
    """The outlet's state reads answer a value of any SNMP type (the peer's ``garbage``
    fault, with the value generated here)."""
    from pysnmp.proto import rfc1902

    agent, node = pdus[power_type]
    value = data.draw(snmp_values(), label="state value")
    original = type(agent).read

    def read(oid: tuple[int, ...]) -> Any:
        got = original(agent, oid)
        if isinstance(got, rfc1902.OctetString) and bytes(got) == b"\xff?":
            return value
        return got

    agent.read = read
    try:
        cls = registry.get(power_type)
        with cls(cls.validate(node.power_parameters), timeout=TIMEOUT) as driver:
            event(bounded(lambda: OPERATIONS[op](driver), limit=TIMEOUT * 8 + 2))
    finally:
        del agent.read


# --------------------------------------------------------------------------- IPMI


class UdpGarbage:
    """A UDP socket of the test's own standing in for a BMC: it answers the n-th packet
    with the n-th generated reply (``None``: no answer), or, given ``upstream``, relays
    to a real (simulated) BMC and damages the replies chosen by ``damage``."""

    def __init__(self, replies: list[bytes | None] | None = None,
                 upstream: tuple[str, int] | None = None,
                 damage: Callable[[int, bytes], bytes | None] | None = None) -> None:
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.port = self.front.getsockname()[1]
        self.replies = replies or []
        self.upstream = upstream
        self.damage = damage
        self.back: socket.socket | None = None
        if upstream is not None:
            self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.back.connect(upstream)
        self.client: Any = None
        self.count = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import select

        socks = [self.front] + ([self.back] if self.back is not None else [])
        while self.running:
            ready, _, _ = select.select(socks, [], [], 0.05)
            for sock in ready:
                try:
                    data, addr = sock.recvfrom(65536)
                except OSError:
                    continue
                if sock is self.front:
                    self.client = addr
                    if self.back is not None:
                        self.back.send(data)
                        continue
                    reply = self.replies[self.count % len(self.replies)] if self.replies else None
                    self.count += 1
                else:
                    assert self.damage is not None
                    reply = self.damage(self.count, data)
                    self.count += 1
                if reply is not None and self.client is not None:
                    try:
                        self.front.sendto(reply, self.client)
                    except OSError:
                        pass

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.front.close()
        if self.back is not None:
            self.back.close()


IPMI_FLOOR = 6.0
"""pyghmi's shortest login retry schedule (about 5.6 s for a BMC that never answers
usefully), which the ipmi driver cannot shorten below: its calls are bounded by
``max(timeout, IPMI_FLOOR)``. Known, and reported: a call timeout under ~6 s is not kept
by the ipmi power type while logging in."""

RMCP = b"\x06\x00\xff\x07"
ipmi_garbage = st.one_of(
    st.none(),
    st.binary(max_size=80),
    st.binary(max_size=60).map(lambda b: RMCP + b),
    st.binary(max_size=40).map(lambda b: RMCP + b"\x06" + b),  # RMCP+ (auth type 6)
    st.binary(max_size=40).map(lambda b: RMCP + b"\x06\x11" + b),  # open session reply
    st.binary(max_size=40).map(lambda b: RMCP + b"\x06\x13" + b),  # RAKP 2
    st.binary(max_size=40).map(lambda b: RMCP + b"\x00" + b),  # IPMI 1.5
    st.sampled_from([RMCP, RMCP + b"\x06", b"\x06\x00\xff\x06", b"", b"\x00" * 2000]),
)


def ipmi_params(port: int) -> dict[str, Any]:
    return {"power_address": "127.0.0.1", "power_port": port, "power_user": "admin",
            "power_pass": SECRET}


# Under chaos: 200, not 10,000. An example takes ~3.9 s on average (measured; most wait out
# pyghmi's ~6 s login retries), so 10,000 would take ~11 hours; 200 take ~13 min. powerq's own
# RMCP+ client, the workers' default, gets 10,000 per step in test_rmcp_fuzz.py.
@settings(max_examples=examples(0.05, least=3, chaos_cap=200))
@given(replies=st.lists(ipmi_garbage, min_size=1, max_size=6),
       op=st.sampled_from(["query", "on", "cycle", "boot"]))
def test_ipmi_bmc_sending_garbage(replies: list[bytes | None], op: str) -> None:
    """Whatever comes back to pyghmi (random bytes, RMCP headers with junk, truncated
    RMCP+ session packets, silence) is a PowerError within the timeout."""
    cls = registry.get("ipmi")
    bmc = UdpGarbage(replies)
    try:
        with cls(cls.validate(ipmi_params(bmc.port)), timeout=TIMEOUT) as driver:
            event(bounded(lambda: OPERATIONS[op](driver), limit=IPMI_FLOOR + 2))
    finally:
        bmc.close()


@pytest.fixture(scope="module")
def ipmi_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, str]]:
    import os

    from tests.peers.ipmi_bmc import make_nodes, start_fleet

    address = f"127.33.{os.getpid() % 250}.1"
    nodes = make_nodes(1, "rf", first_address=address, password="ipmi-Fuzz-pass", prefix="fz")
    with start_fleet(nodes, tmp_path_factory.mktemp("ipmi-fuzz"), session_timeout=2.0):
        params = nodes[0].power_parameters
        yield params["power_address"], int(params.get("power_port") or 623), "ipmi-Fuzz-pass"


damages = st.tuples(
    st.integers(0, 12),  # which reply of the session
    st.sampled_from(["truncate", "flip", "replace", "drop", "extend"]),
    st.integers(0, 200),
    st.binary(min_size=1, max_size=24),
)


# Under chaos: 500, not 10,000. An example takes ~0.9 s on average (measured: a real pyghmi
# login to the simulated BMC, and pyghmi's retries after a damaged reply), so 10,000 would
# take ~2.5 hours; 500 take ~8 min.
@settings(max_examples=examples(0.1, chaos_cap=500))
@given(plan=st.lists(damages, min_size=1, max_size=3),
       op=st.sampled_from(["query", "on", "cycle", "boot"]))
def test_ipmi_real_session_with_damaged_replies(ipmi_peer: tuple[str, int, str],
                                                plan: list[tuple[int, str, int, bytes]],
                                                op: str) -> None:
    """A real RMCP+ session with a simulated BMC, some of whose replies are truncated,
    bit-flipped, replaced, dropped or extended on the way to pyghmi."""
    address, port, password = ipmi_peer

    def damage(n: int, data: bytes) -> bytes | None:
        for which, how, at, junk in plan:
            if which != n:
                continue
            at = at % (len(data) + 1)
            if how == "truncate":
                data = data[:at]
            elif how == "flip":
                data = data[:at] + bytes(b ^ 0xFF for b in junk[:1]) + data[at + 1:]
            elif how == "replace":
                data = junk
            elif how == "drop":
                return None
            else:
                data = data + junk
        return data

    relay = UdpGarbage(upstream=(address, port), damage=damage)
    cls = registry.get("ipmi")
    params = {**ipmi_params(relay.port), "power_pass": password}
    try:
        with cls(cls.validate(params), timeout=TIMEOUT) as driver:
            event(bounded(lambda: OPERATIONS[op](driver), limit=2 * IPMI_FLOOR + 2))
    finally:
        relay.close()
