"""``vmware``: virtual machines on vCenter or ESXi, through the vSphere SOAP API (pyvmomi).

One node is one VM, found by instance UUID (``power_uuid``; then as a BIOS UUID, as MAAS
does) or else by name (``power_vm_name``). All VMs behind one endpoint share its
``bmc_key``: one call and one session at a time per vCenter.

- Power: ``PowerOnVM_Task``, ``PowerOffVM_Task`` (hard), ``ShutdownGuest`` (soft, needs VMware
  Tools), ``ResetVM_Task`` (cycle), each task followed to its end within the timeout. A task
  failing with ``InvalidPowerState`` because the VM already is where it should go is done.
- ``runtime.powerState``: poweredOn -> on, poweredOff -> off, suspended -> on (as MAAS).
- Next boot: vSphere has no one-time boot device. Like MAAS, the VM's persistent boot order
  (``config.bootOptions.bootOrder``) is rewritten: for PXE every network adapter, then every
  disk (so a VM whose PXE server offers nothing boots its disk). It applies at the next boot
  or reset and stays until changed, whatever ``persistent`` says.
- Connecting: pyvmomi's ``SmartConnect`` first reads the server's API versions over a
  connection with no time limit, so a server that accepts and never answers would hang the
  worker. This driver reads ``/sdk/vimServiceVersions.xml`` itself within the timeout, then
  logs in with ``Connect(httpConnectionTimeout=timeout)``.
- TLS (MAAS's names): ``https`` verifies the certificate against the system CA store,
  ``https+unverified`` does not, ``http`` is plain.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from pydantic import SecretStr, ValidationInfo, field_validator

from .base import (
    BootDevice,
    Capabilities,
    DriverSettings,
    PowerDriver,
    PowerState,
    ProbedMachine,
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
from .registry import register

PROTOCOLS = ("https", "https+unverified", "http")

# vSphere fault (WSDL name, matched along the fault's class hierarchy) -> taxonomy class.
# Faults not listed are DeviceError. InvalidPowerState is handled per action first.
FAULTS: dict[str, type[PowerError]] = {
    "InvalidLogin": AuthError,          # wrong user or password (PasswordExpired too)
    "NotAuthenticated": AuthError,      # session gone or never made
    "NoPermission": AuthError,          # the account lacks the privilege
    "TaskInProgress": BusyError,        # another task holds the VM
    "ConcurrentAccess": BusyError,
    "ManagedObjectNotFound": NotFoundError,  # the VM went away while we worked
    "NotFound": NotFoundError,
    "HostNotConnected": UnreachableError,    # vCenter cannot reach the VM's ESXi host
    "HostCommunication": UnreachableError,
    "NotSupported": UnsupportedError,
    "MethodNotFound": UnsupportedError,
    "RequestCanceled": DeviceError,
}

_STATES = {"poweredOn": PowerState.ON, "poweredOff": PowerState.OFF, "suspended": PowerState.ON}
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+|[0-9A-Fa-f:]+)$")


class VmwareSettings(DriverSettings):
    """MAAS ``vmware`` power parameters."""

    power_address: str = param(description="vCenter or ESXi host name or IP address")
    power_user: str = param(description="vSphere user name, e.g. administrator@vsphere.local")
    power_pass: SecretStr = param(description="vSphere password", secret=True)
    power_port: int | None = param(
        None, description="API port (default 443 for https, 80 for http)"
    )
    power_protocol: str = param(
        "https",
        description="https (certificate verified), https+unverified, or http",
        choices=PROTOCOLS,
    )
    power_vm_name: str | None = param(
        None, description="VM name (used when power_uuid is not given)", scope="node"
    )
    power_uuid: str | None = param(
        None, description="VM instance UUID (or BIOS UUID)", scope="node"
    )

    @field_validator("power_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        if "://" in value or "/" in value:
            raise ValueError("must be a host name or address only: put the scheme in power_protocol")
        if not _HOST.match(value):
            raise ValueError("is not a host name or IP address")
        return value

    @field_validator("power_port", mode="before")
    @classmethod
    def _check_port(cls, value: Any) -> Any:
        if value in ("", None):  # MAAS stores "" for "the default"
            return None
        if not 0 < int(value) < 65536:
            raise ValueError("must be a TCP port (1-65535)")
        return int(value)

    @field_validator("power_protocol", mode="before")
    @classmethod
    def _check_protocol(cls, value: Any) -> Any:
        if value in ("", None):  # MAAS stores "" for "the default"
            return "https"
        if value not in PROTOCOLS:
            raise ValueError(f"must be one of {', '.join(PROTOCOLS)}")
        return value

    @field_validator("power_vm_name", "power_uuid", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any, info: ValidationInfo) -> Any:
        if value in ("", None):
            return None
        if info.field_name == "power_uuid":
            try:
                return str(uuid.UUID(str(value)))
            except ValueError:
                raise ValueError("is not a UUID") from None
        return value

    @property
    def port(self) -> int:
        if self.power_port is not None:
            return self.power_port
        return 80 if self.power_protocol == "http" else 443


def _pyvmomi() -> tuple[Any, Any, Any]:
    """``(vim, vmodl, pyVim.connect)``. Raises :class:`ToolMissingError`."""
    try:
        from pyVim import connect
        from pyVmomi import vim, vmodl
    except ImportError as exc:
        raise ToolMissingError("vmware needs pyvmomi (pip install pyvmomi)") from exc
    return vim, vmodl, connect


def fault_names(fault: Any) -> list[str]:
    """WSDL names of a vSphere fault and its base classes, most specific first."""
    names = []
    for cls in type(fault).__mro__:
        name = getattr(cls, "_wsdlName", None)
        if isinstance(name, str) and name not in names:
            names.append(name)
    return names


def host_name(name: str) -> str:
    """A host-name-safe version of a VM name."""
    safe = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return safe[:63].rstrip("-") or "vm"


@register
class VmwareDriver(PowerDriver):
    """A vSphere VM. One session per driver instance, opened on first use."""

    power_type = "vmware"
    description = "VMware"
    settings_model = VmwareSettings
    capabilities = Capabilities(
        pxe_next_boot=True, power_query=True, chassis_probe=True, detailed_errors=True
    )
    settings: VmwareSettings

    poll_interval: float = 0.05
    """First wait between two reads of a running task's state; doubles up to 1 s."""

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(settings, timeout=timeout)
        self._sleep = sleep
        self._clock = clock
        self._si: Any = None
        self._vm: Any = None

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> DriverSettings:
        """Parse the parameters; one of ``power_uuid`` / ``power_vm_name`` is required.
        Raises :class:`SettingsError`."""
        settings = super().validate(params)
        assert isinstance(settings, VmwareSettings)
        if not settings.power_uuid and not settings.power_vm_name:
            problem = "power_uuid or power_vm_name: one of them is required"
            raise SettingsError(f"invalid vmware parameters: {problem}", problems=[problem])
        return settings

    # -- plumbing -----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        s = self.settings
        return f"{s.power_protocol.split('+')[0]}://{s.power_address}:{s.port}"

    def bmc_key(self) -> str:
        return f"vmware:{self.endpoint}"

    def _where(self) -> str:
        s = self.settings
        vm = f"uuid {s.power_uuid}" if s.power_uuid else f"name {s.power_vm_name!r}"
        return f"VM {vm} at {self.endpoint}"

    def _scrub(self, text: str) -> str:
        password = secret_value(self.settings.power_pass)
        if password:
            text = text.replace(password, "***")
        return text[:300]

    def _error(self, exc: BaseException, action: str) -> PowerError:
        """The taxonomy error for anything pyvmomi or the socket layer raised. Decided by
        exception class and vSphere fault name, never by message text."""
        where = f"vmware {action} at {self.endpoint}"
        names = fault_names(exc)
        if names:
            for name in names:
                cls = FAULTS.get(name)
                if cls is not None:
                    break
            else:
                cls = DeviceError
            msg = self._scrub(str(getattr(exc, "msg", "") or ""))
            return cls(f"{where}: {names[0]}" + (f": {msg}" if msg else ""), fault=names[0])
        if isinstance(exc, ssl.SSLCertVerificationError):
            return DeviceError(f"{where}: TLS certificate not trusted "
                               "(power_protocol https+unverified skips the check)")
        if isinstance(exc, ssl.SSLError):
            return DeviceError(f"{where}: TLS handshake failed ({type(exc).__name__})")
        if isinstance(exc, TimeoutError):
            return CallTimeoutError(f"{where}: no reply within {self.timeout:g}s")
        if isinstance(exc, (ConnectionError, socket.gaierror, OSError)):
            return UnreachableError(f"{where}: {type(exc).__name__}")
        if isinstance(exc, (http.client.HTTPException, ET.ParseError)):
            return DeviceError(f"{where}: not a vSphere SOAP reply ({type(exc).__name__})")
        return DeviceError(f"{where}: {type(exc).__name__}")

    def _raise(self, exc: BaseException, action: str) -> NoReturn:
        error = self._error(exc, action)
        if isinstance(error, (UnreachableError, CallTimeoutError)):
            self._drop()
        raise error from exc

    def _call(self, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PowerError:
            raise
        except Exception as exc:  # noqa: BLE001 - every library error is translated
            self._raise(exc, action)

    def _ssl_context(self) -> ssl.SSLContext | None:
        protocol = self.settings.power_protocol
        if protocol == "http":
            return None
        if protocol == "https+unverified":
            return ssl._create_unverified_context()  # noqa: S323 - the operator asked for it
        return ssl.create_default_context()

    def _api_version(self, context: ssl.SSLContext | None) -> str:
        """The newest vim25 version both pyvmomi and the server know, read from
        ``/sdk/vimServiceVersions.xml`` within the timeout."""
        from pyVmomi import VmomiSupport

        s = self.settings
        conn: http.client.HTTPConnection
        if context is None:
            conn = http.client.HTTPConnection(s.power_address, s.port, timeout=self.timeout)
        else:
            conn = http.client.HTTPSConnection(s.power_address, s.port, timeout=self.timeout,
                                               context=context)
        step = "connect"
        try:
            conn.connect()
            step = "version check"
            conn.request("GET", "/sdk/vimServiceVersions.xml")
            resp = conn.getresponse()
            body = resp.read()
        except TimeoutError as exc:
            if step == "connect":  # nothing answered the connection: as good as no route
                raise UnreachableError(f"vmware connect at {self.endpoint}: no answer within "
                                       f"{self.timeout:g}s") from exc
            self._raise(exc, step)
        except Exception as exc:  # noqa: BLE001 - every library error is translated
            self._raise(exc, step)
        finally:
            conn.close()
        if resp.status != 200:
            raise DeviceError(f"vmware connect at {self.endpoint}: not a vSphere API endpoint "
                              f"(HTTP {resp.status} for vimServiceVersions.xml)")
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            raise DeviceError(f"vmware connect at {self.endpoint}: unreadable version list") from exc
        offered = {v.text for v in root.iter("version")}
        for version in VmomiSupport.GetServiceVersions("vim25"):
            if VmomiSupport.versionIdMap.get(version) in offered:
                return str(version)
        raise UnsupportedError(f"vmware connect at {self.endpoint}: no API version in common "
                               f"(server offers {', '.join(sorted(v for v in offered if v))})")

    def _connection(self) -> Any:
        if self._si is not None:
            return self._si
        _vim, _vmodl, connect = _pyvmomi()
        s = self.settings
        context = self._ssl_context()
        version = self._api_version(context)
        port = -s.port if s.power_protocol == "http" else s.port  # pyvmomi: negative = http
        kwargs: dict[str, Any] = {"sslContext": context} if context is not None else {}
        self._si = self._call(
            "login", connect.Connect, host=s.power_address, port=port, user=s.power_user,
            pwd=secret_value(s.power_pass), version=version,
            httpConnectionTimeout=self.timeout, **kwargs,
        )
        return self._si

    def _drop(self) -> None:
        si, self._si, self._vm = self._si, None, None
        if si is not None:
            try:
                si._stub.DropConnections()
            except Exception:  # noqa: BLE001 - dropping must never raise
                pass

    # -- finding the VM -------------------------------------------------------------

    def _find(self) -> Any:
        if self._vm is not None:
            return self._vm
        si = self._connection()
        s = self.settings
        content = self._call("find", si.RetrieveContent)
        vm = None
        if s.power_uuid:
            index = content.searchIndex
            vm = self._call("find", index.FindByUuid, None, s.power_uuid, True, True)
            if vm is None:  # a BIOS UUID, as MAAS also accepts
                vm = self._call("find", index.FindByUuid, None, s.power_uuid, True, False)
        elif s.power_vm_name:
            matches = [obj for obj, props in self._vm_properties(["name"])
                       if props.get("name") == s.power_vm_name]
            if len(matches) > 1:
                raise SettingsError(f"vmware: {len(matches)} VMs are named "
                                    f"{s.power_vm_name!r} at {self.endpoint}: use power_uuid")
            vm = matches[0] if matches else None
        else:
            raise SettingsError("vmware: power_uuid or power_vm_name is required")
        if vm is None:
            raise NotFoundError(f"vmware: no {self._where()}")
        self._vm = vm
        return vm

    def _vm_properties(self, paths: list[str]) -> list[tuple[Any, dict[str, Any]]]:
        """``paths`` of every VM on the server, in one property-collector pass."""
        vim, vmodl, _connect = _pyvmomi()
        content = self._call("list", self._connection().RetrieveContent)
        view = self._call("list", content.viewManager.CreateContainerView,
                          content.rootFolder, [vim.VirtualMachine], True)
        try:
            pc = vmodl.query.PropertyCollector
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                    name="view", path="view", skip=False, type=vim.view.ContainerView)])],
                propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=paths)],
            )
            collector = content.propertyCollector
            out: list[tuple[Any, dict[str, Any]]] = []
            result = self._call("list", collector.RetrievePropertiesEx, [spec], pc.RetrieveOptions())
            while result is not None:
                for obj in result.objects:
                    out.append((obj.obj, {p.name: p.val for p in (obj.propSet or [])}))
                if not result.token:
                    break
                result = self._call("list", collector.ContinueRetrievePropertiesEx, result.token)
            return out
        finally:
            try:
                view.Destroy()
            except Exception:  # noqa: BLE001 - the server drops views with the session
                pass

    def _power_state(self, vm: Any) -> str:
        return str(self._call("query", lambda: vm.runtime.powerState))

    # -- tasks ------------------------------------------------------------------------

    def _run_task(self, action: str, start: Callable[[], Any], done_if: str | None = None) -> None:
        """Start a task and follow it to its end within the timeout. A task failing with
        ``InvalidPowerState`` whose existing state is ``done_if`` counts as done."""
        deadline = self._clock() + self.timeout
        task = self._call(action, start)
        delay = self.poll_interval
        while True:
            info = self._call(action, lambda: task.info)
            if info.state == "success":
                return
            if info.state == "error":
                fault = info.error
                if (done_if is not None and "InvalidPowerState" in fault_names(fault)
                        and getattr(fault, "existingState", None) == done_if):
                    return
                self._raise(fault, action)
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise CallTimeoutError(f"vmware {action}: task still {info.state} after "
                                       f"{self.timeout:g}s for {self._where()}")
            self._sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    # -- operations -------------------------------------------------------------------

    def query(self) -> PowerState:
        """``runtime.powerState`` mapped as in the module docstring."""
        return _STATES.get(self._power_state(self._find()), PowerState.UNKNOWN)

    def power_on(self) -> None:
        """Power on (or resume) the VM unless it is already on."""
        vm = self._find()
        if self._power_state(vm) == "poweredOn":
            return
        self._run_task("power on", vm.PowerOnVM_Task, done_if="poweredOn")

    def power_off(self, soft: bool = False) -> None:
        """``PowerOffVM_Task`` (hard) or ``ShutdownGuest`` (soft, needs VMware Tools)
        unless already off."""
        vm = self._find()
        state = self._power_state(vm)
        if state == "poweredOff":
            return
        if not soft or state != "poweredOn":
            self._run_task("power off", vm.PowerOffVM_Task, done_if="poweredOff")
            return
        try:
            vm.ShutdownGuest()
        except Exception as exc:  # noqa: BLE001
            if ("InvalidPowerState" in fault_names(exc)
                    and getattr(exc, "existingState", None) == "poweredOff"):
                return
            self._raise(exc, "soft power off")

    def power_cycle(self) -> None:
        """``ResetVM_Task`` for a running VM; power on one that is off; off + on for a
        suspended one (a suspended VM cannot be reset)."""
        vm = self._find()
        state = self._power_state(vm)
        if state == "poweredOff":
            self._run_task("power on", vm.PowerOnVM_Task, done_if="poweredOn")
        elif state == "poweredOn":
            self._run_task("reset", vm.ResetVM_Task)
        else:
            self._run_task("power off", vm.PowerOffVM_Task, done_if="poweredOff")
            self._run_task("power on", vm.PowerOnVM_Task, done_if="poweredOn")

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """Write the VM's boot order with ``device`` first (see the module docstring).
        Nothing is sent when the order already starts that way. Raises
        :class:`UnsupportedError` for BIOS setup, :class:`DeviceError` when the VM has no
        device of that kind."""
        vim, _vmodl, _connect = _pyvmomi()
        kinds = {
            BootDevice.PXE: ("net", "disk"),
            BootDevice.DISK: ("disk", "net"),
            BootDevice.CDROM: ("cdrom", "disk", "net"),
        }
        try:
            wanted_kinds = kinds[BootDevice(device)]
        except (KeyError, ValueError):
            raise UnsupportedError(f"vmware cannot boot {device!s} next") from None
        vm = self._find()
        config = self._call("read config", lambda: vm.config)
        by_kind: dict[str, list[Any]] = {"net": [], "disk": [], "cdrom": []}
        for dev in config.hardware.device:
            if isinstance(dev, vim.vm.device.VirtualEthernetCard):
                by_kind["net"].append(vim.vm.BootOptions.BootableEthernetDevice(deviceKey=dev.key))
            elif isinstance(dev, vim.vm.device.VirtualDisk):
                by_kind["disk"].append(vim.vm.BootOptions.BootableDiskDevice(deviceKey=dev.key))
            elif isinstance(dev, vim.vm.device.VirtualCdrom):
                by_kind["cdrom"].append(vim.vm.BootOptions.BootableCdromDevice())
        if not by_kind[wanted_kinds[0]]:
            raise DeviceError(f"vmware: {self._where()} has no device to boot {device!s} from")
        order = [entry for kind in wanted_kinds for entry in by_kind[kind]]
        current = list(config.bootOptions.bootOrder or []) if config.bootOptions else []
        if [_boot_key(e) for e in current[: len(order)]] == [_boot_key(e) for e in order]:
            return
        spec = vim.vm.ConfigSpec(bootOptions=vim.vm.BootOptions(bootOrder=order))
        self._run_task("set boot order", lambda: vm.ReconfigVM_Task(spec))

    # -- chassis probe ----------------------------------------------------------------

    @classmethod
    def probe_chassis(
        cls, params: Mapping[str, Any], *, timeout: float = 10.0
    ) -> list[ProbedMachine]:
        """Every VM (not templates) of the vCenter / ESXi host: name, instance UUID, MAC
        addresses and power state."""
        with cls(cls.validate_chassis(params), timeout=timeout) as driver:
            assert isinstance(driver, VmwareDriver)
            return driver.list_vms()

    def list_vms(self) -> list[ProbedMachine]:
        """Every VM behind the endpoint this driver is connected to, sorted by name."""
        vim, _vmodl, _connect = _pyvmomi()
        rows = self._vm_properties(["name", "config.instanceUuid", "config.uuid",
                                    "config.template", "config.hardware.device",
                                    "runtime.powerState"])
        out: list[ProbedMachine] = []
        used: set[str] = set()
        for obj, props in sorted(rows, key=lambda r: str(r[1].get("name", ""))):
            if props.get("config.template"):
                continue
            name = str(props.get("name", ""))
            node = host_name(name)
            base, n = node, 2
            while node in used:
                node, n = f"{base}-{n}", n + 1
            used.add(node)
            macs = tuple(
                d.macAddress for d in props.get("config.hardware.device") or []
                if isinstance(d, vim.vm.device.VirtualEthernetCard) and d.macAddress
            )
            vm_uuid = props.get("config.instanceUuid") or props.get("config.uuid")
            params: dict[str, Any] = {"power_vm_name": name}
            if vm_uuid:
                params["power_uuid"] = str(vm_uuid)
            out.append(ProbedMachine(
                name=node, power_parameters=params,
                power=_STATES.get(str(props.get("runtime.powerState")), PowerState.UNKNOWN),
                description=f"vSphere VM {obj._moId}", mac_addresses=macs,
            ))
        return out

    def close(self) -> None:
        """Log out and drop the connection. Never raises."""
        si, self._si, self._vm = self._si, None, None
        if si is None:
            return
        try:
            _vim, _vmodl, connect = _pyvmomi()
            connect.Disconnect(si)
        except Exception:  # noqa: BLE001 - closing must never raise
            pass


def _boot_key(entry: Any) -> tuple[str, Any]:
    return type(entry).__name__, getattr(entry, "deviceKey", None)
