"""``fence_cdu``: Server Technology Sentry Switched CDU outlets, over its CLI.

One node is one outlet (``power_id``, e.g. ``.A12``: tower A, outlet 12; ``.AA12`` on
units with several infeeds) of one CDU (``power_address``); all outlets of a CDU share its
``bmc_key``, so one session at a time reaches it. ``power_protocol`` chooses the transport:

- ``telnet`` (default, as MAAS's ``fence_cdu`` agent): port 23, the CDU's own
  ``Username:`` / ``Password:`` prompts;
- ``ssh``: port 22, SSH password authentication (and the CDU's prompts if it asks again),
  host key checked per ``host_key_policy`` (:mod:`drivers.sshcli`);
- ``snmp``: the Sentry3 MIB through :mod:`drivers.snmp` (``snmp_version``, ``community``
  or the SNMPv3 ``snmp_user`` / keys; ``power_user`` / ``power_pass`` are not used):
  outletControlAction ``1.3.6.1.4.1.1718.3.2.3.1.11.<tower>.<infeed>.<outlet>`` written
  1 on / 2 off / 3 reboot, outletStatus ``…1718.3.2.3.1.5.<tower>.<infeed>.<outlet>`` read
  (0 off, 1 on, anything else unknown). ``.A12`` is tower 1, infeed 1, outlet 12;
  ``.AB12`` tower 1, infeed 2, outlet 12. SNMP errors as in :mod:`drivers.snmp` (a wrong
  v1/v2c community looks like a timeout; v3 credentials give ``auth_failed``).

``power_address`` may carry a port (``host:port``); ``power_port`` wins over it.

CLI modes: the ``Switched CDU:`` prompt and one command per action: ``status .A12`` (the outlet's
row: ``.A12  Name  On|Off  <control state>``), ``on .A12``, ``off .A12``, ``reboot .A12``
(the native cycle). ``on`` is never ``reboot``: an outlet already on stays on. A PDU cuts
power, so there is no graceful off (``soft`` is refused), no next boot and no probe. The
session ends with ``logout`` in :meth:`FenceCduDriver.close`.

Replies: ``Outlet not found`` -> ``not_found``; ``Invalid command`` / ``Command failed``
-> ``device_error``; ``Access denied`` or the login prompt again -> ``auth_failed``;
"All sessions are in use" (or another :data:`drivers.sshcli.BUSY_TEXT` phrase) ->
``busy``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import SecretStr, field_validator, model_validator

from .base import Capabilities, DriverSettings, PowerState, param, secret_value
from .errors import BusyError, DeviceError, NotFoundError, UnsupportedError
from .registry import register
from .snmp import SnmpOutletDriver, SnmpSettings, parse_address
from .sshcli import (
    BUSY_TEXT,
    CliSettings,
    CliShell,
    SshCommandDriver,
    SshSession,
    Target,
    TelnetChannel,
)

SENTRY3_CONTROL = "1.3.6.1.4.1.1718.3.2.3.1.11"
SENTRY3_STATUS = "1.3.6.1.4.1.1718.3.2.3.1.5"
PROMPT = re.compile(r"Switched CDU:\s*$")
OUTLET_ID = re.compile(r"^\.?([A-Za-z]{1,2}\d{1,3})$")
_NOT_FOUND = re.compile(r"not found|no such outlet|invalid outlet", re.IGNORECASE)
_FAILED = re.compile(r"invalid command|invalid request|command failed|error", re.IGNORECASE)
DEFAULT_PORTS = {"telnet": 23, "ssh": 22, "snmp": 161}


class FenceCduSettings(CliSettings, SnmpSettings):
    """MAAS ``fence_cdu`` power parameters, plus the shared CLI and SNMP ones."""

    power_user: str | None = param(  # type: ignore[assignment]
        None, description="CLI login user name (telnet / ssh)")
    power_pass: SecretStr | None = param(  # type: ignore[assignment]
        None, description="CLI login password (telnet / ssh)", secret=True)
    power_id: str = param(description="Outlet ID, e.g. .A12 (tower A, outlet 12)", scope="node")
    power_protocol: Literal["telnet", "ssh", "snmp"] = param(
        "telnet", description="Transport: telnet CLI (as MAAS), ssh CLI, or snmp (Sentry3 MIB)",
        choices=("telnet", "ssh", "snmp"),
    )

    @field_validator("power_id")
    @classmethod
    def _check_outlet(cls, value: str) -> str:
        match = OUTLET_ID.match(value)
        if match is None:
            raise ValueError("must be a Sentry outlet ID such as .A12")
        return "." + match.group(1).upper()

    @model_validator(mode="after")
    def _check_credentials(self) -> FenceCduSettings:
        """SNMP credentials in snmp mode; a CLI user and password otherwise."""
        parse_address(self.power_address)
        if self.power_protocol == "snmp":
            check: Any = SnmpSettings._check_credentials  # pydantic wraps the validator
            check(self)
        elif not self.power_user or not secret_value(self.power_pass):
            raise ValueError(f"power_user and power_pass are required with {self.power_protocol}")
        return self


class _Sentry3Outlet(SnmpOutletDriver):
    """fence_cdu's SNMP mode (not registered: :class:`FenceCduDriver` delegates to it)."""

    power_type = "fence_cdu"
    description = "Sentry Switch CDU outlet over SNMP (Sentry3 MIB)"
    settings_model = FenceCduSettings
    settings: FenceCduSettings
    states = {0: PowerState.OFF, 1: PowerState.ON}
    ACTIONS = {"on": 1, "off": 2, "cycle": 3}

    def index(self) -> str:
        match = re.match(r"^\.([A-Z])([A-Z]?)(\d+)$", self.settings.power_id)
        assert match is not None  # validated by FenceCduSettings
        tower = ord(match.group(1)) - ord("A") + 1
        infeed = ord(match.group(2)) - ord("A") + 1 if match.group(2) else 1
        return f"{tower}.{infeed}.{int(match.group(3))}"

    def state_oid(self) -> str:
        return f"{SENTRY3_STATUS}.{self.index()}"

    def command(self, action: Literal["on", "off", "cycle"]) -> tuple[str, int]:
        return f"{SENTRY3_CONTROL}.{self.index()}", self.ACTIONS[action]


@register
class FenceCduDriver(SshCommandDriver):
    power_type = "fence_cdu"
    description = "Sentry Switch CDU"
    settings_model = FenceCduSettings
    capabilities = Capabilities(power_query=True, detailed_errors=True)
    settings: FenceCduSettings

    def __init__(self, settings: DriverSettings, *, timeout: float = 10.0) -> None:
        super().__init__(settings, timeout=timeout)
        self._shell: CliShell | None = None
        self._snmp: _Sentry3Outlet | None = None
        if self.settings.power_protocol == "snmp":
            self._snmp = _Sentry3Outlet(self._snmp_settings(), timeout=timeout)

    def _snmp_settings(self) -> FenceCduSettings:
        s = self.settings
        if s.power_port is None:
            return s
        host, _ = parse_address(s.power_address)
        host = f"[{host}]" if ":" in host else host
        return s.model_copy(update={"power_address": f"{host}:{s.power_port}"})

    @property
    def target(self) -> Target:
        s = self.settings
        host, port = parse_address(s.power_address, DEFAULT_PORTS[s.power_protocol])
        return Target(host=host, port=s.power_port or port, user=s.power_user or "",
                      password=secret_value(s.power_pass), timeout=self.timeout,
                      host_key_policy=s.host_key_policy, known_hosts=s.known_hosts)

    def bmc_key(self) -> str:
        return self._snmp.bmc_key() if self._snmp is not None else super().bmc_key()

    def _cli(self) -> CliShell:
        if self._shell is None:
            target = self.target
            channel = (TelnetChannel(target) if self.settings.power_protocol == "telnet"
                       else SshSession(target).shell())
            shell = CliShell(channel, target, PROMPT)
            shell.start()
            self._shell = shell
        return self._shell

    def command(self, verb: str) -> str:
        """``VERB OUTLET`` at the prompt; the reply. Not-found and failures raise."""
        line = f"{verb} {self.settings.power_id}"
        try:
            reply = self._cli().command(line)
        except BaseException:
            self._shell = None  # the shell closed itself
            raise
        text = self.target.scrub(reply)
        if _NOT_FOUND.search(reply):
            raise NotFoundError(f"fence_cdu at {self.target.where}: outlet "
                                f"{self.settings.power_id}: {text}")
        if BUSY_TEXT.search(reply):
            raise BusyError(f"fence_cdu at {self.target.where}: {text}")
        if _FAILED.search(reply):
            raise DeviceError(f"fence_cdu at {self.target.where}: {line!r}: {text}")
        return reply

    def query(self) -> PowerState:
        if self._snmp is not None:
            return self._snmp.query()
        reply = self.command("status")
        outlet = self.settings.power_id.lower()
        for row in reply.splitlines():
            cells = re.split(r"\s{2,}", row.strip())
            if cells and cells[0].lower() == outlet and len(cells) >= 3:
                status = cells[2].strip().lower()
                return PowerState(status) if status in ("on", "off") else PowerState.UNKNOWN
        raise DeviceError(f"fence_cdu at {self.target.where}: no status row for outlet "
                          f"{self.settings.power_id} in {self.target.scrub(reply)!r}")

    def power_on(self) -> None:
        if self._snmp is not None:
            self._snmp.power_on()
        else:
            self.command("on")

    def power_off(self, soft: bool = False) -> None:
        if soft:
            raise UnsupportedError("a Sentry CDU outlet has no graceful power off")
        if self._snmp is not None:
            self._snmp.power_off()
        else:
            self.command("off")

    def power_cycle(self) -> None:
        if self._snmp is not None:
            self._snmp.power_cycle()
        else:
            self.command("reboot")

    def close(self) -> None:
        """Log out and close. Never raises."""
        shell, self._shell = self._shell, None
        if shell is not None:
            shell.close(logout="logout")
        if self._snmp is not None:
            self._snmp.close()
        super().close()
