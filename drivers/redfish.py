"""``redfish``: a DMTF Redfish BMC, over HTTPS JSON with sushy.

Wire: ``GET /redfish/v1/Systems/<id>`` for ``PowerState``; ``POST
…/Actions/ComputerSystem.Reset`` with a ``ResetType``; ``PATCH`` of the system's ``Boot``
object (with the ETag sushy reads) for the next boot device.

- Authentication: a Redfish session (``POST /SessionService/Sessions``) when the service
  root advertises a session service, deleted again by :meth:`RedfishDriver.close` (some
  BMCs allow only a handful of sessions); HTTP basic authentication where the service
  has no session service. A refused login is never retried here.
- sushy's own retries are switched off (one connection attempt, no retry of 5xx
  replies): retrying, backoff and "act then confirm" live in ``workers/policy.py``.
- ``power_verify_ssl`` is powerq's own parameter (MAAS has none and does not verify BMC
  certificates): off by default, like MAAS.
- ``node_id`` is the system's ``Id`` (the last segment of its ``@odata.id``), or a full
  ``/redfish/v1/Systems/...`` path; when omitted the first system listed is used.
- ``set_boot_device(efi=True)`` also sets ``BootSourceOverrideMode=UEFI``; with
  ``efi=False`` the mode is left as the BMC has it (forcing ``Legacy`` would break
  UEFI-only machines).

sushy is imported only inside the methods that talk to the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from pydantic import SecretStr, field_validator

from .base import (
    BootDevice,
    Capabilities,
    DriverSettings,
    PowerDriver,
    PowerState,
    param,
    secret_value,
)
from .errors import (
    AuthError,
    BusyError,
    CallTimeoutError,
    DeviceError,
    NotFoundError,
    PowerError,
    SettingsError,
    ToolMissingError,
    UnreachableError,
    UnsupportedError,
)
from .httpclient import base_url, quiet_insecure_warnings
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from sushy.resources.system.system import System


_STATES: dict[str, PowerState] = {"On": PowerState.ON, "Off": PowerState.OFF}
"""Settled Redfish ``PowerState`` values. Everything else (PoweringOn, PoweringOff,
Paused, Reset, Unknown, null, absent) is transient and re-read before answering."""

_BOOT_TARGETS: dict[BootDevice, str] = {
    BootDevice.PXE: "Pxe",
    BootDevice.DISK: "Hdd",
    BootDevice.CDROM: "Cd",
    BootDevice.BIOS: "BiosSetup",
}


def parse_address(address: str) -> tuple[str, str]:
    """Split a ``power_address`` into (sushy base URL, normalised BMC identity).

    Accepts ``host``, ``host:port``, ``[v6]:port`` or a full ``http(s)://`` URL (a trailing
    ``/redfish/v1`` is dropped); the default scheme is https. The identity spells the port
    out, so ``bmc1`` and ``https://BMC1:443/`` are the same BMC. Raises ``ValueError``.
    """
    url, identity = base_url(address, allow_path=True)
    path = urlsplit(url).path
    if path not in ("", "/redfish/v1", "/redfish"):
        raise ValueError("the address may only have the path /redfish/v1")
    return url.removesuffix(path), identity


class RedfishSettings(DriverSettings):
    """MAAS ``redfish`` power parameters."""

    power_address: str = param(
        description="BMC address: host, host:port or an http(s):// URL (default https)"
    )
    power_user: str = param(description="Redfish user name")
    power_pass: SecretStr = param(description="Redfish password", secret=True)
    node_id: str | None = param(
        None,
        description="The system's Id (or /redfish/v1/Systems/... path); default: the first system",
        scope="node",
    )
    power_verify_ssl: bool = param(
        False, description="Verify the BMC's TLS certificate (MAAS does not)"
    )

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("power_user")
    @classmethod
    def _check_user(cls, value: str) -> str:
        if not value:
            raise ValueError("power_user is required")
        return value

    @field_validator("node_id")
    @classmethod
    def _check_node_id(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise ValueError("node_id must be a non-empty identifier without spaces")
        return value or None

    @property
    def base_url(self) -> str:
        return parse_address(self.power_address)[0]

    @property
    def bmc_identity(self) -> str:
        return parse_address(self.power_address)[1]


@register
class RedfishDriver(PowerDriver):
    """Power through a Redfish BMC. Every method raises only :mod:`drivers.errors`.

    One instance holds at most one Redfish connection (and session), opened on first use
    and released by :meth:`close`. After a transport error the connection is dropped and
    the next call opens a new one.
    """

    power_type = "redfish"
    description = "Redfish"
    settings_model = RedfishSettings
    capabilities = Capabilities(
        pxe_next_boot=True, power_query=True, detailed_errors=True, bmc_enlistment=True
    )

    enlist_role: str = "Operator"
    """The ``RoleId`` :meth:`create_user` gives the account (power control and boot
    overrides: Redfish's ConfigureComponents privilege)."""

    transient_reads: int = 4
    """How many times :meth:`query` re-reads a transient ``PowerState`` before it answers
    ``unknown``."""
    transient_delay: float = 0.5
    """Seconds between those re-reads."""

    settings: RedfishSettings

    def __init__(
        self,
        settings: DriverSettings,
        *,
        timeout: float = 10.0,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(settings, timeout=timeout)
        self._sleep = sleep or time.sleep
        self._root: Any = None
        self._system: Any = None
        self._hidden: tuple[str, ...] = ()
        """Secrets besides ``power_pass`` that :meth:`_scrub` removes from BMC texts."""

    # -- identity -------------------------------------------------------------------

    def bmc_key(self) -> str:
        return f"redfish:{self.settings.bmc_identity}"

    # -- operations -----------------------------------------------------------------

    def power_on(self) -> None:
        """Send ``On`` unless the system is on or powering on: never resets a running node.

        Raises the transient errors, :class:`AuthError`, :class:`NotFoundError`,
        :class:`DeviceError`.
        """
        with self._edge("power on"):
            system = self._fresh_system()
            if self._raw_state(system) in ("On", "PoweringOn"):
                return
            self._reset(system, "On")

    def power_off(self, soft: bool = False) -> None:
        """``ForceOff`` (or ``GracefulShutdown`` when ``soft``) unless the system is off.

        Raises like :meth:`power_on`; :class:`UnsupportedError` if the BMC does not allow
        the reset type.
        """
        with self._edge("power off"):
            system = self._fresh_system()
            if self._raw_state(system) == "Off":
                return
            self._reset(system, "GracefulShutdown" if soft else "ForceOff")

    def power_cycle(self) -> None:
        """``PowerCycle`` when the BMC allows it, else ``ForceRestart``; a system that is
        off is simply powered on (a restart of an off system does nothing on most BMCs).

        Raises like :meth:`power_off`.
        """
        with self._edge("power cycle"):
            system = self._fresh_system()
            if self._raw_state(system) == "Off":
                self._reset(system, "On")
                return
            allowed = self._allowed_resets(system)
            if "PowerCycle" in allowed:
                self._reset(system, "PowerCycle")
            elif "ForceRestart" in allowed:
                self._reset(system, "ForceRestart")
            else:
                raise UnsupportedError(
                    f"{self._where()} allows neither PowerCycle nor ForceRestart"
                )

    def query(self) -> PowerState:
        """Read ``PowerState``. A transient value is re-read up to :attr:`transient_reads`
        times, :attr:`transient_delay` apart; still transient -> ``UNKNOWN``.

        Raises the transient errors, :class:`AuthError`, :class:`NotFoundError`,
        :class:`DeviceError`.
        """
        with self._edge("query"):
            system = self._fresh_system()
            for attempt in range(self.transient_reads + 1):
                if attempt:
                    self._sleep(self.transient_delay)
                    system.refresh(force=True)
                state = _STATES.get(self._raw_state(system) or "")
                if state is not None:
                    return state
            return PowerState.UNKNOWN

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """PATCH ``Boot``: target (Pxe / Hdd / Cd / BiosSetup), ``Once`` (or
        ``Continuous`` when ``persistent``), and ``UEFI`` mode when ``efi``.

        Raises :class:`UnsupportedError` if the BMC does not offer the target, and like
        :meth:`query` otherwise.
        """
        target = _BOOT_TARGETS.get(BootDevice(device))
        if target is None:  # pragma: no cover - every BootDevice is mapped
            raise UnsupportedError(f"redfish cannot boot from {device}")
        with self._edge("set boot device"):
            import sushy

            system = self._fresh_system()
            system.set_system_boot_options(
                target=sushy.BootSource(target),
                enabled=sushy.BootSourceOverrideEnabled(
                    "Continuous" if persistent else "Once"
                ),
                mode=sushy.BootSourceOverrideMode("UEFI") if efi else None,
            )

    def create_user(self, username: str, password: str) -> dict[str, Any]:
        """Create, or reset if it exists, the Redfish account ``username``.

        With the current (admin) credentials: find the AccountService (from the service
        root) and its Accounts; an account already called ``username`` is PATCHed
        (``Password``, ``RoleId`` :attr:`enlist_role`, ``Enabled``, and ``Locked`` false
        if it was locked; with its ETag as ``If-Match``), otherwise one is POSTed
        (``UserName``, ``Password``, ``RoleId``, ``Enabled``). sushy has no
        AccountService, so these are plain requests on sushy's authenticated connection.

        Returns ``{"power_user": username, "power_pass": password}``. Raises
        SettingsError (the admin's own name, or an empty name / password),
        UnsupportedError (no AccountService, or account creation refused with 405),
        AuthError (admin credentials refused, or no right to manage accounts: 401 / 403),
        BusyError (no free account: ``CreateLimitReachedForResource``, or the BMC busy),
        DeviceError (any other refusal, e.g. a password the BMC's policy rejects), and
        the transient errors. Messages never hold the password.
        """
        if not username or not password:
            raise SettingsError("redfish: the account needs a user name and a password")
        if username == self.settings.power_user:
            raise SettingsError("redfish: the account to create must not be the admin account itself")
        self._hidden = (password,)
        try:
            with self._edge("create user"):
                self._create_user(username, password)
        finally:
            self._hidden = ()
        return {"power_user": username, "power_pass": password}

    def _create_user(self, username: str, password: str) -> None:
        from sushy import exceptions as sx

        root = self._connect()
        conn = root._conn
        where = f"redfish {self.settings.base_url}: create user"
        service_path = (root.json.get("AccountService") or {}).get("@odata.id")
        if not service_path:
            raise UnsupportedError(f"{where}: the BMC has no AccountService")
        service = conn.get(service_path).json()
        accounts_path = (service.get("Accounts") or {}).get("@odata.id")
        if not accounts_path:
            raise UnsupportedError(f"{where}: the AccountService lists no Accounts")
        settings = {"Password": password, "RoleId": self.enlist_role, "Enabled": True}
        for member in conn.get(accounts_path).json().get("Members") or []:
            path = member["@odata.id"]
            response = conn.get(path)
            account = response.json()
            if account.get("UserName") != username:
                continue
            if account.get("Locked") is True:
                settings["Locked"] = False
            etag = response.headers.get("ETag") or account.get("@odata.etag")
            conn.patch(path, data=settings, etag=etag)
            return
        try:
            conn.post(accounts_path, data={"UserName": username, **settings})
        except sx.HTTPError as exc:
            if str(exc.code or "").endswith("CreateLimitReachedForResource"):
                raise BusyError(f"{where}: no free account on the BMC") from exc
            if exc.status_code == 405:
                raise UnsupportedError(f"{where}: the BMC does not create accounts (HTTP 405)") from exc
            raise

    def close(self) -> None:
        """Delete the Redfish session (if any) and close the HTTP connection. Never raises."""
        self._drop(delete_session=True)

    def _drop(self, *, delete_session: bool) -> None:
        root, self._root, self._system = self._root, None, None
        if root is None:
            return
        try:
            auth = getattr(root, "_auth", None)
            if auth is not None and delete_session:
                auth.close()
        except Exception:  # noqa: BLE001 - close never raises
            pass
        try:
            root._auth = None
            conn = getattr(root, "_conn", None)
            if conn is not None:
                conn.close()
        except Exception:  # noqa: BLE001
            pass

    # -- helpers --------------------------------------------------------------------

    def _where(self) -> str:
        node = self.settings.node_id or "(first system)"
        return f"redfish {self.settings.base_url} system {node}"

    def _connect(self) -> Any:
        if self._root is not None:
            return self._root
        sushy = _import_sushy()
        settings = self.settings
        connector = _connector_class()(
            settings.base_url,
            verify=settings.power_verify_ssl,
            server_side_retries=1,  # one connection attempt; 5xx never retried (see class)
            server_side_retries_delay=0,
            default_request_timeout=self.timeout,
            connect_timeout=self.timeout,
        )
        if not settings.power_verify_ssl and settings.base_url.startswith("https"):
            quiet_insecure_warnings()
        auth = _auth_class()(username=settings.power_user, password=secret_value(settings.power_pass))
        self._root = sushy.Sushy(settings.base_url, auth=auth, connector=connector)
        return self._root

    def _system_path(self, root: Any) -> str:
        node_id = self.settings.node_id
        if node_id is None:
            members = list(root.get_system_collection().members_identities)
            if not members:
                raise NotFoundError(f"redfish {self.settings.base_url} lists no system")
            return str(members[0])
        if node_id.startswith("/"):
            return node_id
        systems = getattr(root, "_systems_path", None) or "/redfish/v1/Systems"
        return f"{systems.rstrip('/')}/{quote(node_id, safe='')}"

    def _fresh_system(self) -> System:
        """The system resource, freshly read (one GET once connected)."""
        if self._system is None:
            root = self._connect()
            self._system = root.get_system(self._system_path(root))
        else:
            self._system.refresh(force=True)
        return self._system

    @staticmethod
    def _raw_state(system: Any) -> str | None:
        value = system.json.get("PowerState")
        if value is not None and not isinstance(value, str):
            raise DeviceError("the BMC sent a PowerState that is not a string")
        return value

    @staticmethod
    def _allowed_resets(system: Any) -> set[str]:
        return {getattr(v, "value", v) for v in system.get_allowed_reset_system_values()}

    def _reset(self, system: Any, reset_type: str) -> None:
        import sushy

        if reset_type not in self._allowed_resets(system):
            raise UnsupportedError(f"{self._where()} does not allow ResetType {reset_type}")
        system.reset_system(sushy.ResetType(reset_type))

    @contextmanager
    def _edge(self, action: str) -> Iterator[None]:
        """Translate every library error into :mod:`drivers.errors`."""
        try:
            yield
        except PowerError:
            raise
        except Exception as exc:
            error = self._translate(exc, action)
            if isinstance(error, (UnreachableError, CallTimeoutError)):
                # Start afresh next time. The BMC is not answering: don't wait for it
                # once more to delete the session (it expires on the BMC's side).
                self._drop(delete_session=False)
            elif isinstance(error, BusyError):
                self._drop(delete_session=True)
            raise error from exc

    def _translate(self, exc: Exception, action: str) -> PowerError:
        try:
            from sushy import exceptions as sx
        except ImportError:
            return ToolMissingError("the sushy library is not installed")
        import requests

        where = self._where()
        if isinstance(exc, sx.HTTPError):  # also AccessError, ResourceNotFoundError, ...
            status = exc.status_code
            detail = self._scrub(exc.detail)
            suffix = f": {detail}" if detail else ""
            if isinstance(exc, sx.AccessError):
                return AuthError(f"{where}: {action} refused the credentials (HTTP {status})")
            if isinstance(exc, sx.ResourceNotFoundError):
                return NotFoundError(f"{where}: not found (HTTP 404)")
            if status in (429, 503):
                return BusyError(f"{where}: {action}: BMC busy (HTTP {status}){suffix}")
            if status == 504:
                return CallTimeoutError(f"{where}: {action}: gateway timeout (HTTP 504)")
            if isinstance(exc, sx.MissingXAuthToken):
                return DeviceError(f"{where}: session login returned no X-Auth-Token")
            return DeviceError(
                f"{where}: {action} failed (HTTP {status} {exc.code}){suffix}",
                status=status,
                redfish_code=exc.code,
            )
        if isinstance(exc, sx.ConnectionError):
            cause = _cause(exc)
            if isinstance(cause, requests.exceptions.SSLError):
                return DeviceError(f"{where}: TLS handshake failed (certificate not trusted?)")
            if isinstance(cause, requests.exceptions.ConnectTimeout):
                return UnreachableError(f"{where}: no answer to connect within {self.timeout:g}s")
            if isinstance(cause, requests.exceptions.Timeout):
                return CallTimeoutError(f"{where}: {action}: no reply within {self.timeout:g}s")
            return UnreachableError(f"{where}: cannot connect ({type(cause or exc).__name__})")
        if isinstance(exc, (sx.InvalidParameterValueError, sx.MissingActionError)):
            return UnsupportedError(f"{where}: {action}: not offered by this BMC ({self._scrub(str(exc))})")
        if isinstance(exc, (sx.MissingAttributeError, sx.MalformedAttributeError)):
            return DeviceError(f"{where}: {action}: the BMC's reply lacks a required field")
        if isinstance(exc, ValueError):  # includes requests' JSONDecodeError
            return DeviceError(f"{where}: {action}: the BMC sent a malformed reply")
        if isinstance(exc, requests.exceptions.Timeout):
            return CallTimeoutError(f"{where}: {action}: no reply within {self.timeout:g}s")
        if isinstance(exc, requests.exceptions.RequestException):
            return UnreachableError(f"{where}: cannot connect ({type(exc).__name__})")
        if isinstance(exc, (KeyError, TypeError, AttributeError, IndexError)):
            return DeviceError(f"{where}: {action}: the BMC sent a reply of the wrong shape")
        if isinstance(exc, sx.SushyError):
            return DeviceError(f"{where}: {action} failed ({type(exc).__name__})")
        return DeviceError(f"{where}: {action} failed ({type(exc).__name__})")

    def _scrub(self, text: str | None) -> str:
        """A BMC's error text, shortened, with the password (should it be echoed) removed."""
        if not text or not isinstance(text, str):
            return ""
        for password in (secret_value(self.settings.power_pass), *self._hidden):
            if password:
                text = text.replace(password, "***")
        return text[:200]


def _cause(exc: BaseException) -> BaseException | None:
    """The requests exception sushy wrapped (it raises inside the ``except`` block)."""
    return exc.__cause__ or exc.__context__


def _import_sushy() -> Any:
    try:
        import sushy
    except ImportError as exc:
        raise ToolMissingError("the sushy library is not installed") from exc
    return sushy


_CLASSES: dict[str, type] = {}


def _connector_class() -> type:
    """sushy's Connector, with its retries of 5xx replies switched off."""
    if "connector" not in _CLASSES:
        from sushy import connector

        class Connector(connector.Connector):  # type: ignore[misc]
            def _op(self, method: str, path: str = "", data: Any = None,
                    headers: Any = None, **kwargs: Any) -> Any:
                kwargs["server_side_retries_left"] = 0
                return super()._op(method, path, data, headers, **kwargs)

        _CLASSES["connector"] = Connector
    return _CLASSES["connector"]


def _auth_class() -> type:
    """Session auth when the root advertises sessions, basic auth otherwise.

    Unlike sushy's ``SessionOrBasicAuth`` a refused session login is not tried again with
    basic auth (one wrong password = one failed login on the BMC), and a busy or
    unreachable BMC is not mistaken for one without sessions.
    """
    if "auth" not in _CLASSES:
        from sushy import auth, exceptions

        class Auth(auth.SessionAuth):  # type: ignore[misc]
            def _do_authenticate(self) -> None:
                root_json = self._root_resource.json or {}
                has_sessions = bool(root_json.get("SessionService")) or bool(
                    (root_json.get("Links") or {}).get("Sessions")
                )
                if has_sessions:
                    try:
                        super()._do_authenticate()
                        return
                    except (exceptions.AccessError, exceptions.ConnectionError,
                            exceptions.ServerSideError):
                        raise
                    except exceptions.HTTPError as exc:
                        if exc.status_code == 429:
                            raise
                        # The service advertises sessions but will not make one (405,
                        # 400, no token...): fall back to basic authentication.
                    self.reset_session_attrs()
                self._connector.set_http_basic_auth(self._username, self._password)

        _CLASSES["auth"] = Auth
    return _CLASSES["auth"]


