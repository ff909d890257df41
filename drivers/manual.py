"""``manual``: no device. The operator powers the node by hand; its state is unknown."""

from __future__ import annotations

from .base import Capabilities, DriverSettings, PowerDriver, PowerState
from .registry import register


class ManualSettings(DriverSettings):
    """The manual power type takes no parameters."""


@register
class ManualDriver(PowerDriver):
    power_type = "manual"
    description = "Manual"
    settings_model = ManualSettings
    capabilities = Capabilities()

    def bmc_key(self) -> str:
        # Nothing is ever sent, so nothing needs serialising.
        return f"manual:{id(self)}"

    def power_on(self) -> None:
        """Nothing to send: the operator acts."""

    def power_off(self, soft: bool = False) -> None:
        """Nothing to send: the operator acts."""

    def power_cycle(self) -> None:
        """Nothing to send: the operator acts."""

    def query(self) -> PowerState:
        return PowerState.UNKNOWN
