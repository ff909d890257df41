"""Shared fixtures: a Redis server of the test session's own, and its config."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.peers.common import free_port

ROOT = Path(__file__).resolve().parent.parent


class RedisServer:
    """A redis-server on a free loopback port, in a temporary directory."""

    def __init__(self, workdir: Path, appendonly: bool = False,
                 redis_args: list[str] | None = None) -> None:
        """``redis_args`` are added to the command line, ``{port}`` replaced by the port
        (e.g. ``["--requirepass", "pw"]``, or TLS: ``["--port", "0", "--tls-port", "{port}",
        ...]``); with them, the server is ready when its port accepts a connection."""
        self.workdir = workdir
        self.port = free_port()
        self.appendonly = appendonly
        self.redis_args = list(redis_args or [])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.workdir),
             *(a.replace("{port}", str(self.port)) for a in self.redis_args)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if self.redis_args:  # a password or TLS: a plain PING cannot tell it is up
            self._wait_for_port()
            return
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def _wait_for_port(self) -> None:
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                    raise RuntimeError(f"redis-server {self.redis_args} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture()
def prefix() -> str:
    return f"pqt-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def secret_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def powerq_env(redis_url: str, prefix: str, secret_key: str, **extra: str) -> dict[str, str]:
    """The environment a powerq process (CLI, worker) runs with in tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POWERQ_")}
    env.update(
        POWERQ_REDIS_URL=redis_url,
        POWERQ_KEY_PREFIX=prefix,
        POWERQ_SECRET_KEY=secret_key,
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def fullpath(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Redis and one real rack worker for the session: see :mod:`tests.fullpath`."""
    from tests.fullpath import FullPath

    fp = FullPath(tmp_path_factory.mktemp("fullpath"))
    try:
        fp.start()
        yield fp
    finally:
        fp.stop()
