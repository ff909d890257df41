"""Chaos tests (issue 5): worker kills, a Redis restart, a degraded fleet.

Every chaos test builds a stack of its own (:class:`ChaosStack`: a Redis, several real
``powerq worker`` processes per rack, the CLI) against simulated IPMI BMCs on
``127.41.x.y``. Sizes come from ``POWERQ_CHAOS_SCALE``: ``small`` (the default, part of
``make test``) or ``large`` (``make chaos``: >= 1,000 node cycles under worker kills).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.conftest import ROOT
from tests.fullpath import FullPath

SCALE = os.environ.get("POWERQ_CHAOS_SCALE", "small")
if SCALE not in ("small", "large"):
    raise RuntimeError(f"POWERQ_CHAOS_SCALE must be small or large, not {SCALE!r}")
LARGE = SCALE == "large"


@dataclass
class Worker:
    """One ``powerq worker`` process of a :class:`ChaosStack`."""

    rack: str
    hostname: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class ChaosStack(FullPath):
    """A :class:`tests.fullpath.FullPath` with ``per_rack`` workers per rack that can be
    killed (SIGKILL) and started again, and a Redis (append-only when ``appendonly``)
    that can be restarted on the same port."""

    def __init__(self, workdir: Path, racks: Iterable[str], *, per_rack: int = 2,
                 concurrency: int = 2, appendonly: bool = False, **env: str) -> None:
        super().__init__(workdir, racks, **env)
        self.redis.appendonly = appendonly
        self.per_rack = per_rack
        self.concurrency = concurrency
        self.workers: list[Worker] = []
        self._serial = 0
        self._lock = threading.Lock()

    # -- workers ---------------------------------------------------------------------
    def start(self) -> None:
        from tests.conftest import powerq_env

        self.redis.start()
        self.env = powerq_env(self.redis.url, self.prefix, self.secret_key, **self.extra_env)
        for rack in self.racks:
            for _ in range(self.per_rack):
                self.start_worker(rack)
        self.wait_workers()

    def start_worker(self, rack: str) -> Worker:
        with self._lock:
            self._serial += 1
            hostname = f"{rack}-w{self._serial}@chaos"
            log_path = self.workdir / f"worker-{rack}-w{self._serial}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "scheduler.cli", "worker", "--rack", rack,
                     "--concurrency", str(self.concurrency), "--hostname", hostname,
                     "--loglevel", "INFO"],
                    env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                )
            worker = Worker(rack, hostname, proc, log_path)
            self.workers.append(worker)
            self.procs.append(proc)
            return worker

    def wait_workers(self, timeout: float = 90) -> None:
        """Until every live worker answers ``powerq workers``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wanted = {w.hostname for w in self.workers if w.alive}
            out = self.pq("workers", "--json")
            if out.returncode == 0:
                seen = {h for hosts in json.loads(out.stdout or "{}").values() for h in hosts}
                if wanted <= seen:
                    return
            dead = [w for w in self.workers if not w.alive and w.proc.returncode != -signal.SIGKILL]
            if dead:
                raise RuntimeError("chaos worker(s) exited by themselves: " + "\n".join(
                    f"{w.hostname} (exit {w.proc.returncode}):\n"
                    + w.log.read_text(errors="replace")[-3000:] for w in dead))
            time.sleep(0.5)
        raise RuntimeError("chaos workers did not come up:\n" + self.worker_log()[-4000:])

    def alive(self, rack: str | None = None) -> list[Worker]:
        return [w for w in self.workers if w.alive and (rack is None or w.rack == rack)]

    def kill(self, worker: Worker) -> None:
        """SIGKILL: no warm shutdown, no message handed back, no session logged out."""
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)

    def worker_log(self) -> str:
        return "".join(w.log.read_text(errors="replace") for w in self.workers if w.log.exists())

    # -- Redis -----------------------------------------------------------------------
    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, decode_responses=True)

    def restart_redis(self, down_for: float = 0.0) -> None:
        """SIGTERM the server (it writes its append-only file and exits), keep it down for
        ``down_for`` seconds, start it again on the same port and directory."""
        self.redis.stop()
        time.sleep(down_for)
        self.redis.start()

    # -- jobs ------------------------------------------------------------------------
    def job_records(self) -> dict[str, dict[str, Any]]:
        """Every job in the store with its results, by job id."""
        from scheduler.store import Store

        store = Store(self.client(), self.prefix)
        out = {}
        for job_id in store.recent_jobs(10_000):
            job = store.job(job_id) or {}
            job["results"] = store.results(job_id)
            out[job_id] = job
        return out

    def journal(self, job_id: str) -> dict[str, dict[str, Any]]:
        raw = self.client().hgetall(f"{self.prefix}:job:{job_id}:journal")
        return {node: json.loads(v) for node, v in raw.items()}
