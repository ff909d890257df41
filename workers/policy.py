"""Execution policy: retries, act-then-confirm, one call in flight per BMC.

This is the one place that decides how a node action is carried out; drivers only talk
to devices. No Celery here: the chunk task in :mod:`workers.tasks` calls
:meth:`NodeRunner.run` for each node. Delays, clocks and randomness are injectable so
that tests never sleep for real.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from drivers.base import BootDevice, PowerDriver, PowerState
from drivers.errors import (
    CallTimeoutError,
    DeviceError,
    PowerError,
    SettingsError,
    StateMismatchError,
    TransientError,
    UnsupportedError,
)

T = TypeVar("T")


class Action(StrEnum):
    ON = "on"
    OFF = "off"
    CYCLE = "cycle"
    QUERY = "query"
    BOOT = "boot"


class Outcome(StrEnum):
    OK = "ok"
    ERROR = "error"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class PolicySettings:
    """The knobs of :class:`NodeRunner`; built from :class:`scheduler.config.Config`."""

    call_timeout: float = 10.0
    max_attempts: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    confirm_timeout: float = 30.0
    confirm_interval: float = 0.5
    cycle_mode: str = "off-on"

    @classmethod
    def from_config(cls, config: Any) -> PolicySettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


@dataclass
class NodeResult:
    """What happened to one node in one job. Plain data: stored as JSON."""

    node: str
    action: str
    outcome: str = Outcome.OK
    state_before: str | None = None
    state_after: str | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    started: float = 0.0
    finished: float = 0.0
    worker: str = ""
    note: str = ""
    power_type: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BmcLocks:
    """One lock per BMC key, shared by every task of a worker process."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock


PROCESS_LOCKS = BmcLocks()


@dataclass
class NodeRunner:
    """Carries out one action on one node with the configured policy.

    ``run`` never raises: every failure becomes an error :class:`NodeResult`.
    """

    settings: PolicySettings
    locks: BmcLocks = field(default_factory=lambda: PROCESS_LOCKS)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    rng: Callable[[], float] = random.random

    def backoff(self, attempt: int) -> float:
        """Full-jitter delay before retry number ``attempt`` (1-based)."""
        ceiling = min(self.settings.backoff_max, self.settings.backoff_base * (2 ** (attempt - 1)))
        return self.rng() * ceiling

    @property
    def hard_limit(self) -> float:
        """Seconds a driver call may run before the watchdog gives up on it: drivers get
        ``call_timeout`` for their own sockets; this catches libraries that ignore it."""
        return self.settings.call_timeout * 3

    def _bounded(self, driver: PowerDriver, fn: Callable[[], T], lock: threading.Lock) -> T:
        """Run ``fn`` under the BMC lock in a watchdog thread. A call that outlives
        :attr:`hard_limit` is reported as a timeout; it keeps the lock until it really
        ends, so no other call reaches that BMC while it is stuck."""
        box: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            if not lock.acquire(timeout=self.hard_limit):
                box["error"] = CallTimeoutError(
                    f"{driver.power_type}: an earlier call to this device is still stuck"
                )
                done.set()
                return
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc
            finally:
                lock.release()
                done.set()

        threading.Thread(target=target, name="powerq-call", daemon=True).start()
        if not done.wait(self.hard_limit):
            raise CallTimeoutError(
                f"{driver.power_type}: no answer within {self.hard_limit:g} s (watchdog)"
            )
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def call(
        self, driver: PowerDriver, fn: Callable[[], T], result: NodeResult, *, retry: bool = True
    ) -> T:
        """Run one driver call under the BMC lock, retrying transient errors.

        Raises the last :class:`PowerError`; any other exception becomes a DeviceError.
        """
        lock = self.locks.get(driver.bmc_key())
        attempts = self.settings.max_attempts if retry else 1
        for attempt in range(1, attempts + 1):
            result.attempts += 1
            try:
                return self._bounded(driver, fn, lock)
            except TransientError:
                if attempt >= attempts:
                    raise
                self.sleep(self.backoff(attempt))
            except PowerError:
                raise
            except Exception as exc:  # a driver bug or untranslated library error
                raise DeviceError(
                    f"{driver.power_type}: unexpected {type(exc).__name__} from the driver"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def confirm(self, driver: PowerDriver, wanted: PowerState, result: NodeResult) -> PowerState:
        """Query until the node shows ``wanted``. Raises StateMismatchError at the deadline."""
        deadline = self.clock() + self.settings.confirm_timeout
        seen = PowerState.UNKNOWN
        last_error: PowerError | None = None
        while True:
            try:
                seen = self.call(driver, driver.query, result, retry=False)
                last_error = None
                if seen is wanted:
                    return seen
            except TransientError as exc:
                last_error = exc
            if self.clock() >= deadline:
                break
            self.sleep(self.settings.confirm_interval)
        if last_error is not None:
            raise last_error
        raise StateMismatchError(
            f"wanted {wanted}, still {seen} after {self.settings.confirm_timeout:g} s",
            wanted=str(wanted),
            seen=str(seen),
        )

    def run(
        self, node: str, driver: PowerDriver, action: str, options: dict[str, Any], worker: str = ""
    ) -> NodeResult:
        result = NodeResult(
            node=node, action=action, started=self.wall(), worker=worker,
            power_type=driver.power_type,
        )
        try:
            self._run(driver, Action(action), options, result)
        except PowerError as exc:
            result.outcome = Outcome.ERROR
            result.error = exc.to_dict()
            result.error["attempt"] = result.attempts
        except ValueError:
            result.outcome = Outcome.ERROR
            result.error = SettingsError(f"unknown action {action!r}").to_dict()
        result.finished = self.wall()
        return result

    def _run(
        self, driver: PowerDriver, action: Action, options: dict[str, Any], result: NodeResult
    ) -> None:
        queryable = driver.capabilities.power_query
        if action is Action.QUERY:
            if not queryable:
                result.state_after = str(PowerState.UNKNOWN)
                result.note = "power type cannot read the state"
                return
            state = self.call(driver, driver.query, result)
            result.state_before = result.state_after = str(state)
            return

        if action is Action.BOOT:
            device = BootDevice(options.get("device", "pxe"))
            self.call(
                driver,
                lambda: driver.set_boot_device(
                    device, efi=bool(options.get("efi")), persistent=bool(options.get("persistent"))
                ),
                result,
            )
            result.note = f"next boot: {device}" + (" (EFI)" if options.get("efi") else "")
            return

        before = self.call(driver, driver.query, result) if queryable else PowerState.UNKNOWN
        result.state_before = str(before)
        soft = bool(options.get("soft"))

        if action is Action.ON:
            if before is PowerState.ON:
                result.state_after = str(before)
                result.note = "already on"
                return
            self.call(driver, driver.power_on, result)
            self._settle(driver, PowerState.ON, result)
        elif action is Action.OFF:
            if before is PowerState.OFF:
                result.state_after = str(before)
                result.note = "already off"
                return
            self.call(driver, lambda: driver.power_off(soft=soft), result)
            self._settle(driver, PowerState.OFF, result)
        elif action is Action.CYCLE:
            if before is PowerState.OFF:
                # As MAAS does: cycling a node that is off powers it on.
                self.call(driver, driver.power_on, result)
                result.note = "was off: powered on"
            elif self.settings.cycle_mode == "native":
                # A native cycle is not idempotent: never retried blindly.
                self.call(driver, driver.power_cycle, result, retry=False)
            else:
                self.call(driver, lambda: driver.power_off(soft=soft), result)
                self._settle(driver, PowerState.OFF, result)
                self.call(driver, driver.power_on, result)
            self._settle(driver, PowerState.ON, result)
        else:  # pragma: no cover - Action is exhaustive
            raise UnsupportedError(f"action {action}")

    def _settle(self, driver: PowerDriver, wanted: PowerState, result: NodeResult) -> None:
        if not driver.capabilities.power_query:
            result.state_after = str(PowerState.UNKNOWN)
            return
        try:
            result.state_after = str(self.confirm(driver, wanted, result))
        except StateMismatchError as exc:
            result.state_after = exc.details.get("seen")
            raise


__all__ = [
    "Action",
    "BmcLocks",
    "NodeResult",
    "NodeRunner",
    "Outcome",
    "PolicySettings",
]
