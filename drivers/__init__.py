"""powerq drivers: pure Python, one module per power type, no Celery.

See :mod:`drivers.base` for the contract, :mod:`drivers.errors` for the error taxonomy and
:mod:`drivers.registry` for looking a power type up by its MAAS name.
"""

from .base import BootDevice, Capabilities, DriverSettings, PowerDriver, PowerState, param
from .registry import all_drivers, get, register

__all__ = [
    "BootDevice",
    "Capabilities",
    "DriverSettings",
    "PowerDriver",
    "PowerState",
    "all_drivers",
    "get",
    "param",
    "register",
]
