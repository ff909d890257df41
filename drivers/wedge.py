"""``wedge``: Facebook Wedge switch microserver, through its OpenBMC's SSH shell.

One node per BMC. Every action is one command of OpenBMC's ``wedge_power.sh`` over SSH
(:mod:`drivers.sshcli`): ``/usr/local/bin/wedge_power.sh on|off|status``; ``status`` prints
``Microserver power is on`` or ``Microserver power is off``.

- ``power_on`` sends ``on`` (the script itself leaves a running microserver alone).
- ``power_off`` sends ``off``: the script has no graceful off, so ``soft=True`` is
  refused (``unsupported``) rather than silently cutting power.
- ``power_cycle`` sends ``off`` then ``on`` on the same login.
- No next-boot or probe support: the BMC has no boot override command.
"""

from __future__ import annotations

import re

from .base import Capabilities, PowerState, param
from .errors import DeviceError, UnsupportedError
from .registry import register
from .sshcli import CliSettings, SshCommandDriver

SCRIPT = "/usr/local/bin/wedge_power.sh"
_STATUS = re.compile(r"Microserver power is (on|off)\b", re.IGNORECASE)


class WedgeSettings(CliSettings):
    """MAAS ``wedge`` power parameters (plus the shared SSH ones)."""

    power_user: str = param("root", description="OpenBMC login user name (MAAS default: root)")


@register
class WedgeDriver(SshCommandDriver):
    power_type = "wedge"
    description = "Facebook's Wedge"
    settings_model = WedgeSettings
    capabilities = Capabilities(power_query=True, detailed_errors=True)

    def _script(self, verb: str) -> str:
        result = self.exec(f"{SCRIPT} {verb}")
        if result.exit_status not in (0, None):
            raise DeviceError(
                f"wedge at {self.target.where}: wedge_power.sh {verb} failed "
                f"(exit {result.exit_status}): {self.target.scrub(result.output)}"
            )
        return result.output

    def query(self) -> PowerState:
        output = self._script("status")
        match = _STATUS.search(output)
        if match is None:
            raise DeviceError(
                f"wedge at {self.target.where}: unexpected status reply: "
                f"{self.target.scrub(output)!r}"
            )
        return PowerState(match.group(1).lower())

    def power_on(self) -> None:
        self._script("on")

    def power_off(self, soft: bool = False) -> None:
        if soft:
            raise UnsupportedError("wedge_power.sh has no graceful power off")
        self._script("off")

    def power_cycle(self) -> None:
        self._script("off")
        self._script("on")
