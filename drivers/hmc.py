"""``hmc``: IBM POWER logical partitions (LPARs), through the Hardware Management Console.

Each node is one LPAR (``lpar``) of one managed system (``server_name``), both managed by
one HMC (``power_address``): all LPARs of an HMC share its ``bmc_key``. Each action is one
HMC command over one reused SSH login (:mod:`drivers.sshcli`):

=============  ===================================================================
query          ``lssyscfg -m SERVER -r lpar -F state --filter lpar_names=LPAR``
on             ``chsysstate -r lpar -m SERVER -o on -n LPAR --bootstring network-all``
off (hard)     ``chsysstate -r lpar -m SERVER -o shutdown -n LPAR --immed``
off (soft)     ``chsysstate -r lpar -m SERVER -o osshutdown -n LPAR`` (asks the OS)
cycle          off (hard) then on, on the same login
=============  ===================================================================

State: ``Running``, ``Starting``, ``Open Firmware`` -> on; ``Not Activated``, ``Shutting
Down`` -> off; the HMC's other states (``Error``, ``Not Available``, ``Migrating``...,
:data:`OTHER_STATES`) -> unknown; any other reply -> ``device_error``.

**Next boot to PXE.** Every power-on this driver sends activates the LPAR with
``--bootstring network-all``: its firmware boots from the network (every network adapter
in turn), as MAAS's ``hmc`` driver does. There is no separate one-time boot setting on the
HMC, so :meth:`HmcDriver.set_boot_device` with ``pxe`` only checks that the LPAR exists and
then relies on that: the next boot started by powerq (``on`` or ``cycle``) is a network
boot. A reboot started from inside the running OS is not. Other devices are refused.

Replies: ``No results were found.`` (no such LPAR), ``HSCL8012`` (no such managed
system) and any ``HSCL....`` message saying a name "cannot be found" are ``not_found``;
any other ``HSCL....`` message, or a non-zero exit status, is ``device_error``.
"""

from __future__ import annotations

import re
import shlex

from pydantic import field_validator

from .base import BootDevice, Capabilities, PowerState, param
from .errors import DeviceError, NotFoundError, UnsupportedError
from .registry import register
from .sshcli import CliSettings, SshCommandDriver

ON_STATES = ("Running", "Starting", "Open Firmware")
OFF_STATES = ("Not Activated", "Shutting Down")
OTHER_STATES = ("Error", "Not Available", "Hardware Discovery", "Migrating - Running",
                "Migrating - Not Activated", "Suspended", "Suspending", "Resuming")
"""LPAR states that are neither on nor off: reported as ``unknown``."""
NOT_FOUND_CODES = ("HSCL8012",)
_HSCL = re.compile(r"\b(HSCL[0-9A-F]{4})\b")
_NO_RESULTS = "No results were found"
_MISSING = re.compile(r"(cannot|could not) be found|not found", re.IGNORECASE)
_BAD_NAME = re.compile(r"[\x00-\x1f'\"\\`$;|&<>]")


def _name(value: str) -> str:
    if not value or _BAD_NAME.search(value):
        raise ValueError("must be a name without quotes, control or shell characters")
    return value


class HmcSettings(CliSettings):
    """MAAS ``hmc`` power parameters (plus the shared SSH ones)."""

    server_name: str = param(description="HMC managed system (server) name", scope="node")
    lpar: str = param(description="Logical partition (LPAR) name", scope="node")

    @field_validator("server_name", "lpar")
    @classmethod
    def _check_names(cls, value: str) -> str:
        return _name(value)


@register
class HmcDriver(SshCommandDriver):
    power_type = "hmc"
    description = "IBM Hardware Management Console (HMC)"
    settings_model = HmcSettings
    capabilities = Capabilities(pxe_next_boot=True, power_query=True, detailed_errors=True)
    settings: HmcSettings

    def _where(self) -> str:
        return f"hmc at {self.target.where}, lpar {self.settings.lpar!r} of {self.settings.server_name!r}"

    def cli(self, command: str) -> str:
        """Run one HMC command; its output. HSCL and not-found replies raise."""
        result = self.exec(command)
        output = result.output.strip()
        text = self.target.scrub(output)
        code = _HSCL.search(output)
        missing = code and (code.group(1) in NOT_FOUND_CODES or _MISSING.search(output))
        if _NO_RESULTS in output or missing:
            raise NotFoundError(f"{self._where()}: {text}")
        if code or result.exit_status not in (0, None):
            raise DeviceError(f"{self._where()}: {text or f'exit {result.exit_status}'}")
        return output

    def _chsysstate(self, *args: str) -> None:
        s = self.settings
        self.cli(" ".join(["chsysstate", "-r", "lpar", "-m", shlex.quote(s.server_name),
                           *args[:2], "-n", shlex.quote(s.lpar), *args[2:]]))

    def query(self) -> PowerState:
        s = self.settings
        state = self.cli(f"lssyscfg -m {shlex.quote(s.server_name)} -r lpar -F state "
                         f"--filter {shlex.quote('lpar_names=' + s.lpar)}")
        if state in ON_STATES:
            return PowerState.ON
        if state in OFF_STATES:
            return PowerState.OFF
        if state in OTHER_STATES:
            return PowerState.UNKNOWN
        raise DeviceError(f"{self._where()}: unexpected state reply {self.target.scrub(state)!r}")

    def power_on(self) -> None:
        """Activate the LPAR with a network boot (see the module docstring)."""
        self._chsysstate("-o", "on", "--bootstring", "network-all")

    def power_off(self, soft: bool = False) -> None:
        if soft:
            self._chsysstate("-o", "osshutdown")
        else:
            self._chsysstate("-o", "shutdown", "--immed")

    def power_cycle(self) -> None:
        self.power_off()
        self.power_on()

    def set_boot_device(
        self, device: BootDevice, *, efi: bool = False, persistent: bool = False
    ) -> None:
        """PXE only: checks the LPAR exists; every power-on by this driver network-boots."""
        if BootDevice(device) is not BootDevice.PXE:
            raise UnsupportedError(f"hmc: next boot {device!s} is not supported (only pxe)")
        self.query()
