"""The execution policy with an injected clock and a scripted device.

These are the cases no protocol peer can stage at an exact instant (a transient error on
the second call, a state that never settles); the real peers are driven in the drivers'
and end-to-end tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from drivers.base import Capabilities, DriverSettings, PowerDriver, PowerState
from drivers.errors import AuthError, UnreachableError
from workers.policy import BmcLocks, Cancelled, NodeRunner, PolicySettings


class ScriptSettings(DriverSettings):
    pass


class ScriptedDevice(PowerDriver):
    """A device whose answers are a script: each call pops the next behaviour."""

    power_type = "scripted"
    description = "scripted device for policy tests"
    settings_model = ScriptSettings
    capabilities = Capabilities(power_query=True)

    def __init__(self, state: PowerState = PowerState.OFF, key: str = "bmc-1") -> None:
        super().__init__(ScriptSettings())
        self.state = state
        self.key = key
        self.calls: list[str] = []
        self.faults: dict[str, list[Exception]] = {}
        self.follow = True  # whether actions change the state

    def bmc_key(self) -> str:
        return self.key

    def _do(self, name: str, effect: Callable[[], None] | None = None) -> None:
        self.calls.append(name)
        pending = self.faults.get(name)
        if pending:
            raise pending.pop(0)
        if effect and self.follow:
            effect()

    def power_on(self) -> None:
        self._do("on", lambda: setattr(self, "state", PowerState.ON))

    def power_off(self, soft: bool = False) -> None:
        self._do("soft_off" if soft else "off", lambda: setattr(self, "state", PowerState.OFF))

    def power_cycle(self) -> None:
        self._do("cycle", lambda: setattr(self, "state", PowerState.ON))

    def query(self) -> PowerState:
        self._do("query")
        return self.state


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def runner(clock: FakeClock, **overrides: float | int | str) -> NodeRunner:
    settings = PolicySettings(**{"confirm_timeout": 5.0, "confirm_interval": 0.5, **overrides})  # type: ignore[arg-type]
    return NodeRunner(settings, locks=BmcLocks(), sleep=clock.sleep, clock=clock, wall=clock, rng=lambda: 1.0)


def test_on_for_a_running_node_sends_nothing_but_the_query() -> None:
    dev = ScriptedDevice(PowerState.ON)
    result = runner(FakeClock()).run("n1", dev, "on", {})
    assert result.outcome == "ok"
    assert dev.calls == ["query"]
    assert result.note == "already on"


def test_cycle_is_off_confirm_on_confirm() -> None:
    dev = ScriptedDevice(PowerState.ON)
    result = runner(FakeClock()).run("n1", dev, "cycle", {})
    assert result.outcome == "ok", result.error
    assert dev.calls == ["query", "off", "query", "on", "query"]
    assert (result.state_before, result.state_after) == ("on", "on")


def test_cycle_of_an_off_node_only_powers_it_on() -> None:
    dev = ScriptedDevice(PowerState.OFF)
    result = runner(FakeClock()).run("n1", dev, "cycle", {})
    assert dev.calls == ["query", "on", "query"]
    assert result.state_after == "on"


def test_native_cycle_is_never_retried() -> None:
    dev = ScriptedDevice(PowerState.ON)
    dev.faults["cycle"] = [UnreachableError("no answer")]
    result = runner(FakeClock(), cycle_mode="native").run("n1", dev, "cycle", {})
    assert result.outcome == "error"
    assert result.error and result.error["code"] == "unreachable"
    assert dev.calls.count("cycle") == 1


def test_transient_errors_are_retried_with_full_jitter_backoff() -> None:
    clock = FakeClock()
    dev = ScriptedDevice(PowerState.OFF)
    dev.faults["on"] = [UnreachableError(), UnreachableError()]  # busy backs off longer (issue 5)
    result = runner(clock, max_attempts=3, backoff_base=0.5, backoff_max=8.0).run("n1", dev, "on", {})
    assert result.outcome == "ok", result.error
    assert dev.calls.count("on") == 3
    # rng() = 1.0 gives each ceiling: 0.5 then 1.0
    assert clock.slept[:2] == [0.5, 1.0]


def test_fatal_errors_are_not_retried() -> None:
    dev = ScriptedDevice(PowerState.OFF)
    dev.faults["query"] = [AuthError("refused")]
    result = runner(FakeClock(), max_attempts=5).run("n1", dev, "on", {})
    assert result.outcome == "error"
    assert result.error and result.error["code"] == "auth_failed"
    assert result.attempts == 1
    assert dev.calls == ["query"]


def test_state_that_never_follows_is_a_state_mismatch() -> None:
    clock = FakeClock()
    dev = ScriptedDevice(PowerState.OFF)
    dev.follow = False
    result = runner(clock, confirm_timeout=3.0, confirm_interval=0.5).run("n1", dev, "on", {})
    assert result.outcome == "error"
    assert result.error and result.error["code"] == "state_mismatch"
    assert result.state_after == "off"
    assert 2.5 <= clock.now <= 4.0


def test_retries_exhausted_report_the_transient_code_and_attempts() -> None:
    dev = ScriptedDevice(PowerState.OFF)
    dev.faults["query"] = [UnreachableError()] * 3
    result = runner(FakeClock(), max_attempts=3).run("n1", dev, "query", {})
    assert result.error and result.error["code"] == "unreachable"
    assert result.attempts == 3


def test_unexpected_driver_exception_becomes_device_error() -> None:
    dev = ScriptedDevice(PowerState.OFF)
    dev.faults["query"] = [RuntimeError("library bug with password=hunter2")]
    result = runner(FakeClock()).run("n1", dev, "query", {})
    assert result.error and result.error["code"] == "device_error"
    assert "hunter2" not in str(result.to_dict())


def test_one_call_in_flight_per_bmc() -> None:
    """Two nodes behind one BMC never have calls in flight at the same time."""
    in_flight = 0
    peak = 0
    guard = threading.Lock()

    class Slow(ScriptedDevice):
        def query(self) -> PowerState:
            nonlocal in_flight, peak
            with guard:
                in_flight += 1
                peak = max(peak, in_flight)
            time.sleep(0.02)
            with guard:
                in_flight -= 1
            return self.state

    locks = BmcLocks()
    r = NodeRunner(PolicySettings(), locks=locks)
    devices = [Slow(PowerState.ON, key="shared") for _ in range(6)]
    threads = [threading.Thread(target=r.run, args=(f"n{i}", d, "query", {})) for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 1


@pytest.mark.parametrize("action", ["on", "off", "cycle", "query"])
def test_results_are_plain_data(action: str) -> None:
    import json

    result = runner(FakeClock()).run("n1", ScriptedDevice(PowerState.ON), action, {})
    json.dumps(result.to_dict())


def test_a_call_that_never_returns_is_a_timeout_and_blocks_nothing_else() -> None:
    """A library that ignores its timeout (pyghmi's login loop) cannot hang a worker."""
    release = threading.Event()

    class Stuck(ScriptedDevice):
        def query(self) -> PowerState:
            self.calls.append("query")
            release.wait(10)
            return self.state

    locks = BmcLocks()
    settings = PolicySettings(call_timeout=0.1, max_attempts=1)
    stuck = Stuck(PowerState.ON, key="bmc-stuck")
    started = time.monotonic()
    result = NodeRunner(settings, locks=locks).run("n1", stuck, "query", {})
    assert result.error and result.error["code"] == "timeout"
    assert time.monotonic() - started < 2
    # A second node behind the same BMC is not sent anything while the first call is stuck.
    other = ScriptedDevice(PowerState.ON, key="bmc-stuck")
    result = NodeRunner(settings, locks=locks).run("n2", other, "query", {})
    assert result.error and result.error["code"] == "timeout"
    assert other.calls == []
    release.set()
    deadline = time.monotonic() + 5  # the stuck call ends and lets go of the BMC
    while locks.get("bmc-stuck").locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    result = NodeRunner(settings, locks=locks).run("n2", other, "query", {})
    assert result.outcome == "ok" and other.calls == ["query"]


# -- power-on timeline gate -----------------------------------------------------------------


class RecordingGate:
    """A gate of our own (the protocol in workers/policy.py) that records when it is asked."""

    def __init__(self, dev: ScriptedDevice, cancel_at: str | None = None) -> None:
        self.dev = dev
        self.not_before = 123.0
        self.cancel_at = cancel_at
        self.asked: list[tuple[str, int, bool]] = []  # (what, driver calls so far, cancellable)
        self.returned: list[tuple[int, int]] = []

    def wait_turn(self) -> None:
        self.asked.append(("turn", len(self.dev.calls), True))
        if self.cancel_at == "turn":
            raise Cancelled()

    def admit(self, *, cancellable: bool = True) -> float:
        self.asked.append(("admit", len(self.dev.calls), cancellable))
        if self.cancel_at == "admit" and cancellable:
            raise Cancelled()
        return 200.0 + len(self.asked)

    def readmit(self, attempt: int) -> float:
        self.asked.append((f"readmit {attempt}", len(self.dev.calls), False))
        return 200.0 + len(self.asked)

    def sent(self, attempt: int = 1) -> None:
        self.returned.append((attempt, len(self.dev.calls)))  # (attempt, driver calls so far)


def test_gate_holds_the_node_before_anything_is_sent_and_admits_right_before_on() -> None:
    dev = ScriptedDevice(PowerState.OFF)
    gate = RecordingGate(dev)
    result = runner(FakeClock()).run("n1", dev, "on", {}, gate=gate)
    assert result.outcome == "ok"
    assert gate.asked == [("turn", 0, True), ("admit", 1, True)]  # after the query, before on
    assert dev.calls == ["query", "on", "query"]
    assert result.planned_at == 123.0 and result.power_on_at == 202.0


def test_gate_is_not_asked_for_a_slot_when_the_node_is_already_on() -> None:
    dev = ScriptedDevice(PowerState.ON)
    gate = RecordingGate(dev)
    result = runner(FakeClock()).run("n1", dev, "on", {}, gate=gate)
    assert [a[0] for a in gate.asked] == ["turn"]
    assert result.power_on_at is None and result.note == "already on"


def test_cancel_before_the_turn_sends_nothing() -> None:
    dev = ScriptedDevice(PowerState.OFF)
    result = runner(FakeClock()).run("n1", dev, "on", {}, gate=RecordingGate(dev, cancel_at="turn"))
    assert (result.outcome, result.note) == ("skipped", "cancelled")
    assert dev.calls == []


def test_cancel_while_waiting_for_a_slot_leaves_the_node_off() -> None:
    dev = ScriptedDevice(PowerState.OFF)
    result = runner(FakeClock()).run("n1", dev, "on", {}, gate=RecordingGate(dev, cancel_at="admit"))
    assert (result.outcome, result.note) == ("skipped", "cancelled")
    assert dev.calls == ["query"]


def test_a_cycle_that_powered_off_always_powers_back_on_even_if_cancelled() -> None:
    dev = ScriptedDevice(PowerState.ON)
    gate = RecordingGate(dev, cancel_at="admit")
    result = runner(FakeClock()).run("n1", dev, "cycle", {}, gate=gate)
    assert result.outcome == "ok", result.error
    assert dev.calls == ["query", "off", "query", "on", "query"]
    assert gate.asked[-1] == ("admit", 3, False)  # after off + confirm, not cancellable


def test_native_cycle_takes_its_slot_before_the_cycle() -> None:
    dev = ScriptedDevice(PowerState.ON)
    gate = RecordingGate(dev)
    result = runner(FakeClock(), cycle_mode="native").run("n1", dev, "cycle", {}, gate=gate)
    assert result.outcome == "ok"
    assert gate.asked[-1] == ("admit", 1, True) and dev.calls[1] == "cycle"
    assert gate.returned == [(1, 2)]


@pytest.mark.parametrize(("action", "state", "calls_before_on"), [
    ("on", PowerState.OFF, 1), ("cycle", PowerState.OFF, 1), ("cycle", PowerState.ON, 3)])
def test_a_retried_power_on_takes_a_new_slot_before_each_retry(
    action: str, state: PowerState, calls_before_on: int,
) -> None:
    # A retry goes out a backoff after its first slot: sent on that slot it could start
    # the node outside it (workers/policy.py, NodeRunner._readmit).
    dev = ScriptedDevice(state)
    dev.faults["on"] = [UnreachableError(), UnreachableError()]
    gate = RecordingGate(dev)
    result = runner(FakeClock(), max_attempts=3).run("n1", dev, action, {}, gate=gate)
    assert result.outcome == "ok", result.error
    n = calls_before_on
    assert gate.asked[1:] == [("admit", n, action == "on" or state is PowerState.OFF),
                              ("readmit 2", n + 1, False), ("readmit 3", n + 2, False)]
    assert dev.calls.count("on") == 3
    assert result.power_on_at == 204.0  # the slot of the attempt that went through
    # each attempt's start is counted from when its call returned, in its own slot
    assert gate.returned == [(1, n + 1), (2, n + 2), (3, n + 3)]


def test_a_power_on_that_is_not_retried_takes_one_slot() -> None:
    dev = ScriptedDevice(PowerState.OFF)
    dev.faults["on"] = [AuthError("refused")]
    gate = RecordingGate(dev)
    result = runner(FakeClock(), max_attempts=3).run("n1", dev, "on", {}, gate=gate)
    assert result.outcome == "error"
    assert [a[0] for a in gate.asked] == ["turn", "admit"]
    assert gate.returned == [(1, 2)]  # it failed, but may have reached the node


def test_a_runner_that_overrides_call_still_retakes_a_slot_per_retry() -> None:
    # The worker's runner wraps call() (metrics) with the base signature: the retry hook
    # reaches NodeRunner.call all the same.
    class Wrapping(NodeRunner):
        def call(self, driver, fn, result, *, retry=True):  # type: ignore[no-untyped-def]
            return super().call(driver, fn, result, retry=retry)

    clock = FakeClock()
    base = runner(clock, max_attempts=2)
    wrapping = Wrapping(base.settings, locks=BmcLocks(), sleep=clock.sleep, clock=clock, wall=clock,
                        rng=lambda: 1.0)
    dev = ScriptedDevice(PowerState.OFF)
    dev.faults["on"] = [UnreachableError()]
    gate = RecordingGate(dev)
    assert wrapping.run("n1", dev, "on", {}, gate=gate).outcome == "ok"
    assert [a[0] for a in gate.asked] == ["turn", "admit", "readmit 2"]
    assert dev.calls == ["query", "on", "on", "query"]
