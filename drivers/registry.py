"""Power types by MAAS ``power_type`` name.

Driver modules register themselves with :func:`register`; :func:`get` looks a name up.
Importing a driver module never imports its protocol library, so the whole registry
loads on a host that has none of them.
"""

from __future__ import annotations

import importlib

from .base import PowerDriver
from .errors import UnknownPowerTypeError

_DRIVERS: dict[str, type[PowerDriver]] = {}

# Modules holding the built-in drivers; each registers on import.
BUILTIN_MODULES: tuple[str, ...] = (
    "drivers.ipmi",
    "drivers.redfish",
    "drivers.virsh",
    "drivers.manual",
    "drivers.wedge",
    "drivers.mscm",
    "drivers.hmc",
    "drivers.fence_cdu",
    "drivers.vmware",
    "drivers.apc",
    "drivers.eaton",
    "drivers.raritan",
    "drivers.webhook",
    "drivers.dli",
    "drivers.openbmc",
    "drivers.msftocs",
    "drivers.rsd",
    "drivers.ucsm",
    "drivers.moonshot",
    "drivers.sm15k",
    "drivers.amt",
    "drivers.nova",
)
_loaded = False


class DuplicatePowerTypeError(ValueError):
    """A second driver tried to register a power_type that is already taken."""


def register(cls: type[PowerDriver]) -> type[PowerDriver]:
    """Class decorator: add a driver under its ``power_type``. A duplicate is an error."""
    name = getattr(cls, "power_type", None)
    if not name or not isinstance(name, str):
        raise ValueError(f"{cls.__name__} has no power_type")
    existing = _DRIVERS.get(name)
    if existing is not None and existing is not cls:
        raise DuplicatePowerTypeError(
            f"power_type {name!r} is already registered by {existing.__module__}.{existing.__name__}"
        )
    _DRIVERS[name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def get(power_type: str) -> type[PowerDriver]:
    """The driver class for ``power_type``. Raises :class:`UnknownPowerTypeError`."""
    found = _DRIVERS.get(power_type) if isinstance(power_type, str) else None
    if found is not None:
        return found
    # The built-in module named after the power type first (a CLI run planning IPMI nodes
    # needs drivers.ipmi, not the other 21 modules and their imports); then all of them.
    module = f"drivers.{power_type}" if isinstance(power_type, str) else ""
    if module in BUILTIN_MODULES:
        importlib.import_module(module)
        found = _DRIVERS.get(power_type)
        if found is not None:
            return found
    _load_builtins()
    try:
        return _DRIVERS[power_type]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_DRIVERS))
        raise UnknownPowerTypeError(
            f"unknown power type {power_type!r} (known: {known})"
        ) from None


def all_drivers() -> dict[str, type[PowerDriver]]:
    """Every registered driver, by name."""
    _load_builtins()
    return dict(sorted(_DRIVERS.items()))
