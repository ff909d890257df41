"""Per-BMC protection across worker processes (issue 5): a lease per BMC, and parking.

The policy (:class:`workers.policy.NodeRunner`) already keeps one call in flight per BMC
inside one worker process (``BmcLocks``). Two workers consuming one rack queue do not
share those locks, so :class:`BmcGuard` adds, inside the process lock:

- **a lease in Redis** per ``bmc_key`` (``SET P:bmclease:<key> <token> NX PX <ttl>``),
  renewed by a background thread while a long call runs and released with a
  compare-and-delete script, so a worker that dies leaves it for ``ttl`` at most. A lease
  not had within ``lease_wait`` seconds is a :class:`BusyError`, retried like any busy.
- **parking**: ``park_after`` consecutive failed calls (``unreachable`` or ``timeout``,
  after the policy's retries; across jobs and workers) park the BMC for
  ``park_seconds``: every call to it then fails at once with the last failure's code, a
  message "parked until HH:MM:SS after N failures (last: CODE)" and ``parked: true`` in
  the error's details. A success clears the count (and any parking). When the cool-down
  ends the next call goes through; if it fails too, the BMC is parked again at once.

Keys (``P`` is the configured prefix):

- ``P:bmclease:<bmc_key>``  string: the holder's token, with a TTL
- ``P:bmcfail``             hash: bmc_key -> consecutive failed calls
- ``P:parked``              sorted set: bmc_key scored by the epoch second parking ends
- ``P:parked:info``         hash: bmc_key -> JSON {until, since, failures, code, node}

No Celery here. Clocks and sleeps are injectable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from drivers.errors import BusyError, CallTimeoutError, PowerError, TransientError, UnreachableError

T = TypeVar("T")
log = logging.getLogger("powerq.bmcguard")

LEASE_MODES = ("redis", "process")
COUNTED = ("unreachable", "timeout")
"""Codes that count towards parking. ``busy`` does not: a BMC with no free session is
alive, and has its own longer back-off in the policy."""

# KEYS: lease, parked zset, fail hash. ARGV: bmc_key, token, ttl ms, now, take lease (0/1).
# Returns {status, failures, until}: status 1 = lease taken (or not asked for), 0 = held
# by another, -1 = parked until `until` (no lease taken).
_ACQUIRE = """
local till = redis.call('ZSCORE', KEYS[2], ARGV[1])
local failures = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if till and tonumber(till) > tonumber(ARGV[4]) then
  return {-1, failures, till}
end
if ARGV[5] == '1' then
  if not redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then
    return {0, failures, ''}
  end
end
return {1, failures, ''}
"""

# KEYS: lease, fail hash, parked zset, parked info. ARGV: token, bmc_key, clear (0/1).
_RELEASE = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
if ARGV[3] == '1' then
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('HDEL', KEYS[4], ARGV[2])
end
return 1
"""

# KEYS: lease. ARGV: token, ttl ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: fail hash, parked zset, parked info. ARGV: bmc_key, code, now, until, park_after, node.
# Returns {failures, parked (0/1), until}.
_FAILED = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local after = tonumber(ARGV[5])
if after > 0 and n >= after then
  local cur = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if cur and tonumber(cur) > tonumber(ARGV[3]) then
    return {n, 0, cur}
  end
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], cjson.encode({['until'] = tonumber(ARGV[4]),
    since = tonumber(ARGV[3]), failures = n, code = ARGV[2], node = ARGV[6]}))
  return {n, 1, ARGV[4]}
end
return {n, 0, ''}
"""


# Batches (the fleet hot path, issue 4): one script for a whole rack chunk.
# KEYS: parked zset, fail hash. ARGV: prefix, token, ttl ms, now, take (0/1), bmc_key...
# Returns one status per key: 1 taken (or not asked for), 0 held by another, -1 parked.
_ACQUIRE_MANY = """
local out = {}
local now = tonumber(ARGV[4])
for i = 6, #ARGV do
  local bmc = ARGV[i]
  local till = redis.call('ZSCORE', KEYS[1], bmc)
  if till and tonumber(till) > now then
    out[#out + 1] = -1
  elseif ARGV[5] == '1' and not redis.call('SET', ARGV[1] .. ':bmclease:' .. bmc, ARGV[2], 'NX', 'PX', ARGV[3]) then
    out[#out + 1] = 0
  else
    out[#out + 1] = 1
  end
end
return out
"""

# KEYS: fail hash, parked zset, parked info. ARGV: prefix, token, n_ok, ok bmc_key..., then
# released bmc_key... Leases held with ``token`` are released; the ok ones forget failures.
_RELEASE_MANY = """
local n_ok = tonumber(ARGV[3])
for i = 4, #ARGV do
  local bmc = ARGV[i]
  local lease = ARGV[1] .. ':bmclease:' .. bmc
  if ARGV[2] ~= '' and redis.call('GET', lease) == ARGV[2] then
    redis.call('DEL', lease)
  end
  if i < 4 + n_ok then
    redis.call('HDEL', KEYS[1], bmc)
    redis.call('ZREM', KEYS[2], bmc)
    redis.call('HDEL', KEYS[3], bmc)
  end
end
return 1
"""


@dataclass(frozen=True)
class GuardSettings:
    """The knobs of :class:`BmcGuard`; built from :class:`scheduler.config.Config`."""

    bmc_lease: str = "redis"
    bmc_lease_ttl: float = 15.0
    bmc_lease_wait: float = 10.0
    bmc_park_after: int = 5
    bmc_park_seconds: float = 60.0

    @classmethod
    def from_config(cls, config: Any) -> GuardSettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__
                      if hasattr(config, name)})


def parked_error(bmc_key: str, info: dict[str, Any]) -> TransientError:
    """The error a call to a parked BMC fails with: the last failure's code (``timeout``
    or ``unreachable``), ``parked: true`` in its details."""
    until = float(info.get("until") or 0)
    failures = int(info.get("failures") or 0)
    code = str(info.get("code") or "unreachable")
    cls = CallTimeoutError if code == "timeout" else UnreachableError
    at = time.strftime("%H:%M:%S", time.localtime(until))
    return cls(f"{bmc_key}: parked until {at} after {failures} failures (last: {code})",
               parked=True, bmc=bmc_key, until=until, failures=failures, last=code)


@dataclass
class BmcGuard:
    """Lease and parking for the driver calls of one worker process (thread-safe)."""

    client: Any
    prefix: str = "powerq"
    settings: GuardSettings = field(default_factory=GuardSettings)
    wall: Callable[[], float] = time.time
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    rng: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        self._acquire = self.client.register_script(_ACQUIRE)
        self._release = self.client.register_script(_RELEASE)
        self._renew = self.client.register_script(_RENEW)
        self._failed = self.client.register_script(_FAILED)
        self._acquire_many = self.client.register_script(_ACQUIRE_MANY)
        self._release_many = self.client.register_script(_RELEASE_MANY)
        self._held: dict[str, str] = {}  # lease key -> token, renewed by the renewer thread
        self._held_guard = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_config(cls, client: Any, config: Any) -> BmcGuard:
        return cls(client, str(config.key_prefix), GuardSettings.from_config(config))

    # -- keys ------------------------------------------------------------------------------
    def lease_key(self, bmc_key: str) -> str:
        return f"{self.prefix}:bmclease:{bmc_key}"

    @property
    def fail_key(self) -> str:
        return f"{self.prefix}:bmcfail"

    @property
    def parked_key(self) -> str:
        return f"{self.prefix}:parked"

    @property
    def info_key(self) -> str:
        return f"{self.prefix}:parked:info"

    @property
    def leasing(self) -> bool:
        return self.settings.bmc_lease == "redis"

    # -- the call ----------------------------------------------------------------------------
    def run(self, bmc_key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (one driver call) holding the BMC's lease, unless the BMC is parked.

        Raises the parked error (see :func:`parked_error`), :class:`BusyError` when the
        lease is not had within ``lease_wait`` or Redis cannot be reached, or whatever
        ``fn`` raises. A success clears the BMC's count of failures."""
        with self.holding(bmc_key):
            return fn()

    @contextlib.contextmanager
    def holding(self, bmc_key: str) -> Iterator[None]:
        """Hold the BMC's lease for the block (renewed while it runs), unless the BMC is
        parked: raises as :meth:`run`. A block that ends without an exception clears the
        BMC's count of failures."""
        token = uuid.uuid4().hex if self.leasing else ""
        failures = self._take(bmc_key, token)
        if token:
            self._hold(bmc_key, token)
        ok = False
        try:
            yield
            ok = True
        finally:
            if token:
                self._unhold(bmc_key)
            if token or (ok and failures):
                try:
                    self._release(keys=[self.lease_key(bmc_key), self.fail_key, self.parked_key,
                                        self.info_key],
                                  args=[token, bmc_key, "1" if ok and failures else "0"])
                except redis.RedisError as exc:  # the lease expires by itself
                    log.warning("BMC lease release failed for %s: %s", bmc_key, type(exc).__name__)

    def _take(self, bmc_key: str, token: str) -> int:
        """Wait for the lease (when leasing); return the BMC's count of failures."""
        deadline = self.clock() + self.settings.bmc_lease_wait
        ttl_ms = max(1, int(self.settings.bmc_lease_ttl * 1000))
        pause = 0.01
        while True:
            try:
                status, failures, until = self._acquire(
                    keys=[self.lease_key(bmc_key), self.parked_key, self.fail_key],
                    args=[bmc_key, token, ttl_ms, repr(self.wall()), "1" if token else "0"])
            except redis.RedisError as exc:
                if not isinstance(exc, redis.ConnectionError | redis.TimeoutError):
                    log.error("BMC lease script failed for %s: %s", bmc_key, exc)
                raise BusyError(f"{bmc_key}: the BMC lease store (Redis) cannot be reached "
                                f"({type(exc).__name__})") from None
            status = int(status)
            if status == 1:
                return int(failures)
            if status == -1:
                raise parked_error(bmc_key, self.info(bmc_key) or {
                    "until": float(until), "failures": int(failures), "code": "unreachable"})
            if self.clock() >= deadline:
                raise BusyError(f"{bmc_key}: another worker's call to this BMC did not end "
                                f"within {self.settings.bmc_lease_wait:g} s", lease=True)
            self.sleep(pause * (0.5 + self.rng() / 2))
            pause = min(pause * 1.5, 0.2)

    # -- batches (the fleet hot path, issue 4) ---------------------------------------------
    def take_many(self, bmc_keys: list[str], token: str) -> dict[str, int]:
        """Try, once and without waiting, to take the lease of every BMC in ``bmc_keys``
        (one script for all). bmc_key -> 1 taken (with ``token``; or not leasing), 0 held
        by another call, -1 parked. The caller releases with :meth:`release_many`. Redis
        errors propagate (the caller falls back to the per-node path)."""
        if not bmc_keys:
            return {}
        ttl_ms = max(1, int(self.settings.bmc_lease_ttl * 1000))
        statuses = self._acquire_many(
            keys=[self.parked_key, self.fail_key],
            args=[self.prefix, token, ttl_ms, repr(self.wall()), "1" if self.leasing else "0",
                  *bmc_keys])
        return {key: int(st) for key, st in zip(bmc_keys, statuses, strict=True)}

    def release_many(self, ok: list[str], other: list[str], token: str) -> None:
        """Release the leases taken by :meth:`take_many`; the BMCs in ``ok`` answered, so
        their count of failures (and any parking) is cleared. Never raises: an unreleased
        lease expires by itself."""
        if not ok and not other:
            return
        try:
            self._release_many(keys=[self.fail_key, self.parked_key, self.info_key],
                               args=[self.prefix, token if self.leasing else "", len(ok), *ok, *other])
        except redis.RedisError as exc:
            log.warning("BMC lease release failed for %d BMC(s): %s", len(ok) + len(other),
                        type(exc).__name__)

    def check(self, bmc_key: str) -> None:
        """Raise the parked error if ``bmc_key`` is parked now (one Redis read; used before
        waiting on the process lock). A Redis error is ignored here: the lease checks again."""
        try:
            until = self.client.zscore(self.parked_key, bmc_key)
        except redis.RedisError:
            return
        if until is not None and float(until) > self.wall():
            raise parked_error(bmc_key, self.info(bmc_key) or {"until": float(until)})

    def failed(self, bmc_key: str, exc: PowerError, node: str = "") -> bool:
        """Count one failed call (after the policy's retries); park the BMC when the count
        reaches ``park_after``. Only ``unreachable`` / ``timeout`` count. Returns whether
        this call parked it. Never raises."""
        if exc.code not in COUNTED or exc.details.get("parked"):
            return False
        now = self.wall()
        until = now + self.settings.bmc_park_seconds
        try:
            failures, parked, _ = self._failed(
                keys=[self.fail_key, self.parked_key, self.info_key],
                args=[bmc_key, exc.code, repr(now), repr(until), self.settings.bmc_park_after,
                      node])
        except redis.RedisError as exc2:
            log.warning("could not count a failure of %s: %s", bmc_key, type(exc2).__name__)
            return False
        if int(parked):
            log.warning("BMC %s parked for %g s after %d failed calls (last: %s)", bmc_key,
                        self.settings.bmc_park_seconds, int(failures), exc.code)
        return bool(int(parked))

    # -- lease renewal ---------------------------------------------------------------------------
    def _hold(self, bmc_key: str, token: str) -> None:
        with self._held_guard:
            self._held[self.lease_key(bmc_key)] = token
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_loop, name="powerq-lease",
                                                 daemon=True)
                self._renewer.start()

    def _unhold(self, bmc_key: str) -> None:
        with self._held_guard:
            self._held.pop(self.lease_key(bmc_key), None)

    def hold_many(self, bmc_keys: Iterable[str], token: str) -> None:
        """Keep renewing the leases :meth:`take_many` took, until :meth:`unhold_many`
        (a batch of power actions outlives the lease's TTL)."""
        if not self.leasing:
            return
        for key in bmc_keys:
            self._hold(key, token)

    def unhold_many(self, bmc_keys: Iterable[str]) -> None:
        with self._held_guard:
            for key in bmc_keys:
                self._held.pop(self.lease_key(key), None)

    def _renew_loop(self) -> None:
        every = max(0.01, self.settings.bmc_lease_ttl / 3)
        ttl_ms = max(1, int(self.settings.bmc_lease_ttl * 1000))
        while not self._stop.wait(every):
            with self._held_guard:
                held = list(self._held.items())
            if not held:
                continue
            try:  # every held lease in one round trip (a batch holds thousands)
                pipe = self.client.pipeline(transaction=False)
                for key, token in held:
                    self._renew(keys=[key], args=[token, ttl_ms], client=pipe)
                kept = pipe.execute()
            except redis.RedisError as exc:
                log.warning("BMC lease renewal failed for %d lease(s): %s", len(held),
                            type(exc).__name__)
                continue
            for (key, token), still in zip(held, kept, strict=True):
                if not int(still) and self._held.get(key) == token:  # not just released
                    log.warning("BMC lease %s was lost while its call ran", key)

    def stop(self) -> None:
        """Stop renewing (tests; a worker just exits)."""
        self._stop.set()

    # -- reading and releasing (status, unpark) ------------------------------------------------
    def info(self, bmc_key: str) -> dict[str, Any] | None:
        raw = self.client.hget(self.info_key, bmc_key)
        try:
            return dict(json.loads(raw)) if raw else None
        except (ValueError, TypeError):
            return None

    def unpark(self, bmc_keys: Iterable[str]) -> list[str]:
        """Release BMCs early (and forget their failures). Returns the ones that were parked."""
        return unpark(self.client, self.prefix, bmc_keys, self.wall())


def parked(client: Any, prefix: str, now: float | None = None) -> dict[str, dict[str, Any]]:
    """The BMCs parked now: bmc_key -> {until, since, failures, code, node}. Entries whose
    cool-down has ended are dropped from the set (their count of failures stays, so one
    more failure parks them again)."""
    now = time.time() if now is None else now
    key, info_key = f"{prefix}:parked", f"{prefix}:parked:info"
    ended = client.zrangebyscore(key, "-inf", now)
    if ended:
        pipe = client.pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.hdel(info_key, *ended)
        pipe.execute()
    out: dict[str, dict[str, Any]] = {}
    for member, until in client.zrangebyscore(key, f"({now}", "+inf", withscores=True):
        bmc = member.decode() if isinstance(member, bytes) else str(member)
        raw = client.hget(info_key, bmc)
        try:
            data = dict(json.loads(raw)) if raw else {}
        except (ValueError, TypeError):
            data = {}
        data["until"] = float(until)
        out[bmc] = data
    return out


def unpark(client: Any, prefix: str, bmc_keys: Iterable[str], now: float | None = None) -> list[str]:
    """Release ``bmc_keys`` early and forget their failures; the ones parked are returned."""
    now = time.time() if now is None else now
    current = parked(client, prefix, now)
    keys = list(dict.fromkeys(bmc_keys))
    if not keys:
        return []
    pipe = client.pipeline(transaction=True)
    pipe.zrem(f"{prefix}:parked", *keys)
    pipe.hdel(f"{prefix}:parked:info", *keys)
    pipe.hdel(f"{prefix}:bmcfail", *keys)
    pipe.execute()
    return [k for k in keys if k in current]


def bmc_keys_of(records: dict[str, Any], timeout: float = 10.0) -> dict[str, str]:
    """node -> bmc_key for inventory records (:class:`scheduler.inventory.InventoryNode`),
    building each node's driver without touching the device. Nodes whose settings do
    not validate are left out."""
    from drivers import registry

    out: dict[str, str] = {}
    for name, record in records.items():
        try:
            cls = registry.get(record.power_type)
            driver = cls(cls.validate(record.params), timeout=timeout)
        except PowerError:
            continue
        try:
            out[name] = driver.bmc_key()
        finally:
            try:
                driver.close()
            except Exception:  # close() never raises; a driver bug must not stop status
                pass
    return out


__all__ = ["BmcGuard", "GuardSettings", "LEASE_MODES", "bmc_keys_of", "parked", "parked_error",
           "unpark"]
