"""Per-BMC protection (workers/bmcguard.py with the policy's call()): a Redis lease per
BMC across runners, threads and processes; parking after repeated failures; the busy
back-off. Against the session's real Redis (tests/conftest.py); parking clocks injected."""

from __future__ import annotations

import multiprocessing
import re
import threading
import time
from typing import Any

import pytest
import redis

from drivers.base import Capabilities, DriverSettings, PowerDriver, PowerState
from drivers.errors import AuthError, BusyError, CallTimeoutError, UnreachableError
from scheduler.config import Config
from workers.bmcguard import BmcGuard, GuardSettings, parked, unpark
from workers.policy import BmcLocks, NodeResult, NodeRunner, PolicySettings


class _Settings(DriverSettings):
    pass


class Device(PowerDriver):
    """One node behind BMC ``key``: every query is counted, optionally slow, and the
    calls in flight per key are tracked across every Device of the test."""

    power_type = "guarded"
    description = "device for BMC guard tests"
    settings_model = _Settings
    capabilities = Capabilities(power_query=True)
    inflight: dict[str, int] = {}
    peak: dict[str, int] = {}
    track = threading.Lock()

    def __init__(self, key: str = "bmc-1", delay: float = 0.0) -> None:
        super().__init__(_Settings())
        self.key, self.delay = key, delay
        self.calls = 0
        self.faults: list[Exception] = []

    def bmc_key(self) -> str:
        return self.key

    def query(self) -> PowerState:
        with self.track:
            self.calls += 1
            n = self.inflight[self.key] = self.inflight.get(self.key, 0) + 1
            self.peak[self.key] = max(self.peak.get(self.key, 0), n)
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.faults:
                raise self.faults.pop(0)
            return PowerState.ON
        finally:
            with self.track:
                self.inflight[self.key] -= 1

    def power_on(self) -> None:
        raise NotImplementedError

    def power_off(self, soft: bool = False) -> None:
        raise NotImplementedError

    def power_cycle(self) -> None:
        raise NotImplementedError


class Wall:
    """An injected epoch clock for parking."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make_guard(client: redis.Redis, prefix: str, wall: Any = time.time, **settings: Any) -> BmcGuard:
    guard = BmcGuard(client, prefix, GuardSettings(**settings), wall=wall)
    return guard


def make_runner(guard: BmcGuard | None, slept: list[float] | None = None, **policy: Any) -> NodeRunner:
    """A runner with its own process locks (as another worker process would have)."""
    settings = PolicySettings(**{"max_attempts": 1, "backoff_base": 0.5, **policy})
    sleep = slept.append if slept is not None else time.sleep
    return NodeRunner(settings, locks=BmcLocks(), sleep=sleep, rng=lambda: 1.0, guard=guard)


@pytest.fixture()
def client(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


# -- one call in flight per BMC ---------------------------------------------------------------
def _run_side_by_side(runners: list[NodeRunner], key: str, per_runner: int = 2) -> list[Exception]:
    errors: list[Exception] = []
    devices = [Device(key, delay=0.03) for _ in range(len(runners) * per_runner)]
    threads = []
    for i, device in enumerate(devices):
        runner = runners[i % len(runners)]
        threads.append(threading.Thread(target=lambda r=runner, d=device: _call_n(r, d, 5, errors)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def _call_n(runner: NodeRunner, device: Device, n: int, errors: list[Exception]) -> None:
    for _ in range(n):
        try:
            runner.call(device, device.query, NodeResult("n", "query"))
        except Exception as exc:
            errors.append(exc)


def test_lease_excludes_two_runners_in_threads(client: redis.Redis, prefix: str) -> None:
    key = f"{prefix}-bmc-a"
    runners = [make_runner(make_guard(client, prefix)) for _ in range(2)]
    errors = _run_side_by_side(runners, key)
    assert errors == []
    assert Device.peak[key] == 1
    assert client.exists(f"{prefix}:bmclease:{key}") == 0  # released


def test_process_mode_does_not_exclude_across_runners(client: redis.Redis, prefix: str) -> None:
    """The same load with per-process locks only: two "processes" reach the BMC at once
    (the case the lease exists for)."""
    key = f"{prefix}-bmc-b"
    runners = [make_runner(make_guard(client, prefix, bmc_lease="process")) for _ in range(2)]
    assert _run_side_by_side(runners, key) == []
    assert Device.peak[key] == 2


def _process_main(url: str, prefix: str, key: str, calls: int) -> None:
    """A separate process: ``calls`` lease-holding calls that count themselves in Redis."""
    r = redis.Redis.from_url(url, decode_responses=True)
    guard = BmcGuard(r, prefix, GuardSettings(bmc_lease_wait=30))

    def call() -> None:
        n = r.incr(f"{prefix}:test:inflight")
        r.eval("if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then "
               "redis.call('SET', KEYS[1], ARGV[1]) end", 1, f"{prefix}:test:peak", n)
        time.sleep(0.02)
        r.decr(f"{prefix}:test:inflight")

    for _ in range(calls):
        guard.run(key, call)
    r.incr(f"{prefix}:test:finished")


def test_lease_excludes_two_processes(redis_server: Any, client: redis.Redis, prefix: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_main, args=(redis_server.url, prefix, "bmc-mp", 15))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert client.get(f"{prefix}:test:finished") == "2"
    assert client.get(f"{prefix}:test:peak") == "1"


def _hold_forever(url: str, prefix: str, key: str) -> None:
    r = redis.Redis.from_url(url, decode_responses=True)
    guard = BmcGuard(r, prefix, GuardSettings(bmc_lease_ttl=0.5))

    def stuck() -> None:
        r.set(f"{prefix}:test:holding", "1")
        time.sleep(120)

    guard.run(key, stuck)


def test_lease_renewed_while_running_and_freed_after_a_crash(
    redis_server: Any, client: redis.Redis, prefix: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_hold_forever, args=(redis_server.url, prefix, "bmc-crash"))
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while not client.get(f"{prefix}:test:holding"):
            assert time.monotonic() < deadline and proc.is_alive()
            time.sleep(0.02)
        time.sleep(1.2)  # > 2 TTLs: only renewal keeps it
        assert client.exists(f"{prefix}:bmclease:bmc-crash") == 1
        waiter = make_guard(client, prefix, bmc_lease_wait=0.2)
        with pytest.raises(BusyError) as info:
            waiter.run("bmc-crash", lambda: None)
        assert info.value.details.get("lease") is True
    finally:
        proc.kill()
        proc.join(10)
    started = time.monotonic()
    assert make_guard(client, prefix, bmc_lease_wait=5).run("bmc-crash", lambda: "free") == "free"
    assert time.monotonic() - started < 1.0  # within the 0.5 s TTL (plus polling)


def test_lease_wait_is_busy_and_retried_with_the_busy_backoff(client: redis.Redis, prefix: str) -> None:
    client.set(f"{prefix}:bmclease:bmc-held", "someone-else", px=60_000)
    slept: list[float] = []
    runner = make_runner(make_guard(client, prefix, bmc_lease_wait=0.05), slept,
                         max_attempts=3, busy_backoff_max=30.0)
    device = Device("bmc-held")
    result = NodeResult("n", "query")
    with pytest.raises(BusyError):
        runner.call(device, device.query, result)
    assert device.calls == 0 and result.attempts == 3
    assert slept == [2.0, 8.0]  # 0.5 * 4**n, not the 0.5, 1.0 of other transient errors
    assert client.hget(f"{prefix}:bmcfail", "bmc-held") is None  # busy never parks


# -- busy back-off ------------------------------------------------------------------------------
def test_busy_backoff_has_a_longer_ceiling() -> None:
    runner = make_runner(None, [], backoff_base=0.5, backoff_max=8.0, busy_backoff_max=30.0)
    assert [runner.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert [runner.backoff(n, busy=True) for n in range(1, 5)] == [2.0, 8.0, 30.0, 30.0]


def test_busy_replies_back_off_longer_than_unreachable() -> None:
    slept: list[float] = []
    runner = make_runner(None, slept, max_attempts=4, backoff_max=8.0, busy_backoff_max=20.0)
    device = Device()
    device.faults = [BusyError("no free session")] * 3
    assert runner.call(device, device.query, NodeResult("n", "query")) is PowerState.ON
    assert slept == [2.0, 8.0, 20.0]
    slept.clear()
    device.faults = [UnreachableError("x")] * 3
    runner.call(device, device.query, NodeResult("n", "query"))
    assert slept == [0.5, 1.0, 2.0]


# -- parking ------------------------------------------------------------------------------------
def test_parked_after_n_failures_then_released_after_the_cool_down(
    client: redis.Redis, prefix: str
) -> None:
    wall = Wall()
    guard = make_guard(client, prefix, wall, bmc_park_after=3, bmc_park_seconds=60)
    runner = make_runner(guard, [], max_attempts=2)
    device = Device("bmc-dead")

    def query() -> dict[str, Any]:
        result = runner.run("node-1", device, "query", {})
        return result.error or {}

    for _ in range(3):
        device.faults = [UnreachableError("no route")] * 2
        assert query()["code"] == "unreachable"
    assert device.calls == 6
    assert set(parked(client, prefix, wall.now)) == {"bmc-dead"}

    error = query()  # fails at once: the device is not called
    assert device.calls == 6
    assert error["code"] == "unreachable" and error["details"]["parked"] is True
    until = time.strftime("%H:%M:%S", time.localtime(wall.now + 60))
    assert re.search(rf"parked until {until} after 3 failures \(last: unreachable\)", error["message"])
    assert error["attempt"] == 1

    wall.now += 61  # cool-down over: the next call goes through...
    assert parked(client, prefix, wall.now) == {}
    device.faults = [CallTimeoutError("no answer")] * 2
    assert query()["code"] == "timeout"
    assert device.calls == 8
    info = parked(client, prefix, wall.now)["bmc-dead"]  # ...and failing, parks it again
    assert info["failures"] == 4 and info["code"] == "timeout" and info["node"] == "node-1"
    assert query()["code"] == "timeout"  # parked with the last code
    assert device.calls == 8

    wall.now += 61
    assert runner.run("node-1", device, "query", {}).outcome == "ok"  # a success clears it all
    assert client.hget(f"{prefix}:bmcfail", "bmc-dead") is None
    assert parked(client, prefix, wall.now) == {}


def test_success_resets_the_count_and_other_errors_do_not_count(
    client: redis.Redis, prefix: str
) -> None:
    guard = make_guard(client, prefix, bmc_park_after=2)
    runner = make_runner(guard, [])
    device = Device("bmc-flaky")
    for fault in (UnreachableError("x"), None, UnreachableError("x"), BusyError("full"),
                  AuthError("wrong"), None, UnreachableError("x")):
        device.faults = [fault] if fault else []
        runner.run("n", device, "query", {})
    assert client.hget(f"{prefix}:bmcfail", "bmc-flaky") == "1"
    assert parked(client, prefix) == {}


def parked_metric(client: redis.Redis, prefix: str) -> float:
    """``powerq_parked_bmcs`` as scheduler/metrics.py exposes it."""
    from types import SimpleNamespace

    from scheduler.metrics import RedisCollector

    inventory = SimpleNamespace(node_index=dict)
    collector = RedisCollector(SimpleNamespace(client=client, prefix=prefix), inventory, None)
    family = next(f for f in collector.collect() if f.name == "powerq_parked_bmcs")
    return float(family.samples[0].value)


def test_unpark_releases_early_and_metrics_count_only_current(
    client: redis.Redis, prefix: str
) -> None:
    wall = Wall()
    wall.now = time.time()
    guard = make_guard(client, prefix, wall, bmc_park_after=1, bmc_park_seconds=30)
    runner = make_runner(guard, [])
    for key in ("bmc-x", "bmc-y"):
        device = Device(key)
        device.faults = [UnreachableError("x")]
        runner.run("n", device, "query", {})
    assert set(parked(client, prefix)) == {"bmc-x", "bmc-y"}
    assert parked_metric(client, prefix) == 2
    client.zadd(f"{prefix}:parked", {"bmc-old": wall.now - 5})  # a cool-down that ended
    assert parked_metric(client, prefix) == 2
    assert unpark(client, prefix, ["bmc-x", "bmc-z"]) == ["bmc-x"]
    assert set(parked(client, prefix)) == {"bmc-y"}
    assert client.hget(f"{prefix}:bmcfail", "bmc-x") is None
    assert parked_metric(client, prefix) == 1
    device = Device("bmc-x")
    assert runner.run("n", device, "query", {}).outcome == "ok" and device.calls == 1


def test_guard_settings_come_from_config(client: redis.Redis) -> None:
    config = Config.from_env({}, bmc_lease="process", bmc_park_after=7, bmc_park_seconds=5.0)
    guard = BmcGuard.from_config(client, config)
    assert guard.settings == GuardSettings("process", 15.0, 10.0, 7, 5.0)
    assert PolicySettings.from_config(config).busy_backoff_max == 30.0
    from drivers.errors import SettingsError

    with pytest.raises(SettingsError):
        Config.from_env({"POWERQ_BMC_LEASE": "zookeeper"})


def test_parked_bmc_fails_at_once_even_behind_a_stuck_call(client: redis.Redis, prefix: str) -> None:
    """A call still stuck at a BMC (past the watchdog) holds the process lock; a call to
    that BMC once it is parked does not wait for it."""
    guard = make_guard(client, prefix, bmc_park_after=1)
    runner = make_runner(guard, [])
    device = Device("bmc-stuck")
    device.faults = [UnreachableError("x")]
    runner.run("n", device, "query", {})
    lock = runner.locks.get("bmc-stuck")
    with lock:  # as the watchdog leaves a stuck call holding it
        started = time.monotonic()
        result = runner.run("n", device, "query", {})
        assert time.monotonic() - started < 0.5
    assert result.error and result.error["details"]["parked"] is True


# -- batches: the IPMI fleet hot path (issue 4) ------------------------------------------------
def test_take_many_takes_free_leases_skips_held_and_parked(client: redis.Redis, prefix: str) -> None:
    guard = make_guard(client, prefix, bmc_park_after=1, bmc_park_seconds=60)
    other = make_guard(client, prefix)
    free, held, sick = f"{prefix}-m1", f"{prefix}-m2", f"{prefix}-m3"
    assert other.take_many([held], "other-token") == {held: 1}
    guard.failed(sick, UnreachableError("no answer"), "n3")  # parks it (park_after=1)
    statuses = guard.take_many([free, held, sick], "tok")
    assert statuses == {free: 1, held: 0, sick: -1}
    assert client.get(guard.lease_key(free)) == "tok"
    assert client.get(guard.lease_key(held)) == "other-token"  # untouched
    assert client.get(guard.lease_key(sick)) is None
    # The lease excludes the per-node path of another runner until released.
    assert other.take_many([free], "third") == {free: 0}
    guard.release_many([free], [], "tok")
    assert client.get(guard.lease_key(free)) is None
    # Releasing with a token that does not hold the lease leaves it alone.
    guard.release_many([], [held], "tok")
    assert client.get(guard.lease_key(held)) == "other-token"


def test_release_many_clears_failures_of_the_bmcs_that_answered(client: redis.Redis, prefix: str) -> None:
    guard = make_guard(client, prefix, bmc_park_after=3)
    ok, bad = f"{prefix}-r1", f"{prefix}-r2"
    for key in (ok, bad):
        guard.failed(key, UnreachableError("no answer"), "n")
    assert guard.take_many([ok, bad], "tok") == {ok: 1, bad: 1}
    guard.release_many([ok], [bad], "tok")
    assert client.hget(guard.fail_key, ok) is None
    assert client.hget(guard.fail_key, bad) == "1"
    assert client.get(guard.lease_key(ok)) is None and client.get(guard.lease_key(bad)) is None


def test_a_batch_keeps_its_leases_past_their_ttl_until_it_lets_go(client: redis.Redis, prefix: str) -> None:
    """A batch of power actions outlives the lease TTL: its leases are renewed together
    (one pipelined round trip) while held, and expire once it stops holding them."""
    guard = make_guard(client, prefix, bmc_lease_ttl=0.3)
    keys = [f"{prefix}-b{i}" for i in range(50)]
    try:
        assert set(guard.take_many(keys, "batch").values()) == {1}
        guard.hold_many(keys, "batch")
        time.sleep(0.8)  # well past the TTL
        assert all(client.get(guard.lease_key(k)) == "batch" for k in keys)
        guard.unhold_many(keys[:25])
        time.sleep(0.6)
        assert all(client.get(guard.lease_key(k)) is None for k in keys[:25])  # expired
        assert all(client.get(guard.lease_key(k)) == "batch" for k in keys[25:])
    finally:
        guard.unhold_many(keys)
        guard.stop()
