"""Fleet polling through Celery beat: every node queried once per interval, spread over it.

The poll plan (which rack chunk, at which offset inside the interval) comes from
:func:`scheduler.poll.poll_plan`; this module turns it into beat entries with a schedule
that fires at ``offset`` past every multiple of the interval on the wall clock, so
chunks stay spread whatever the beat process' start time. The entries are rebuilt when
the inventory is reloaded.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from celery import Celery
from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import schedstate, schedule

from scheduler.config import Config
from scheduler.poll import poll_plan
from workers.app import TASK_RUN_CHUNK, make_app, rack_queue

log = logging.getLogger("powerq.beat")


class offset_schedule(schedule):  # noqa: N801 - celery's naming
    """Due at ``offset`` seconds past every multiple of ``every`` (epoch-aligned)."""

    def __init__(self, every: float, offset: float, clock: Any = time.time, **kwargs: Any) -> None:
        super().__init__(run_every=every, **kwargs)
        self.every = float(every)
        self.offset = float(offset) % self.every
        self.clock = clock

    def slot_start(self, now: float) -> float:
        """The latest firing time at or before ``now``."""
        return ((now - self.offset) // self.every) * self.every + self.offset

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = self.clock()
        slot = self.slot_start(now)
        last = last_run_at.timestamp() if last_run_at else 0.0
        next_in = slot + self.every - now
        if last < slot:
            return schedstate(True, next_in)
        return schedstate(False, next_in)

    def __reduce__(self) -> Any:
        return (self.__class__, (self.every, self.offset))


class PollScheduler(Scheduler):
    """A beat scheduler whose entries are the fleet's poll chunks."""

    def __init__(self, *args: Any, powerq_every: float = 60.0, **kwargs: Any) -> None:
        self.powerq_every = powerq_every
        self._inventory_stamp: str | None = None
        self._inventory_store: Any = None
        super().__init__(*args, **kwargs)

    def _config(self) -> Config:
        cfg = self.app.conf.get("powerq_config")
        return cfg if isinstance(cfg, Config) else Config.from_env()

    def _inventory(self) -> Any:
        """The inventory store, built once per beat process (one Redis pool)."""
        if self._inventory_store is None:
            from scheduler.inventory import InventoryStore
            from scheduler.secrets import SecretBox
            from scheduler.store import Store

            config = self._config()
            store = Store.from_config(config)
            self._inventory_store = InventoryStore(
                store.client, config.key_prefix, SecretBox.from_config(config)
            )
        return self._inventory_store

    def setup_schedule(self) -> None:
        self.data: dict[str, ScheduleEntry] = {}
        self._rebuild()

    def _rebuild(self) -> None:
        config = self._config()
        inventory = self._inventory()
        index = inventory.node_index()
        self._inventory_stamp = inventory.stamp()
        entries: dict[str, ScheduleEntry] = {}
        now = datetime.now(timezone.utc)  # noqa: UP017
        for item in poll_plan(index, self.powerq_every, config.poll_chunk_size):
            name = f"poll:{item.rack}:{item.index}"
            entries[name] = ScheduleEntry(
                name=name,
                task=TASK_RUN_CHUNK,
                schedule=offset_schedule(self.powerq_every, item.offset),
                args=(None, "query", item.nodes, {}),
                options={"queue": rack_queue(item.rack)},
                last_run_at=now,
                app=self.app,
            )
        self.data = entries
        log.info("poll schedule: %d chunks every %g s", len(entries), self.powerq_every)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            if self._inventory().stamp() != self._inventory_stamp:
                self._rebuild()
        except Exception:  # a Redis hiccup must not stop polling
            log.warning("could not check the inventory for changes", exc_info=True)
        return float(min(super().tick(*args, **kwargs), 1.0))

    @property
    def schedule(self) -> dict[str, ScheduleEntry]:
        return self.data


def run_beat(config: Config, every: float, loglevel: str = "INFO") -> None:
    """Run beat in this process until stopped."""
    app: Celery = make_app(config)

    class _Bound(PollScheduler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, powerq_every=every, **kw)

    # With JSON logs the banner would be the one non-JSON line: leave it out.
    beat = app.Beat(scheduler=_Bound, loglevel=loglevel, max_interval=1.0,
                    quiet=getattr(config, "log_format", "text") == "json")
    beat.run()


__all__ = ["PollScheduler", "offset_schedule", "run_beat"]
