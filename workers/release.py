"""Releasing nodes on a power-on timeline, within the power budgets, and stopping on cancel.

The planner (``scheduler/budget.py``) gives every node of an ``on`` / ``cycle`` job a start
offset; the chunk message carries the job's origin and its nodes' offsets. In the worker,
each node then goes through a :class:`Release`:

- :meth:`Release.wait_turn` holds the node until its planned time (or the job is
  cancelled: :class:`Cancelled`);
- :meth:`Release.admit`, called right before the power-on is sent, asks Redis for a start
  slot in every budget the node draws from (its PDU, its rack, the global cap). One Lua
  script checks every budget's sliding window and records the start in all of them at
  once, with Redis's own clock, so workers on different hosts share one clock and one
  count, and two jobs on the same PDU never add up to more than its budget. When a budget
  is full the script says how long until its oldest start leaves the window; the node
  waits that long and asks again. The admitted time is the node's recorded start time.
- :meth:`Release.sent`, called when the power-on call returns (answered or failed),
  moves the node's start in every budget to that instant. The BMC executed the power-on
  somewhere between the slot and the return; counting it at the return keeps it in the
  window as long as it may matter, so the budgets hold for the starts *at the BMCs*, not
  only for the slots (a slot-to-BMC delay that varies by a few tens of milliseconds
  would otherwise let starts planned one window apart land less than a window apart).
  The price is each start's call time, added once per window along a chain of starts.
  A call that takes longer than a window before it returns is the one gap: its slot
  may leave the window before the call ends.
- :meth:`Release.readmit`, called before each retry of a power-on, takes a further slot
  (member ``<node>#<attempt>``), keeping the earlier one: a retry is sent later than its
  first slot, and the failed attempt may have started the node anyway.

The plan spreads the work; admission makes the budgets hold whatever happens (a slow
query, a retry, another job on the same PDU).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from scheduler.budget import Budgets
from workers.policy import Cancelled

# KEYS: one sorted set per budget (member -> start time). ARGV: not_before, member, then
# max_starts and window for each key. Returns {0, now} when admitted, {1, wait} otherwise.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local not_before = tonumber(ARGV[1])
if now < not_before then
  return {1, tostring(not_before - now)}
end
local wait = 0
for i, key in ipairs(KEYS) do
  local max = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= max then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local w = tonumber(oldest[2]) + window - now
    if w > wait then wait = w end
  end
end
if wait > 0 then
  return {1, tostring(wait)}
end
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, math.ceil(window * 2000) + 1000)
end
return {0, tostring(now)}
"""

# KEYS: the node's budget keys. ARGV: member, then the window of each key. Moves the
# member's start to Redis's now (never earlier; re-added if it already left the window).
_SENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i, key in ipairs(KEYS) do
  local score = redis.call('ZSCORE', key, ARGV[1])
  if not score or tonumber(score) < now then
    redis.call('ZADD', key, now, ARGV[1])
    redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[1 + i]) * 2000) + 1000)
  end
end
return tostring(now)
"""

POLL = 0.25
"""Seconds between checks of the job's cancel flag while a node waits."""


@dataclass(frozen=True)
class BudgetSlot:
    key: str
    max_starts: int
    window: float


class CancelWatch:
    """Watches one job's cancel flag from a background thread; :attr:`event` is set
    once the job is cancelled. One per chunk."""

    def __init__(self, client: redis.Redis, job_key: str | None, interval: float = POLL) -> None:
        self.event = threading.Event()
        self._stop = threading.Event()
        self._client = client
        self._key = job_key
        self._interval = interval
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Read the flag now. True (and :attr:`event` set) when the job is cancelled."""
        if self._key is None or self.event.is_set():
            return self.event.is_set()
        try:
            if self._client.hget(self._key, "cancel"):
                self.event.set()
        except redis.RedisError:
            pass  # a Redis blip must not cancel or kill anything; the next check decides
        return self.event.is_set()

    def start(self) -> CancelWatch:
        if self._key is not None:
            self._thread = threading.Thread(target=self._run, name="powerq-cancel", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self.check():
                return

    def stop(self) -> None:
        self._stop.set()


class Admission:
    """The budget admission script, bound to one Redis and key prefix."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._script = client.register_script(_ADMIT)
        self._sent = client.register_script(_SENT)

    def now(self) -> float:
        """Redis's clock, in seconds since the epoch."""
        sec, usec = self.client.time()
        return float(sec) + float(usec) / 1e6

    def slots(self, budgets: Budgets, rack: str, pdu: str | None) -> list[BudgetSlot]:
        """The budget keys a node of ``rack`` drawing from ``pdu`` must fit in."""
        return [
            BudgetSlot(f"{self.prefix}:budget:{resource.kind}:{resource.name}", b.max_starts, b.window)
            for resource, b in budgets.constraints(rack, pdu)
        ]

    def try_admit(self, slots: Sequence[BudgetSlot], member: str, not_before: float) -> tuple[bool, float]:
        """One attempt: ``(True, start_time)`` or ``(False, seconds_to_wait)``."""
        args: list[str | float | int] = [repr(not_before), member]
        for slot in slots:
            args += [slot.max_starts, repr(slot.window)]
        denied, value = self._script(keys=[s.key for s in slots], args=args)
        return (not int(denied)), float(value)

    def mark_sent(self, slots: Sequence[BudgetSlot], member: str) -> float:
        """Move ``member``'s start in every slot to now (Redis clock); returns now."""
        return float(self._sent(keys=[s.key for s in slots],
                                args=[member, *(repr(s.window) for s in slots)]))


class Release:
    """One node's release: its planned time and its budgets. Built per node by the chunk."""

    def __init__(
        self,
        admission: Admission,
        slots: Sequence[BudgetSlot],
        member: str,
        not_before: float,
        cancel: CancelWatch,
        *,
        clock_offset: float = 0.0,
    ) -> None:
        self.admission = admission
        self.slots = list(slots)
        self.member = member
        self.not_before = not_before
        self.cancel = cancel
        self.clock_offset = clock_offset  # Redis clock minus this host's clock
        self.admitted_at: float | None = None

    def _sleep(self, seconds: float, cancellable: bool) -> None:
        if cancellable:
            if self.cancel.event.wait(max(0.0, seconds)):
                raise Cancelled()
        else:
            time.sleep(max(0.0, seconds))

    def wait_turn(self) -> None:
        """Hold until the planned time. Raises :class:`Cancelled` if the job is cancelled
        first (or already was)."""
        if self.cancel.check():
            raise Cancelled()
        while True:
            left = self.not_before - (time.time() + self.clock_offset)
            if left <= 0:
                return
            self._sleep(min(left, POLL), cancellable=True)

    def admit(self, *, cancellable: bool = True) -> float:
        """Wait for a start slot in every budget and take it. Returns the start time
        (Redis clock). With ``cancellable`` a cancel while waiting raises
        :class:`Cancelled`; a cycle's power-on after its power-off is never cancelled."""
        return self._take(self.member, cancellable)

    def readmit(self, attempt: int) -> float:
        """Wait for and take another slot, for retry ``attempt`` of the power-on; the
        slots taken before stay counted in their windows. Never cancelled. Returns the
        start time (Redis clock)."""
        return self._take(self._member(attempt), cancellable=False)

    def sent(self, attempt: int = 1) -> None:
        """The power-on call of ``attempt`` returned (answered or not): count its start at
        this instant in every budget (see the module docstring). Never raises: when Redis
        cannot be reached the start stays counted at its slot, and the power-on, which
        did go out, is not reported as failed."""
        try:
            self.admission.mark_sent(self.slots, self._member(attempt))
        except redis.RedisError:
            pass

    def _member(self, attempt: int) -> str:
        return self.member if attempt <= 1 else f"{self.member}#{attempt}"

    def _take(self, member: str, cancellable: bool) -> float:
        while True:
            if cancellable and self.cancel.check():
                raise Cancelled()
            ok, value = self.admission.try_admit(self.slots, member, self.not_before)
            if ok:
                self.admitted_at = value
                return value
            self._sleep(value, cancellable)
