"""Every powerq option, declared once with its type, default and help.

Options are read from the environment as ``POWERQ_<NAME>`` (upper case). ``powerq config``
prints them all with their current values (secrets masked). The same :class:`Config`
is used by the scheduler, the workers and the API.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from drivers.errors import SettingsError


def _opt(default: Any, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret})


@dataclass(frozen=True)
class Config:
    # Connections
    redis_url: str = _opt(
        "redis://127.0.0.1:6379/0", "Redis for the result store and inventory (redis:// or rediss://)"
    )
    broker_url: str = _opt("", "Celery broker URL; empty means the same as redis_url")
    key_prefix: str = _opt("powerq", "Prefix of every key powerq writes to Redis")
    secret_key: str = _opt(
        "",
        "Fernet key that encrypts inventory secrets at rest; empty means read secret_key_file",
        secret=True,
    )
    secret_key_file: str = _opt(
        "~/.config/powerq/secret.key",
        "File holding the Fernet key; created (mode 0600) on first use when missing",
    )

    # Planning
    chunk_size: int = _opt(200, "Most nodes in one task message (a rack chunk)")
    confirm_threshold: int = _opt(
        20, "off / cycle over more than this many nodes asks for confirmation (--yes skips)"
    )
    inspect_timeout: float = _opt(
        1.5, "Seconds to wait for workers to say which rack queues they consume"
    )

    # Execution (per node, inside a worker)
    call_timeout: float = _opt(10.0, "Seconds one driver call may take before it counts as timeout")
    max_attempts: int = _opt(3, "Attempts per driver call for transient errors (1 = no retry)")
    backoff_base: float = _opt(0.5, "First retry delay ceiling in seconds (full jitter)")
    backoff_max: float = _opt(8.0, "Largest retry delay ceiling in seconds")
    confirm_timeout: float = _opt(
        30.0, "Seconds to wait, after an action, for the query to show the wanted state"
    )
    confirm_interval: float = _opt(0.5, "Seconds between confirmation queries")
    node_concurrency: int = _opt(
        64, "Driver calls run side by side inside one chunk task (one per BMC at most)"
    )
    task_time_limit: float = _opt(
        600.0, "Hard time limit of one chunk task in seconds (soft limit is 30 s less)"
    )
    cycle_mode: str = _opt(
        "off-on",
        "How a cycle runs: 'off-on' (off, confirm, on, confirm) or 'native' (the device's cycle)",
    )

    # Store
    result_ttl: int = _opt(7 * 24 * 3600, "Seconds a job and its per-node results are kept")
    events_maxlen: int = _opt(100_000, "Approximate length cap of the state-change / error event stream")

    # Polling
    poll_chunk_size: int = _opt(200, "Nodes per poll task message")

    # Flower
    flower_address: str = _opt("127.0.0.1", "Address Flower binds to")
    flower_port: int = _opt(5555, "Port Flower listens on")
    flower_basic_auth: str = _opt(
        "", "user:password for Flower; empty means generate one and print it", secret=True
    )

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Config:
        """Build from ``POWERQ_*`` variables (and ``REDIS_URL`` as a fallback for redis_url).

        Raises :class:`SettingsError` naming the variable for a value of the wrong type.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"POWERQ_{f.name.upper()}")
            if raw is None and f.name == "redis_url":
                raw = env.get("REDIS_URL")
            if raw is None:
                continue
            values[f.name] = _coerce(f.name, f.type, raw)
        values.update(overrides)
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Raises :class:`SettingsError` for values out of range."""
        positive = [
            "chunk_size", "call_timeout", "max_attempts", "confirm_timeout", "confirm_interval",
            "node_concurrency", "task_time_limit", "result_ttl", "events_maxlen", "poll_chunk_size",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"POWERQ_{name.upper()} must be greater than 0")
        if self.backoff_base < 0 or self.backoff_max < self.backoff_base:
            raise SettingsError("POWERQ_BACKOFF_BASE must be >= 0 and <= POWERQ_BACKOFF_MAX")
        if self.confirm_threshold < 0:
            raise SettingsError("POWERQ_CONFIRM_THRESHOLD must be >= 0")
        if self.cycle_mode not in ("off-on", "native"):
            raise SettingsError("POWERQ_CYCLE_MODE must be 'off-on' or 'native'")
        for name in ("redis_url", "broker_url"):
            url = getattr(self, name)
            if url and not url.startswith(("redis://", "rediss://", "unix://", "amqp://", "memory://")):
                raise SettingsError(f"POWERQ_{name.upper()} has an unknown scheme: {_mask_url(url)}")

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, value, help) for every option, secrets masked."""
        rows = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                shown = "***"
            elif f.name in ("redis_url", "broker_url"):
                shown = _mask_url(str(value))
            else:
                shown = str(value)
            rows.append((f"POWERQ_{f.name.upper()}", shown, f.metadata.get("help", "")))
        return rows


def _coerce(name: str, type_name: Any, raw: str) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "str")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise SettingsError(f"POWERQ_{name.upper()} must be a {kind}, got {raw!r}") from None
    return raw


def _mask_url(url: str) -> str:
    """A URL with any password replaced by ``***``."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url
