"""The one SNMP transport of powerq: integer GET / SET on pysnmp 7 (asyncio API).

Every SNMP-driven power type (``apc``, ``eaton``, ``raritan``, ``fence_cdu``'s SNMP mode)
talks through this module. Its public API is small on purpose:

- :class:`SnmpTarget` — where and how to talk (address, port, version, credentials). Its
  ``repr`` never shows a community or key.
- :class:`SnmpSettings` — a :class:`~drivers.base.DriverSettings` base holding the SNMP
  power parameters (``power_address``, ``snmp_version``, ``community``, ``snmp_user``,
  ``snmp_auth_protocol``, ``snmp_auth_key``, ``snmp_priv_protocol``, ``snmp_priv_key``);
  a driver's settings model inherits it and adds its own node parameters.
  :meth:`SnmpSettings.snmp_target` builds the target.
- :class:`SnmpClient` — ``get_int(oid)`` / ``set_int(oid, value)`` / ``close()``, called
  from ordinary synchronous driver code.
- :func:`parse_address` — ``host``, ``host:port`` or ``[v6]:port`` into (host, port).
- :class:`SnmpOutletDriver` — a :class:`~drivers.base.PowerDriver` base for switched PDUs
  (one node = one outlet): a vendor module supplies the state OID, its values and the
  command to write per action.

Behaviour:

- **One request, no retries.** pysnmp's own retries are off (``retries=0``): retrying and
  backoff belong to ``workers/policy.py``. Each request waits at most the driver's
  ``timeout``; SNMPv3 engine discovery happens inside that same request.
- **Threads.** Worker calls arrive on short-lived threads. Each client owns a private
  asyncio event loop (and pysnmp engine) and runs one request at a time on it
  (``loop.run_until_complete`` under a lock), so nothing depends on the calling thread
  having a loop. :meth:`SnmpClient.close` closes the engine and the loop; it never raises.
- **Errors** (the taxonomy of :mod:`drivers.errors`):

  ============================================================ ======================
  no answer in time                                             ``timeout``
  address that does not resolve, no route, socket refused       ``unreachable``
  SNMPv3 unknown user, wrong auth key (wrong digest), wrong      ``auth_failed``
  priv key (decryption error), unsupported security level
  error-status noAccess, authorizationError, readOnly           ``auth_failed``
  error-status noSuchName, notWritable, noCreation;             ``not_found``
  noSuchObject / noSuchInstance / endOfMibView in the reply
  error-status genErr, resourceUnavailable                      ``busy``
  any other error-status; a reply value that is not an integer  ``device_error``
  ============================================================ ======================

  **A wrong community looks like a timeout.** SNMPv1 / v2c agents silently drop requests
  with an unknown community (RFC 1157 / 3584: they count ``snmpInBadCommunityNames`` and
  answer nothing), so the manager cannot tell a wrong community from an agent that is
  down. Only agents that answer with an error-status (``noAccess`` for a read-only
  community asked to SET, ``authorizationError``) give ``auth_failed``. SNMPv3 reports
  wrong credentials explicitly, so use v3 where the PDU supports it.

pysnmp is imported only inside the methods that talk to the device: this module loads on
a host without it (:class:`~drivers.errors.ToolMissingError` when it is needed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import SecretStr, ValidationInfo, field_validator, model_validator

from .base import Capabilities, DriverSettings, PowerDriver, PowerState, param, secret_value
from .errors import (
    AuthError,
    BusyError,
    CallTimeoutError,
    DeviceError,
    NotFoundError,
    PowerError,
    ToolMissingError,
    UnreachableError,
    UnsupportedError,
)

SnmpVersion = Literal["1", "2c", "3"]

AUTH_PROTOCOLS: tuple[str, ...] = ("none", "md5", "sha", "sha224", "sha256", "sha384", "sha512")
"""SNMPv3 authentication protocols (``sha`` is HMAC-SHA-96)."""
PRIV_PROTOCOLS: tuple[str, ...] = ("none", "des", "3des", "aes", "aes192", "aes256")
"""SNMPv3 privacy protocols (``aes`` is AES-128-CFB)."""

_AUTH_NAMES = {  # attribute names in pysnmp.hlapi.v3arch.asyncio
    "none": "USM_AUTH_NONE", "md5": "USM_AUTH_HMAC96_MD5", "sha": "USM_AUTH_HMAC96_SHA",
    "sha224": "USM_AUTH_HMAC128_SHA224", "sha256": "USM_AUTH_HMAC192_SHA256",
    "sha384": "USM_AUTH_HMAC256_SHA384", "sha512": "USM_AUTH_HMAC384_SHA512",
}
_PRIV_NAMES = {
    "none": "USM_PRIV_NONE", "des": "USM_PRIV_CBC56_DES", "3des": "USM_PRIV_CBC168_3DES",
    "aes": "USM_PRIV_CFB128_AES", "aes192": "USM_PRIV_CFB192_AES",
    "aes256": "USM_PRIV_CFB256_AES",
}

# SNMP error-status values (RFC 3416) and what they mean here.
_STATUS_AUTH = {4: "readOnly", 6: "noAccess", 16: "authorizationError"}
_STATUS_NOT_FOUND = {2: "noSuchName", 11: "noCreation", 17: "notWritable"}
_STATUS_BUSY = {5: "genErr", 13: "resourceUnavailable"}
_STATUS_NAMES = {
    1: "tooBig", 3: "badValue", 7: "wrongType", 8: "wrongLength", 9: "wrongEncoding",
    10: "wrongValue", 12: "inconsistentValue", 14: "commitFailed", 15: "undoFailed",
    18: "inconsistentName", **_STATUS_AUTH, **_STATUS_NOT_FOUND, **_STATUS_BUSY,
}

# pysnmp error indications (class names in pysnmp.proto.errind) that mean bad credentials.
_INDICATIONS_AUTH = frozenset({
    "UnknownUserName", "WrongDigest", "AuthenticationFailure", "AuthenticationError",
    "DecryptionError", "UnsupportedSecurityLevel", "UnknownSecurityName",
    "UnknownCommunityName",
})
_INDICATIONS_TOOL = frozenset({"EncryptionError", "UnsupportedAuthProtocol", "UnsupportedPrivProtocol"})


def parse_address(address: str, default_port: int = 161) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6addr]`` or ``[v6addr]:port`` -> (host, port).

    A bare IPv6 address (several colons, no brackets) is taken whole. Raises ``ValueError``.
    """
    text = address.strip()
    if not text or any(c.isspace() for c in text) or "/" in text or "@" in text:
        raise ValueError("power_address must be a host name or IP address, optionally :port")
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("power_address has an unclosed '['")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("power_address: expected :port after ']'")
            port_text = rest[1:]
        ipaddress.IPv6Address(host)  # raises ValueError
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ValueError("power_address has no host")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError("power_address has an invalid port")
        port = int(port_text)
    return host, port


@dataclass(frozen=True)
class SnmpTarget:
    """An SNMP agent and the credentials to use. Secrets stay out of ``repr``."""

    host: str
    port: int = 161
    version: SnmpVersion = "2c"
    community: str = field(default="", repr=False)
    """SNMPv1 / v2c community (write community for SETs)."""
    user: str = ""
    """SNMPv3 USM user name."""
    auth_protocol: str = "none"
    auth_key: str = field(default="", repr=False)
    priv_protocol: str = "none"
    priv_key: str = field(default="", repr=False)

    @property
    def where(self) -> str:
        """``host:port`` (brackets around IPv6), for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def identity(self) -> str:
        """The agent, for a driver's ``bmc_key``."""
        return f"snmp:{self.where.lower()}"


class SnmpSettings(DriverSettings):
    """SNMP power parameters, shared by every SNMP power type (inherit and add yours).

    SNMPv1 / v2c need ``community``; SNMPv3 needs ``snmp_user`` and, for authNoPriv /
    authPriv, ``snmp_auth_protocol`` + ``snmp_auth_key`` (and ``snmp_priv_protocol`` +
    ``snmp_priv_key``). Keys are pass-phrases of at least 8 characters (RFC 3414).
    """

    power_address: str = param(description="PDU address: host or IP, optionally :port (default 161)")
    snmp_version: SnmpVersion = param(
        "2c", description="SNMP version: 1, 2c or 3", choices=("1", "2c", "3")
    )
    community: SecretStr | None = param(
        None, description="SNMP v1/v2c community with write access", secret=True
    )
    snmp_user: str | None = param(None, description="SNMPv3 user name")
    snmp_auth_protocol: str = param(
        "none", description="SNMPv3 authentication protocol", choices=AUTH_PROTOCOLS
    )
    snmp_auth_key: SecretStr | None = param(
        None, description="SNMPv3 authentication pass-phrase", secret=True
    )
    snmp_priv_protocol: str = param(
        "none", description="SNMPv3 privacy (encryption) protocol", choices=PRIV_PROTOCOLS
    )
    snmp_priv_key: SecretStr | None = param(
        None, description="SNMPv3 privacy pass-phrase", secret=True
    )

    @field_validator("snmp_version", mode="before")
    @classmethod
    def _check_version(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            value = value.strip().lower().removeprefix("v")
        return value

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("snmp_auth_protocol", "snmp_priv_protocol")
    @classmethod
    def _check_protocol(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip().lower().replace("-", "").replace("_", "")
        known = AUTH_PROTOCOLS if info.field_name == "snmp_auth_protocol" else PRIV_PROTOCOLS
        if value not in known:
            raise ValueError(f"must be one of {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _check_credentials(self) -> SnmpSettings:
        v3_fields = [
            n for n in ("snmp_user", "snmp_auth_key", "snmp_priv_key")
            if getattr(self, n) is not None
        ] + [n for n in ("snmp_auth_protocol", "snmp_priv_protocol") if getattr(self, n) != "none"]
        if self.snmp_version in ("1", "2c"):
            if not secret_value(self.community):
                raise ValueError(f"community is required with snmp_version {self.snmp_version}")
            if v3_fields:
                raise ValueError(f"{', '.join(v3_fields)}: only for snmp_version 3")
            return self
        if self.community is not None:
            raise ValueError("community is only for snmp_version 1 / 2c (v3 uses snmp_user)")
        if not self.snmp_user:
            raise ValueError("snmp_user is required with snmp_version 3")
        auth_key, priv_key = secret_value(self.snmp_auth_key), secret_value(self.snmp_priv_key)
        for proto_name, proto, key_name, key in (
            ("snmp_auth_protocol", self.snmp_auth_protocol, "snmp_auth_key", auth_key),
            ("snmp_priv_protocol", self.snmp_priv_protocol, "snmp_priv_key", priv_key),
        ):
            if proto == "none" and key:
                raise ValueError(f"{key_name} is set but {proto_name} is none")
            if proto != "none" and len(key) < 8:
                raise ValueError(f"{key_name} must be at least 8 characters with {proto_name} {proto}")
        if self.snmp_priv_protocol != "none" and self.snmp_auth_protocol == "none":
            raise ValueError("SNMPv3 privacy needs authentication too (snmp_auth_protocol)")
        return self

    def snmp_target(self) -> SnmpTarget:
        """The :class:`SnmpTarget` these settings describe."""
        host, port = parse_address(self.power_address)
        return SnmpTarget(
            host=host, port=port, version=self.snmp_version,
            community=secret_value(self.community), user=self.snmp_user or "",
            auth_protocol=self.snmp_auth_protocol, auth_key=secret_value(self.snmp_auth_key),
            priv_protocol=self.snmp_priv_protocol, priv_key=secret_value(self.snmp_priv_key),
        )


def _hlapi() -> Any:
    try:
        from pysnmp.hlapi.v3arch import asyncio as hlapi
    except ImportError as exc:
        raise ToolMissingError("the pysnmp library (7.x) is not installed") from exc
    return hlapi


class SnmpClient:
    """Synchronous integer GET / SET against one agent, for a driver's methods.

    Every method raises only :mod:`drivers.errors` exceptions (see the module docstring
    for the mapping); messages name the agent and the OID, never a credential.
    """

    def __init__(self, target: SnmpTarget, *, timeout: float = 10.0) -> None:
        self.target = target
        self.timeout = timeout
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Any = None
        self._transport: Any = None

    # -- public -----------------------------------------------------------------------

    def get_int(self, oid: str) -> int:
        """GET one integer object. Raises the taxonomy's errors (module docstring)."""
        return self._request("get", oid, None)

    def set_int(self, oid: str, value: int) -> int:
        """SET one Integer32 object; returns the value the agent echoed."""
        return self._request("set", oid, int(value))

    def close(self) -> None:
        """Close the engine's sockets and the private event loop. Never raises."""
        with self._lock:
            loop, engine = self._loop, self._engine
            self._loop = self._engine = self._transport = None
            if loop is None:
                return
            try:
                if engine is not None and not loop.is_closed():
                    loop.run_until_complete(self._close_engine(engine))
            except Exception:  # noqa: BLE001 - close never raises
                pass
            try:
                loop.close()
            except Exception:  # noqa: BLE001
                pass

    # -- internals --------------------------------------------------------------------

    @staticmethod
    async def _close_engine(engine: Any) -> None:
        engine.close_dispatcher()
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _request(self, op: str, oid: str, value: int | None) -> int:
        hlapi = _hlapi()
        where = f"snmp {self.target.where}"  # never a credential in a message
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
            loop = self._loop
            try:
                # The outer bound only catches a library that ignores its own timeout.
                return loop.run_until_complete(
                    asyncio.wait_for(self._call(hlapi, op, oid, value), self.timeout + 2.0)
                )
            except PowerError:
                raise
            except TimeoutError as exc:
                raise CallTimeoutError(
                    f"{where}: {op} {oid}: no answer within {self.timeout:g}s"
                ) from exc
            except OSError as exc:
                raise UnreachableError(f"{where}: cannot send ({type(exc).__name__})") from exc
            except Exception as exc:
                raise self._translate_exception(exc, op, oid) from exc

    async def _call(self, hlapi: Any, op: str, oid: str, value: int | None) -> int:
        target = self.target
        where = f"snmp {target.where}"
        if self._engine is None:
            self._engine = hlapi.SnmpEngine()
        if self._transport is None:
            cls = hlapi.Udp6TransportTarget if ":" in target.host else hlapi.UdpTransportTarget
            try:
                self._transport = await cls.create(
                    (target.host, target.port), timeout=self.timeout, retries=0
                )
            except Exception as exc:  # PySnmpError: the name does not resolve
                raise UnreachableError(f"{where}: cannot resolve the address") from exc
        auth = self._auth_data(hlapi)
        obj = hlapi.ObjectIdentity(oid)
        if op == "get":
            call = hlapi.get_cmd(self._engine, auth, self._transport, hlapi.ContextData(),
                                 hlapi.ObjectType(obj), lookupMib=False)
        else:
            call = hlapi.set_cmd(self._engine, auth, self._transport, hlapi.ContextData(),
                                 hlapi.ObjectType(obj, hlapi.Integer32(value)), lookupMib=False)
        indication, status, index, var_binds = await call
        if indication:
            raise self._translate_indication(indication, op, oid)
        if status and int(status):
            raise self._translate_status(int(status), op, oid)
        return self._int_from(var_binds, op, oid)

    def _auth_data(self, hlapi: Any) -> Any:
        t = self.target
        if t.version in ("1", "2c"):
            return hlapi.CommunityData(t.community, mpModel=0 if t.version == "1" else 1)
        kwargs: dict[str, Any] = {}
        if t.auth_protocol != "none":
            kwargs["authKey"] = t.auth_key
            kwargs["authProtocol"] = getattr(hlapi, _AUTH_NAMES[t.auth_protocol])
        if t.priv_protocol != "none":
            kwargs["privKey"] = t.priv_key
            kwargs["privProtocol"] = getattr(hlapi, _PRIV_NAMES[t.priv_protocol])
        return hlapi.UsmUserData(t.user, **kwargs)

    def _int_from(self, var_binds: Any, op: str, oid: str) -> int:
        at = f"snmp {self.target.where}: {op} {oid}"
        if not var_binds:
            raise DeviceError(f"{at}: empty reply")
        value = var_binds[0][1]
        kind = type(value).__name__
        if kind in ("NoSuchObject", "NoSuchInstance", "EndOfMibView"):
            raise NotFoundError(f"{at}: {kind[0].lower() + kind[1:]}")
        from pyasn1.type import univ

        if not isinstance(value, univ.Integer):
            raise DeviceError(f"{at}: the agent replied with a {kind}, not an integer")
        return int(value)

    def _translate_indication(self, indication: Any, op: str, oid: str) -> PowerError:
        at, name = f"snmp {self.target.where}: {op} {oid}", type(indication).__name__
        if name == "RequestTimedOut":
            hint = "" if self.target.version == "3" else \
                " (with SNMP v1/v2c a wrong community also looks like this)"
            return CallTimeoutError(f"{at}: no answer within {self.timeout:g}s{hint}")
        if name in _INDICATIONS_AUTH:
            return AuthError(f"snmp {self.target.where}: the agent refused the SNMPv3 credentials ({name})")
        if name in _INDICATIONS_TOOL:
            return ToolMissingError(f"{at}: the SNMP auth / privacy protocol is not available ({name})")
        return DeviceError(f"{at}: {name}")

    def _translate_status(self, status: int, op: str, oid: str) -> PowerError:
        at, name = f"snmp {self.target.where}: {op} {oid}", _STATUS_NAMES.get(status, f"error-status {status}")
        if status in _STATUS_AUTH:
            return AuthError(f"{at}: refused ({name}): the community / user lacks access")
        if status in _STATUS_NOT_FOUND:
            return NotFoundError(f"{at}: no such object ({name})")
        if status in _STATUS_BUSY:
            return BusyError(f"{at}: the agent could not do it now ({name})")
        return DeviceError(f"{at}: failed ({name})", snmp_error_status=status)

    def _translate_exception(self, exc: Exception, op: str, oid: str) -> PowerError:
        """pysnmp / pyasn1 exceptions (a value the agent or encoder refused)."""
        return DeviceError(f"snmp {self.target.where}: {op} {oid} failed ({type(exc).__name__})")


class SnmpOutletDriver(PowerDriver):
    """Base of the switched-PDU drivers: one node = one outlet, one SNMP agent per PDU.

    A subclass declares its settings model (inheriting :class:`SnmpSettings`) and says
    where the outlet's state is and what to write: :meth:`state_oid`, :attr:`states`,
    :meth:`command`. Every method raises only :mod:`drivers.errors` exceptions.

    - ``power_on`` writes the vendor's "on" command only: never a reboot.
    - ``power_off(soft=True)`` raises :class:`UnsupportedError`: a PDU can only cut power.
    - ``power_cycle`` writes the vendor's reboot / cycle command (override to change).
    - ``query`` reads the state object; values not in :attr:`states` (pending, error,
      transitional states) read as ``unknown``.
    - All outlets of one PDU share ``bmc_key`` (``snmp:host:port``), so the worker sends
      one request at a time to a PDU.
    """

    capabilities = Capabilities(power_query=True, detailed_errors=True)

    states: ClassVar[dict[int, PowerState]] = {}
    """State-object value -> power state."""

    settings: SnmpSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._client: SnmpClient | None = None

    # -- what a vendor module supplies ---------------------------------------------------

    def state_oid(self) -> str:  # pragma: no cover - abstract
        """The OID holding this outlet's power state."""
        raise NotImplementedError

    def command(self, action: Literal["on", "off", "cycle"]) -> tuple[str, int]:  # pragma: no cover
        """(OID, integer value) to write for ``action``."""
        raise NotImplementedError

    # -- the contract ----------------------------------------------------------------

    def bmc_key(self) -> str:
        return self.settings.snmp_target().identity

    @property
    def client(self) -> SnmpClient:
        if self._client is None:
            self._client = SnmpClient(self.settings.snmp_target(), timeout=self.timeout)
        return self._client

    def query(self) -> PowerState:
        """Read the outlet's state. Raises the transient errors, :class:`AuthError`,
        :class:`NotFoundError` (no such outlet), :class:`DeviceError`."""
        return self.states.get(self.client.get_int(self.state_oid()), PowerState.UNKNOWN)

    def power_on(self) -> None:
        """Write the "on" command. Raises like :meth:`query`; :class:`BusyError` on genErr."""
        self._write("on")

    def power_off(self, soft: bool = False) -> None:
        """Write the "off" command (always immediate). Raises like :meth:`power_on`;
        :class:`UnsupportedError` when ``soft``."""
        if soft:
            raise UnsupportedError(f"{self.power_type} cannot shut an OS down gracefully: "
                                   "a PDU can only cut the outlet's power")
        self._write("off")

    def power_cycle(self) -> None:
        """Write the reboot / cycle command (the PDU holds the outlet off for its own
        configured time). Raises like :meth:`power_on`."""
        self._write("cycle")

    def close(self) -> None:
        """Close the SNMP client. Never raises."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _write(self, action: Literal["on", "off", "cycle"]) -> None:
        oid, value = self.command(action)
        self.client.set_int(oid, value)
