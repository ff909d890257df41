"""Switched PDUs as SNMP agents, built on pysnmp's command responder.

One :class:`PduAgent` per PDU: its own pysnmp engine, UDP socket (a loopback address such
as ``127.31.0.N``, port 161 or a free port), v1/v2c community and SNMPv3 user (real USM:
a wrong auth key gets pysnmp's ``wrongDigest`` report, an unknown user ``unknownUserName``).
A custom MIB instrumentation couples each outlet's command object to its state object, per
vendor MIB (:data:`SCHEMES`):

- ``apc_rpdu`` PowerNet-MIB rPDUOutletControlOutletCommand ``1.3.6.1.4.1.318.1.1.12.3.3.1.1.4.<n>``
  (write 1 on, 2 off, 3 reboot; reads back 1 on / 2 off) and rPDUOutletStatusOutletState
  ``…318.1.1.12.3.5.1.1.4.<n>``.
- ``apc_masterswitch`` PowerNet-MIB sPDUOutletCtl ``1.3.6.1.4.1.318.1.1.4.4.2.1.3.<n>`` (same values).
- ``eaton`` EATON-EPDU-MIB outletControlTable ``1.3.6.1.4.1.534.6.6.7.6.6.1.<col>.<unit>.<n>``:
  column 2 outletControlStatus (0 off, 1 on), 3 OffCmd, 4 OnCmd, 5 RebootCmd (write a delay in
  seconds, 0 = now, -1 = cancel; they read back -1).
- ``raritan`` PDU2-MIB switchingOperation ``1.3.6.1.4.1.13742.6.4.1.2.1.2.<pdu>.<n>`` (write 0 off,
  1 on, 2 cycle), outletSwitchingState ``…13742.6.4.1.2.1.3.<pdu>.<n>`` and
  measurementsOutletSensorState ``1.3.6.1.4.1.13742.6.5.4.3.1.3.<pdu>.<n>.14`` (onOff sensor:
  7 on, 8 off).
- ``sentry3`` Sentry3-MIB outletControlAction ``1.3.6.1.4.1.1718.3.2.3.1.11.<tower>.<infeed>.<n>``
  (write 1 on, 2 off, 3 reboot; reads 0 none) and outletStatus ``…1718.3.2.3.1.5.<t>.<i>.<n>``
  (0 off, 1 on).

Every outlet is one simulated node in the control API (:func:`tests.peers.common.serve_control`):
counts ``on`` / ``off`` / ``cycle`` (commands received) and ``query`` (reads of the
outlet's state), and the faults:

- ``no_answer`` — requests naming the outlet are dropped; ``slow`` — answered ``latency`` s late;
- ``auth`` — SNMPv3 requests get error-status authorizationError (the agent refuses the
  user); v1/v2c requests are dropped, as agents do with a community they do not accept;
- ``busy`` — SETs get error-status genErr; ``garbage`` — state reads return a string;
- ``powering`` — commands are accepted and counted but the state does not change.

Objects that do not exist answer noSuchInstance (noSuchName with SNMPv1).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.peers.common import SimNode, serve_control

ON, OFF = "on", "off"


@dataclass(frozen=True)
class Scheme:
    """How one vendor MIB maps outlet commands and state onto OIDs."""

    name: str
    index_len: int
    """Number of index sub-identifiers after a column (outlet, unit.outlet, ...)."""
    command_columns: dict[str, dict[int, str]]
    """Writable column OID -> {written value: action (on/off/cycle)}."""
    state_columns: dict[str, dict[str, int]]
    """Readable column OID -> {power state: value read}; reads count as ``query``."""
    command_readback: dict[str, int | None] = field(default_factory=dict)
    """What a command column reads back: a fixed value, or None for the state value."""
    index_suffix: tuple[int, ...] = ()
    """Sub-identifiers after the index (Raritan's sensor type)."""


APC_RPDU_CMD = "1.3.6.1.4.1.318.1.1.12.3.3.1.1.4"
APC_RPDU_STATE = "1.3.6.1.4.1.318.1.1.12.3.5.1.1.4"
APC_MS_CTL = "1.3.6.1.4.1.318.1.1.4.4.2.1.3"
EATON_TABLE = "1.3.6.1.4.1.534.6.6.7.6.6.1"
RARITAN_OP = "1.3.6.1.4.1.13742.6.4.1.2.1.2"
RARITAN_STATE = "1.3.6.1.4.1.13742.6.4.1.2.1.3"
RARITAN_SENSOR = "1.3.6.1.4.1.13742.6.5.4.3.1.3"
SENTRY3_CTL = "1.3.6.1.4.1.1718.3.2.3.1.11"
SENTRY3_STATUS = "1.3.6.1.4.1.1718.3.2.3.1.5"

_APC_CMD = {1: ON, 2: OFF, 3: "cycle"}
_APC_READ = {ON: 1, OFF: 2}

SCHEMES: dict[str, list[Scheme]] = {
    "apc_rpdu": [
        Scheme("apc_rpdu", 1, {APC_RPDU_CMD: _APC_CMD}, {APC_RPDU_STATE: _APC_READ},
               {APC_RPDU_CMD: None}),
    ],
    "apc_masterswitch": [
        Scheme("apc_masterswitch", 1, {APC_MS_CTL: _APC_CMD}, {}, {APC_MS_CTL: None}),
    ],
    "eaton": [
        Scheme("eaton", 2,
               {f"{EATON_TABLE}.3": {0: OFF}, f"{EATON_TABLE}.4": {0: ON},
                f"{EATON_TABLE}.5": {0: "cycle"}},
               {f"{EATON_TABLE}.2": {ON: 1, OFF: 0}},
               {f"{EATON_TABLE}.{c}": -1 for c in (3, 4, 5)}),
    ],
    "raritan": [
        Scheme("raritan", 2, {RARITAN_OP: {0: OFF, 1: ON, 2: "cycle"}},
               {RARITAN_STATE: {ON: 7, OFF: 8}}, {RARITAN_OP: None}),
        Scheme("raritan_sensor", 2, {}, {RARITAN_SENSOR: {ON: 7, OFF: 8}}, {}, (14,)),
    ],
    "sentry3": [
        Scheme("sentry3", 3, {SENTRY3_CTL: {1: ON, 2: OFF, 3: "cycle"}},
               {SENTRY3_STATUS: {ON: 1, OFF: 0}}, {SENTRY3_CTL: 0}),
    ],
}
"""Vendor -> the MIB schemes its agent serves."""

# The value a command column reads back when it mirrors the state (APC, Raritan).
_READBACK_STATE = {APC_RPDU_CMD: _APC_READ, APC_MS_CTL: _APC_READ, RARITAN_OP: {ON: 1, OFF: 0}}


@dataclass
class Outlet:
    """One outlet = one simulated node."""

    name: str
    index: tuple[int, ...]
    power: str = OFF
    fault: str = "none"
    latency: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1


@dataclass
class V3User:
    """An SNMPv3 USM user the agent accepts (protocol names as in drivers/snmp.py)."""

    name: str
    auth_protocol: str = "sha"
    auth_key: str = ""
    priv_protocol: str = "aes"
    priv_key: str = ""


class PduAgent:
    """One PDU: an SNMP engine on ``host:port`` serving ``outlets`` under ``vendor``'s MIB."""

    def __init__(self, vendor: str, host: str, port: int, outlets: Iterable[Outlet], *,
                 community: str, v3_user: V3User | None, lock: threading.Lock) -> None:
        self.vendor = vendor
        self.schemes = SCHEMES[vendor]
        self.host = host
        self.port = port
        self.community = community
        self.v3_user = v3_user
        self.outlets = {o.index: o for o in outlets}
        self.lock = lock
        self.engine: Any = None
        self.security_model = 0

    # -- OID resolution -------------------------------------------------------------

    def _split(self, oid: tuple[int, ...]) -> tuple[Scheme, str, Outlet] | None:
        for scheme in self.schemes:
            for column in (*scheme.command_columns, *scheme.state_columns):
                prefix = tuple(int(x) for x in column.split("."))
                n = len(prefix)
                rest = oid[n:]
                if oid[:n] != prefix or len(rest) != scheme.index_len + len(scheme.index_suffix):
                    continue
                if tuple(rest[scheme.index_len:]) != scheme.index_suffix:
                    continue
                outlet = self.outlets.get(tuple(rest[: scheme.index_len]))
                if outlet is not None:
                    return scheme, column, outlet
        return None

    def outlets_named(self, oids: Iterable[tuple[int, ...]]) -> list[Outlet]:
        found = []
        for oid in oids:
            hit = self._split(oid)
            if hit is not None:
                found.append(hit[2])
        return found

    # -- instrumentation (called on the agent's event loop) ------------------------------

    def read(self, oid: tuple[int, ...]) -> Any:
        from pysnmp.proto import rfc1902, rfc1905

        hit = self._split(oid)
        if hit is None:
            return rfc1905.noSuchInstance
        scheme, column, outlet = hit
        with self.lock:
            self._check_auth(outlet, oid)
            readback = scheme.command_readback.get(column)
            if column in scheme.state_columns or readback is None:
                # A state object, or a command object that reads back the state (APC,
                # Raritan switchingOperation): a query.
                outlet.count("query")
                if outlet.fault == "garbage":
                    return rfc1902.OctetString(b"\xff?")
                values = scheme.state_columns.get(column) or _READBACK_STATE[column]
                return rfc1902.Integer32(values[outlet.power])
            return rfc1902.Integer32(readback)

    def write(self, oid: tuple[int, ...], value: Any, idx: int) -> Any:
        from pysnmp.proto import rfc1902
        from pysnmp.smi import error as smi_error

        hit = self._split(oid)
        if hit is None or hit[1] not in hit[0].command_columns:
            raise smi_error.NotWritableError(name=oid, idx=idx)
        scheme, column, outlet = hit
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise smi_error.WrongTypeError(name=oid, idx=idx) from None
        with self.lock:
            self._check_auth(outlet, oid)
            if outlet.fault == "busy":
                raise smi_error.GenError(name=oid, idx=idx)
            if scheme.name == "eaton" and number == -1:
                return rfc1902.Integer32(number)  # cancel a pending command: nothing pending
            action = scheme.command_columns[column].get(number)
            if action is None:
                raise smi_error.WrongValueError(name=oid, idx=idx)
            outlet.count(action)
            if outlet.fault != "powering":
                outlet.power = ON if action == "cycle" else action
        return rfc1902.Integer32(number)

    def _check_auth(self, outlet: Outlet, oid: tuple[int, ...]) -> None:
        from pysnmp.smi import error as smi_error

        if outlet.fault == "auth" and self.security_model == 3:
            raise smi_error.AuthorizationError(name=oid, idx=0)

    # -- engine -----------------------------------------------------------------------

    async def start(self) -> None:
        from pysnmp.carrier.asyncio.dgram import udp, udp6
        from pysnmp.entity import config, engine
        from pysnmp.entity.rfc3413 import cmdrsp, context
        from pysnmp.hlapi.v3arch import asyncio as hlapi
        from pysnmp.proto.api import v2c
        from pysnmp.smi import instrum

        from drivers.snmp import _AUTH_NAMES, _PRIV_NAMES

        agent = self
        snmp_engine = engine.SnmpEngine()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        transport = (udp6.Udp6Transport() if family == socket.AF_INET6 else udp.UdpTransport())
        domain = udp6.DOMAIN_NAME if family == socket.AF_INET6 else udp.DOMAIN_NAME
        config.add_transport(snmp_engine, domain, transport.open_server_mode(sock=sock))
        config.add_v1_system(snmp_engine, "pdu-area", self.community)
        if self.v3_user is not None:
            u = self.v3_user
            config.add_v3_user(
                snmp_engine, u.name,
                getattr(hlapi, _AUTH_NAMES[u.auth_protocol]), u.auth_key or None,
                getattr(hlapi, _PRIV_NAMES[u.priv_protocol]), u.priv_key or None,
            )

        class Instrum(instrum.AbstractMibInstrumController):
            def read_variables(self, *var_binds: Any, **ctx: Any) -> list[Any]:
                return [(name, agent.read(tuple(name))) for name, _ in var_binds]

            def read_next_variables(self, *var_binds: Any, **ctx: Any) -> list[Any]:
                from pysnmp.proto import rfc1905

                return [(name, rfc1905.endOfMibView) for name, _ in var_binds]

            def write_variables(self, *var_binds: Any, **ctx: Any) -> list[Any]:
                return [(name, agent.write(tuple(name), value, i))
                        for i, (name, value) in enumerate(var_binds)]

        snmp_context = context.SnmpContext(snmp_engine)
        snmp_context.unregister_context_name(b"")
        snmp_context.register_context_name(b"", Instrum())

        def faulted(pdu: Any, mp_model: int) -> list[Outlet]:
            try:
                if mp_model == 0:
                    from pysnmp.proto.api import v1

                    binds = v1.apiPDU.get_varbinds(pdu)
                else:
                    binds = v2c.apiPDU.get_varbinds(pdu)
                return agent.outlets_named(tuple(name) for name, _ in binds)
            except Exception:  # noqa: BLE001 - a malformed PDU: let pysnmp answer it
                return []

        def responder(base: type) -> type:
            class Responder(base):  # type: ignore[misc, valid-type]
                def process_pdu(self, snmpEngine: Any, messageProcessingModel: Any,  # noqa: N803
                                securityModel: Any, *rest: Any) -> None:  # noqa: N803
                    outlets = faulted(rest[5], int(messageProcessingModel))
                    with agent.lock:
                        faults = {o.fault for o in outlets}
                        latency = max((o.latency for o in outlets if o.fault == "slow"), default=0.0)
                    if "no_answer" in faults or ("auth" in faults and int(securityModel) != 3):
                        return

                    def go() -> None:
                        agent.security_model = int(securityModel)
                        base.process_pdu(self, snmpEngine, messageProcessingModel, securityModel,
                                         *rest)

                    if latency > 0:
                        asyncio.get_running_loop().call_later(latency, go)
                    else:
                        go()

            return Responder

        responder(cmdrsp.GetCommandResponder)(snmp_engine, snmp_context)
        responder(cmdrsp.SetCommandResponder)(snmp_engine, snmp_context)
        cmdrsp.NextCommandResponder(snmp_engine, snmp_context)
        snmp_engine.transport_dispatcher.job_started(1)
        self.engine = snmp_engine

    def stop(self) -> None:
        if self.engine is not None:
            try:
                self.engine.transport_dispatcher.job_finished(1)
                self.engine.close_dispatcher()
            except Exception:  # noqa: BLE001
                pass
            self.engine = None


class PduFleet:
    """Several PDU agents on one event loop (a daemon thread) and one control API."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.agents: list[PduAgent] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="snmp-pdu-peer", daemon=True)
        self._thread.start()
        self.control: Any = None
        self.control_port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def add_agent(self, vendor: str, host: str, outlets: Iterable[Outlet], *, port: int = 0,
                  community: str = "private", v3_user: V3User | None = None) -> PduAgent:
        """Start one PDU agent. ``port=0`` takes a free UDP port (see ``agent.port``)."""
        agent = PduAgent(vendor, host, port, outlets, community=community, v3_user=v3_user,
                         lock=self.lock)
        asyncio.run_coroutine_threadsafe(agent.start(), self.loop).result(30)
        self.agents.append(agent)
        return agent

    def serve(self) -> str:
        """Start the control API; returns its base URL."""
        self.control, self.control_port = serve_control(self)
        return f"http://127.0.0.1:{self.control_port}"

    def _outlets(self) -> dict[str, Outlet]:
        return {o.name: o for a in self.agents for o in a.outlets.values()}

    # -- ControlBackend -----------------------------------------------------------------

    def nodes(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {
                name: {"power": o.power, "boot": None, "counts": dict(o.counts),
                       "fault": o.fault, "latency": o.latency}
                for name, o in self._outlets().items()
            }

    def set_fault(self, name: str, fault: str, latency: float = 0.0) -> None:
        with self.lock:
            outlet = self._outlets()[name]
            outlet.fault, outlet.latency = fault, latency

    fault = set_fault

    def set_state(self, name: str, power: str) -> None:
        if power not in (ON, OFF):
            raise KeyError(power)
        with self.lock:
            self._outlets()[name].power = power

    def reset_counts(self) -> None:
        with self.lock:
            for outlet in self._outlets().values():
                outlet.counts.clear()

    reset = reset_counts

    def stop(self) -> None:
        async def _stop() -> None:
            for agent in self.agents:
                agent.stop()
            await asyncio.sleep(0)

        try:
            asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        except Exception:  # noqa: BLE001
            pass
        if self.control is not None:
            self.control.shutdown()
            self.control.server_close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


# -- building fleets of simulated nodes ------------------------------------------------------

VENDOR_POWER_TYPE = {"apc_rpdu": "apc", "apc_masterswitch": "apc", "eaton": "eaton",
                     "raritan": "raritan", "sentry3": "fence_cdu"}


def outlet_index(vendor: str, outlet: int, unit: int | None = None) -> tuple[int, ...]:
    """The MIB index of outlet number ``outlet`` (1-based) on ``unit`` (Eaton unit,
    Raritan PDU id, Sentry3 tower; infeed 1 for Sentry3)."""
    if vendor == "eaton":
        return (0 if unit is None else unit, outlet)
    if vendor == "raritan":
        return (1 if unit is None else unit, outlet)
    if vendor == "sentry3":
        return (1 if unit is None else unit, 1, outlet)
    return (outlet,)


def start_pdu(fleet: PduFleet, vendor: str, host: str, count: int, rack: str, prefix: str, *,
              port: int = 0, community: str = "private", v3_user: V3User | None = None,
              use_v3: bool | None = None, unit: int | None = None,
              ) -> tuple[PduAgent, list[SimNode]]:
    """One PDU agent with ``count`` outlets, each a :class:`SimNode` ``<prefix>-<n>``
    whose ``power_parameters`` reach it. The agent accepts ``community`` and, when given,
    ``v3_user``; the parameters use the v3 user when ``use_v3`` (default: when given).
    Power parameters follow drivers/apc.py, eaton.py, raritan.py; ``fence_cdu`` callers
    build their own from ``agent.host``, ``agent.port`` and the outlet index."""
    outlets = [Outlet(f"{prefix}-{n}", outlet_index(vendor, n, unit)) for n in range(1, count + 1)]
    agent = fleet.add_agent(vendor, host, outlets, port=port, community=community, v3_user=v3_user)
    power_type = VENDOR_POWER_TYPE[vendor]
    common: dict[str, Any] = {"power_address": f"{host}:{agent.port}"}
    if use_v3 is None:
        use_v3 = v3_user is not None
    if use_v3:
        assert v3_user is not None, "use_v3 needs a v3_user"
        common.update(snmp_version="3", snmp_user=v3_user.name)
        if v3_user.auth_key:
            common.update(snmp_auth_protocol=v3_user.auth_protocol, snmp_auth_key=v3_user.auth_key)
        if v3_user.priv_key:
            common.update(snmp_priv_protocol=v3_user.priv_protocol, snmp_priv_key=v3_user.priv_key)
    else:
        common.update(snmp_version="1" if power_type == "apc" else "2c", community=community)
    if vendor == "apc_rpdu":
        common.update(pdu_type="RPDU", power_on_delay=0)
    elif vendor == "apc_masterswitch":
        common.update(pdu_type="MASTERSWITCH", power_on_delay=0)
    nodes = []
    for n, outlet in enumerate(outlets, start=1):
        params = {**common, "node_outlet": n}
        if unit is not None and vendor in ("eaton", "raritan"):
            params["pdu_unit"] = unit
        nodes.append(SimNode(outlet.name, rack, power_type, params))
    return agent, nodes
