"""The driver contract: what every power type implements.

A driver talks to one kind of device and knows nothing about queues, retries or
confirmation: those live once, in ``workers/policy.py``. A driver module imports its
protocol library only inside the code that talks to the device, so that the settings
model (and therefore ``scheduler/``) works on a host without pyghmi, sushy or libvirt.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, create_model

from .errors import SettingsError, UnsupportedError

Scope = Literal["bmc", "node"]


class PowerState(StrEnum):
    """A node's power state. Never a free-form string."""

    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"


class BootDevice(StrEnum):
    """Where the node boots next (MAAS / Redfish names, lower-case)."""

    PXE = "pxe"
    DISK = "disk"
    CDROM = "cdrom"
    BIOS = "bios"


@dataclass(frozen=True)
class Capabilities:
    """The founding table's columns, declared by each driver."""

    pxe_next_boot: bool = False
    """The driver can set the next boot to PXE."""
    power_query: bool = False
    """The driver can read the power state."""
    chassis_probe: bool = False
    """The driver can list the machines behind a chassis or pod."""
    detailed_errors: bool = False
    """Device errors are reported with a specific code rather than a generic one."""
    bmc_enlistment: bool = False
    """The driver can create its own BMC user."""


def param(
    default: Any = ...,
    *,
    description: str,
    scope: Scope = "bmc",
    secret: bool = False,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> Any:
    """Declare one power parameter (a MAAS power-parameter name) on a settings model.

    ``scope`` says whether the value belongs to the BMC / chassis / PDU (shared by the
    nodes behind it) or to the node itself; ``secret`` marks values that must never leave
    the inventory store in clear (declare those fields as ``SecretStr``); ``ge`` / ``le``
    bound a number (an outlet, a port) without a validator of its own.
    """
    extra: dict[str, Any] = {"scope": scope, "secret": secret}
    if choices:
        extra["choices"] = list(choices)
    return Field(default, description=description, json_schema_extra=extra, ge=ge, le=le)


class DriverSettings(BaseModel):
    """Base of every driver's typed settings. Unknown parameters are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    @classmethod
    def field_meta(cls, name: str) -> dict[str, Any]:
        extra = cls.model_fields[name].json_schema_extra
        return dict(extra) if isinstance(extra, dict) else {}

    @classmethod
    def secret_fields(cls) -> frozenset[str]:
        return frozenset(n for n in cls.model_fields if cls.field_meta(n).get("secret"))

    @classmethod
    def node_fields(cls) -> frozenset[str]:
        return frozenset(n for n in cls.model_fields if cls.field_meta(n).get("scope") == "node")

    def public_dict(self) -> dict[str, Any]:
        """The parameters with every secret replaced by ``"***"``: safe to print or store."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                out[name] = "***" if value.get_secret_value() else ""
            elif isinstance(value, StrEnum):
                out[name] = str(value)
            else:
                out[name] = value
        return out


@dataclass(frozen=True)
class ProbedMachine:
    """One machine found behind a chassis or pod by :meth:`PowerDriver.probe_chassis`."""

    name: str
    """A suggested node name (host-name safe), unique within the chassis."""
    power_parameters: dict[str, Any]
    """The node-scope parameters that address this machine (e.g. ``uuid``, ``node_id``)."""
    power: PowerState = PowerState.UNKNOWN
    """The power state read during the probe, when the device tells."""
    description: str = ""
    """What the device says the machine is (model, slot), for the operator."""
    mac_addresses: tuple[str, ...] = ()
    """Boot MAC addresses, when the device tells."""


def secret_value(value: SecretStr | None) -> str:
    """The clear text of a secret field, or ``""``."""
    return value.get_secret_value() if value is not None else ""


def settings_error_from(exc: ValidationError, power_type: str) -> SettingsError:
    """A :class:`SettingsError` listing every bad field, never echoing a value."""
    problems = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ())) or "(parameters)"
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return SettingsError(
        f"invalid {power_type} parameters: " + "; ".join(problems), problems=problems
    )


_VALIDATOR_SLIPS = (TypeError, ArithmeticError)
"""What a driver's field validator may raise on a value of an unexpected type (``int([])``,
``int(float("inf"))``): pydantic only turns ValueError and AssertionError into errors."""


def _slipped(exc: Exception, power_type: str) -> SettingsError:
    """A :class:`SettingsError` for a validator that met a value of the wrong type; the
    library text is left out (it may quote the value)."""
    return SettingsError(
        f"invalid {power_type} parameters: a value has the wrong type ({type(exc).__name__})"
    )


class PowerDriver(abc.ABC):
    """One power type. Instances are bound to one node's settings.

    Every method raises only :mod:`drivers.errors` exceptions. ``validate`` never touches
    the device: BMCs are fragile and shared with people.
    """

    power_type: ClassVar[str]
    """The MAAS ``power_type`` name this driver registers under."""
    description: ClassVar[str]
    """A one-line human name, as in MAAS' power type list."""
    settings_model: ClassVar[type[DriverSettings]]
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        if not isinstance(settings, self.settings_model):
            raise SettingsError(f"{self.power_type}: settings of the wrong type")
        self.settings = settings
        self.timeout = timeout

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> DriverSettings:
        """Parse MAAS power parameters into typed settings. Raises :class:`SettingsError`."""
        try:
            return cls.settings_model.model_validate(dict(params))
        except ValidationError as exc:
            raise settings_error_from(exc, cls.power_type) from None
        except _VALIDATOR_SLIPS as exc:
            raise _slipped(exc, cls.power_type) from None

    @classmethod
    def validate_chassis(cls, params: Mapping[str, Any]) -> DriverSettings:
        """Parse only the chassis (``scope="bmc"``) parameters: node-scope ones may be
        missing. Used to probe a chassis before any node is known. Raises
        :class:`SettingsError`."""
        fields: dict[str, Any] = {}
        for name, info in cls.settings_model.model_fields.items():
            if name in cls.settings_model.node_fields():
                fields[name] = (info.annotation | None, None)  # type: ignore[operator]
        chassis_model = create_model(  # type: ignore[call-overload]
            f"{cls.settings_model.__name__}Chassis", __base__=cls.settings_model, **fields
        )
        # A node parameter given as None is absent here: its validators expect a value.
        data = {k: v for k, v in dict(params).items() if v is not None or k not in fields}
        try:
            return chassis_model.model_validate(data)  # type: ignore[no-any-return]
        except ValidationError as exc:
            raise settings_error_from(exc, cls.power_type) from None
        except _VALIDATOR_SLIPS as exc:
            raise _slipped(exc, cls.power_type) from None

    @classmethod
    def probe_chassis(
        cls, params: Mapping[str, Any], *, timeout: float = 10.0
    ) -> list[ProbedMachine]:
        """List the machines behind the chassis / pod that ``params`` (chassis-scope
        parameters, see :meth:`validate_chassis`) address. Drivers with
        ``capabilities.chassis_probe`` override this; the default raises
        :class:`UnsupportedError`."""
        raise UnsupportedError(f"{cls.power_type} cannot probe a chassis")

    def bmc_key(self) -> str:
        """Identity of the device this node is reached through: at most one call in
        flight per key. Default: the ``power_address`` parameter."""
        address = getattr(self.settings, "power_address", None)
        return f"{self.power_type}:{address}" if address else f"{self.power_type}:{id(self)}"

    @abc.abstractmethod
    def power_on(self) -> None:
        """Ask the node to power on. Must not reboot a node that is already on."""

    @abc.abstractmethod
    def power_off(self, soft: bool = False) -> None:
        """Power the node off: hard (immediate) by default, or soft (ACPI / graceful)."""

    @abc.abstractmethod
    def power_cycle(self) -> None:
        """Power the node off and on again in one device operation."""

    @abc.abstractmethod
    def query(self) -> PowerState:
        """Read the node's power state."""

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """Set the next boot device. Raises :class:`UnsupportedError` unless overridden."""
        raise UnsupportedError(f"{self.power_type} cannot set the boot device")

    def create_user(self, username: str, password: str) -> dict[str, Any]:
        """Create, or reset if it exists, a BMC account ``username`` with ``password`` and
        the rights powerq needs, using this driver's current (admin) credentials. Returns
        the parameter updates to use from now on (e.g. ``power_user`` / ``power_pass``).
        Drivers with ``capabilities.bmc_enlistment`` override this; the default raises
        :class:`UnsupportedError`."""
        raise UnsupportedError(f"{self.power_type} cannot create BMC users")

    def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release sessions and connections. Never raises."""

    def __enter__(self) -> PowerDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
