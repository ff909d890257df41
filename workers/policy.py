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
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from drivers.base import BootDevice, PowerDriver, PowerState
from drivers.errors import (
    BusyError,
    CallTimeoutError,
    DeviceError,
    PowerError,
    SettingsError,
    StateMismatchError,
    TransientError,
    UnreachableError,
    UnsupportedError,
)

if TYPE_CHECKING:
    from workers.bmcguard import BmcGuard

T = TypeVar("T")


class Cancelled(Exception):
    """The job was cancelled before this node's power action was sent."""


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
    busy_backoff_max: float = 30.0
    """Largest retry delay ceiling after a busy reply (issue 5); its ceiling grows 4x per try."""

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
    planned_at: float | None = None
    """When the power-on timeline planned this node's start (epoch seconds), if it did."""
    power_on_at: float | None = None
    """When the power-on was admitted within the budgets and sent (Redis clock); for a
    retried power-on, the slot of the last attempt (each attempt takes its own slot)."""

    def to_dict(self) -> dict[str, Any]:
        # As dataclasses.asdict, without its recursive deep copy (a hot path at fleet scale).
        out = {name: getattr(self, name) for name in _RESULT_FIELDS}
        if self.error is not None:
            out["error"] = dict(self.error)
        return out


_RESULT_FIELDS = tuple(f.name for f in fields(NodeResult))


class Gate(Protocol):
    """Holds a node for its turn on a power-on timeline (see ``workers/release.py``)."""

    not_before: float

    def wait_turn(self) -> None:
        """Return at the node's planned time; raise ``Cancelled`` if the job is cancelled."""

    def admit(self, *, cancellable: bool = True) -> float:
        """Take a start slot in every budget; return the start time."""

    def readmit(self, attempt: int) -> float:
        """Take another start slot for retry ``attempt`` (2, 3, ...) of a power-on whose
        earlier attempt failed; earlier slots stay taken. Never cancelled (the earlier
        attempt may have reached the node). Return the start time."""

    def sent(self, attempt: int = 1) -> None:
        """Attempt ``attempt``'s power-on call returned: count its start from now on."""


def ended_by(result: NodeResult, exc: Cancelled | PowerError | ValueError) -> None:
    """Fill ``result`` for an action that ended in ``exc``: skipped if cancelled, the
    error (with the attempt it came at) for a PowerError, a settings error for a
    ValueError (an unknown action or boot device)."""
    if isinstance(exc, Cancelled):
        result.outcome = Outcome.SKIPPED
        result.note = "cancelled"
    elif isinstance(exc, PowerError):
        result.outcome = Outcome.ERROR
        result.error = exc.to_dict()
        result.error["attempt"] = result.attempts
    else:
        result.outcome = Outcome.ERROR
        result.error = SettingsError(f"unknown action or boot device in {result.action!r}").to_dict()


Step = tuple[Any, ...]
"""One step of an action, as :func:`action_steps` yields it (the executor's answer is sent
back into the generator):

- ``("query",)``: read the power state, retrying transient errors -> :class:`PowerState`;
- ``("journal", phase)``: journal that ``phase`` is about to be sent (exactly-once);
- ``("admit", cancellable)``: take a start slot within the budgets (gated only) -> time;
- ``("off", soft)``: power off, retrying; ``("on", native)``: power on (``native``: a
  native power cycle, never retried), each retry in a new slot when gated;
- ``("settle", wanted)``: query until the node shows ``wanted`` (state_after set);
- ``("boot", device, efi, persistent)``: set the next boot device, retrying.
"""


def action_steps(
    action: Action, options: dict[str, Any], result: NodeResult, *, queryable: bool,
    gated: bool, cycle_mode: str,
) -> Generator[Step, Any, None]:
    """What an action does, as steps for an executor to carry out: the thread per node of
    :class:`NodeRunner` and the IPMI batch of ``workers/fastpath.py`` both run these, so the
    two cannot drift apart. Fills ``result`` (states, note, power_on_at) as it goes."""
    if action is Action.QUERY:
        if not queryable:
            result.state_after = str(PowerState.UNKNOWN)
            result.note = "power type cannot read the state"
            return
        state = yield ("query",)
        result.state_before = result.state_after = str(state)
        return

    if action is Action.BOOT:
        device = BootDevice(options.get("device", "pxe"))
        yield ("journal", "boot")
        yield ("boot", device, bool(options.get("efi")), bool(options.get("persistent")))
        result.note = f"next boot: {device}" + (" (EFI)" if options.get("efi") else "")
        return

    before = (yield ("query",)) if queryable else PowerState.UNKNOWN
    result.state_before = str(before)
    soft = bool(options.get("soft"))

    if action is Action.ON:
        if before is PowerState.ON:
            result.state_after = str(before)
            result.note = "already on"
            return
        if gated:
            result.power_on_at = yield ("admit", True)
        yield ("journal", "on")
        yield ("on", False)
        yield ("settle", PowerState.ON)
    elif action is Action.OFF:
        if before is PowerState.OFF:
            result.state_after = str(before)
            result.note = "already off"
            return
        yield ("journal", "off")
        yield ("off", soft)
        yield ("settle", PowerState.OFF)
    elif action is Action.CYCLE:
        doubt = options.get("in_doubt")
        if doubt and doubt != "cycle:off" and before is PowerState.ON:
            # An earlier delivery reached the power-on (or a native cycle) and the node
            # is on: it was cycled already. Never twice.
            result.state_after = str(before)
            result.note = "in doubt after a redelivery: found on, not cycled again"
            return
        # (journaled "cycle:off" and found on: that power-off never took effect, so the
        # cycle is done now, for the first time)
        if before is PowerState.OFF:
            # As MAAS does: cycling a node that is off powers it on (and an in-doubt
            # cycle found off is completed).
            if gated:
                result.power_on_at = yield ("admit", True)
            yield ("journal", "cycle:on")
            yield ("on", False)
            result.note = "was off: powered on"
        elif cycle_mode == "native":
            if gated:
                result.power_on_at = yield ("admit", True)
            yield ("journal", "cycle:native")
            yield ("on", True)
        else:
            yield ("journal", "cycle:off")
            yield ("off", soft)
            yield ("settle", PowerState.OFF)
            if gated:
                # Once off, the node comes back on: a cancel no longer stops it.
                result.power_on_at = yield ("admit", False)
            yield ("journal", "cycle:on")
            yield ("on", False)
        yield ("settle", PowerState.ON)
    else:  # pragma: no cover - Action is exhaustive
        raise UnsupportedError(f"action {action}")


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
    guard: BmcGuard | None = None
    """Per-BMC lease across processes and parking (issue 5, ``workers/bmcguard.py``)."""

    def backoff(self, attempt: int, busy: bool = False) -> float:
        """Full-jitter delay before retry number ``attempt`` (1-based). After a busy
        reply (no free session, lease held elsewhere) the ceiling grows faster and
        further: ``backoff_base * 4**attempt`` up to ``busy_backoff_max``."""
        if busy:
            ceiling = min(self.settings.busy_backoff_max, self.settings.backoff_base * 4 ** attempt)
        else:
            ceiling = min(self.settings.backoff_max, self.settings.backoff_base * (2 ** (attempt - 1)))
        return self.rng() * ceiling

    @property
    def hard_limit(self) -> float:
        """Seconds a driver call may run before the watchdog gives up on it: drivers get
        ``call_timeout`` for their own sockets; this catches libraries that ignore it."""
        return self.settings.call_timeout * 3

    def _lease_per_action(self, driver: PowerDriver) -> bool:
        """A lease held for a node's whole action: only for drivers whose BMC serves that
        one node (``lease_per_action``); a BMC shared by many nodes (a vCenter, a chassis
        manager) is leased per call, so its nodes' actions interleave."""
        return (self.guard is not None and self.guard.leasing
                and bool(getattr(driver, "lease_per_action", False))
                and str(id(driver)) not in driver.bmc_key())

    @property
    def _local(self) -> threading.local:
        """This thread's state of the action it runs: ``keys``, the BMC leases it holds
        for the whole action; ``before``, the hook to run before the next call's retries
        (a power-on's new budget slot)."""
        local = self.__dict__.get("_thread_local")
        if local is None:
            local = self.__dict__["_thread_local"] = threading.local()
        return local

    def _bounded(self, driver: PowerDriver, fn: Callable[[], T], lock: threading.Lock) -> T:
        """Run ``fn`` under the BMC lock in a watchdog thread. A call that outlives
        :attr:`hard_limit` is reported as a timeout; it keeps the lock until it really
        ends, so no other call reaches that BMC while it is stuck. A driver whose calls
        end by themselves within their timeout (``calls_bounded``) runs in this thread."""
        if getattr(driver, "calls_bounded", False):
            if not lock.acquire(timeout=self.hard_limit):
                raise CallTimeoutError(
                    f"{driver.power_type}: an earlier call to this device is still stuck")
            try:
                return fn()
            finally:
                lock.release()
        box: dict[str, Any] = {}
        done = threading.Event()
        settle = threading.Lock()  # makes "finished" and "abandoned" exclusive

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
                with settle:
                    box["finished"] = True
                    abandoned = box.get("abandoned", False)
                if abandoned:
                    # The caller gave up and has closed the driver already; the call may
                    # have opened a session since: close again, so none is left open.
                    try:
                        driver.close()
                    except Exception:  # close() must never raise; nothing to report to
                        pass
                lock.release()
                done.set()

        threading.Thread(target=target, name="powerq-call", daemon=True).start()
        if not done.wait(self.hard_limit):
            with settle:
                if not box.get("finished"):
                    box["abandoned"] = True
            if box.get("abandoned"):
                raise CallTimeoutError(
                    f"{driver.power_type}: no answer within {self.hard_limit:g} s (watchdog)"
                )
            done.wait()  # it finished right at the limit: use its answer
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def call(
        self, driver: PowerDriver, fn: Callable[[], T], result: NodeResult, *, retry: bool = True
    ) -> T:
        """Run one driver call under the BMC lock, retrying transient errors. Inside
        :meth:`_power_on`, each retry first takes a new budget slot (after the backoff,
        outside the BMC lock).

        Raises the last :class:`PowerError`; any other exception becomes a DeviceError.
        With a :attr:`guard`, each attempt also holds the BMC's lease (inside the process
        lock); a parked BMC fails at once; a call that fails after its retries counts
        towards parking the BMC.
        """
        key = driver.bmc_key()
        lock = self.locks.get(key)
        guard = self.guard if self.guard is not None and str(id(driver)) not in key else None
        held = key in getattr(self._local, "keys", ())  # this action holds the lease
        attempt_fn: Callable[[], T] = fn if guard is None or held else (lambda: guard.run(key, fn))
        attempts = self.settings.max_attempts if retry else 1
        before_retry: Callable[[int], None] | None = getattr(self._local, "before", None)
        self._local.before = None  # for this call only, not the confirming queries
        for attempt in range(1, attempts + 1):
            result.attempts += 1
            began = self.clock()
            try:
                if guard is not None and lock.locked():
                    guard.check(key)  # parked: no wait behind a call still stuck there
                return self._bounded(driver, attempt_fn, lock)
            except TransientError as exc:
                if exc.details.get("parked"):
                    raise  # parked: fail at once, no retry storm
                # A device that got the whole call timeout and still did not answer is not
                # asked again in this job: retries are for quick failures (busy, refused,
                # a lost packet), and waiting out a dead BMC twice is how tools hang.
                spent_it_all = (isinstance(exc, CallTimeoutError | UnreachableError)
                                and self.clock() - began >= self.settings.call_timeout)
                if attempt >= attempts or spent_it_all:
                    if guard is not None:
                        guard.failed(key, exc, result.node)
                    raise
                self.sleep(self.backoff(attempt, busy=isinstance(exc, BusyError)))
                if before_retry is not None:
                    before_retry(attempt + 1)
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
        self, node: str, driver: PowerDriver, action: str, options: dict[str, Any], worker: str = "",
        gate: Gate | None = None, on_act: Callable[[str], None] | None = None,
    ) -> NodeResult:
        """Run ``action`` on one node. With a ``gate`` (a power-on timeline), the node
        waits for its planned time before anything is sent, and each power-on waits for
        a start slot within the budgets; a job cancelled before then leaves the node
        untouched (outcome ``skipped``, note ``cancelled``).

        ``on_act(phase)`` is called right before each call that may change the node
        (``on``, ``off``, ``boot``, ``cycle:off``, ``cycle:on``, ``cycle:native``): the
        journal of exactly-once delivery; if it raises, nothing is sent. With
        ``options["in_doubt"]`` = the last phase an earlier delivery journaled, a cycle
        that reached its power-on and finds the node on is not done again."""
        result = NodeResult(
            node=node, action=action, started=self.wall(), worker=worker,
            power_type=driver.power_type,
        )
        try:
            if gate is not None:
                result.planned_at = gate.not_before
                gate.wait_turn()
                result.started = self.wall()
            if self._lease_per_action(driver):
                # One lease for the whole action (query, act, confirm): 2 Redis scripts per
                # node instead of 2 per call, and no other job's call in between.
                key = driver.bmc_key()
                assert self.guard is not None
                with self.guard.holding(key):
                    self._local.keys = {key}
                    try:
                        self._run(driver, Action(action), options, result, gate, on_act)
                    finally:
                        self._local.keys = set()
            else:
                self._run(driver, Action(action), options, result, gate, on_act)
        except (Cancelled, PowerError, ValueError) as exc:
            ended_by(result, exc)
        result.finished = self.wall()
        return result

    def _run(
        self, driver: PowerDriver, action: Action, options: dict[str, Any], result: NodeResult,
        gate: Gate | None = None, on_act: Callable[[str], None] | None = None,
    ) -> None:
        """Carry out :func:`action_steps` one step at a time with this driver."""
        steps = action_steps(action, options, result, queryable=driver.capabilities.power_query,
                             gated=gate is not None, cycle_mode=self.settings.cycle_mode)
        reply: Any = None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration:
                return
            reply = self._step(driver, step, result, gate, on_act)

    def _step(
        self, driver: PowerDriver, step: Step, result: NodeResult, gate: Gate | None,
        on_act: Callable[[str], None] | None,
    ) -> Any:
        kind = step[0]
        if kind == "query":
            return self.call(driver, driver.query, result)
        if kind == "journal":
            if on_act is not None:
                on_act(step[1])
            return None
        if kind == "admit":
            assert gate is not None
            return gate.admit(cancellable=step[1])
        if kind == "off":
            soft = step[1]
            return self.call(driver, lambda: driver.power_off(soft=soft), result)
        if kind == "on":
            if step[1]:  # a native cycle: not idempotent, never retried blindly
                return self._power_on(driver, result, gate, driver.power_cycle, retry=False)
            return self._power_on(driver, result, gate)
        if kind == "settle":
            return self._settle(driver, step[1], result)
        if kind == "boot":
            device, efi, persistent = step[1], step[2], step[3]
            return self.call(
                driver, lambda: driver.set_boot_device(device, efi=efi, persistent=persistent),
                result)
        raise UnsupportedError(f"step {kind}")  # pragma: no cover - action_steps is exhaustive

    def _power_on(
        self, driver: PowerDriver, result: NodeResult, gate: Gate | None,
        send: Callable[[], None] | None = None, *, retry: bool = True,
    ) -> None:
        """Send a power-on (``send``, default ``driver.power_on``; its first slot already
        taken), each retry in a new slot.

        The first slot is taken right before the first attempt; a retry comes a backoff
        (and maybe a whole call timeout) later, so sent on the first slot it could start
        the node outside it and break the budget at the PDU. A retry therefore takes a
        slot of its own, and the earlier one stays counted: the failed attempt may have
        reached the node and started it (a lost reply). A native cycle is never retried
        (``retry=False``), so its one slot is the one it used. (The hook reaches
        :meth:`call` through a thread-local, so a subclass overriding ``call`` keeps it.)

        Each attempt tells the gate when its call returned (``gate.sent``), even one the
        watchdog gave up on, when it really ends: the budgets then count the start until
        a window after the BMC may have executed it."""
        fn = send or driver.power_on
        if gate is None:
            self.call(driver, fn, result, retry=retry)
            return
        taken = [1]  # the attempt whose slot the next call uses

        def readmit(attempt: int) -> None:
            result.power_on_at = gate.readmit(attempt)
            taken[0] = attempt

        def attempt() -> None:
            number = taken[0]
            try:
                fn()
            finally:
                gate.sent(number)

        self._local.before = readmit
        try:
            self.call(driver, attempt, result, retry=retry)
        finally:
            self._local.before = None

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
    "Step",
    "action_steps",
    "ended_by",
    "Cancelled",
    "Gate",
    "BmcLocks",
    "NodeResult",
    "NodeRunner",
    "Outcome",
    "PolicySettings",
]
