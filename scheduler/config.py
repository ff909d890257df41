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


@dataclass(frozen=True, repr=False)
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
    confirm_racks: int = _opt(
        1, "off / cycle over more than this many racks asks for confirmation (--yes skips)"
    )
    max_nodes: int = _opt(
        1000, "off / cycle over more than this many nodes is refused without --force (0: no limit)"
    )
    max_racks: int = _opt(
        20, "off / cycle over more than this many racks is refused without --force (0: no limit)"
    )
    release_lead: float = _opt(
        1.0, "Seconds between submitting a power-on timeline and its first planned start"
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
    redis_retry_for: float = _opt(
        30.0, "Seconds a lost Redis connection is retried before an operation fails (a restart)"
    )
    visibility_timeout: float = _opt(
        3600.0,
        "Redis broker: seconds before an unacknowledged chunk (its worker died) is delivered "
        "again; longer than any chunk may run (task time limit plus a power-on timeline)",
    )
    cycle_mode: str = _opt(
        "off-on",
        "How a cycle runs: 'off-on' (off, confirm, on, confirm) or 'native' (the device's cycle)",
    )

    # IPMI fleet hot path (issue 4; workers/fastpath.py, drivers/rmcpplus.py)
    ipmi_fastpath: bool = _opt(
        True, "IPMI power calls on the worker's own RMCP+ client (sessions kept across jobs), "
        "and a chunk's IPMI nodes (reads and actions) in one batch; false: pyghmi, one session per call"
    )
    ipmi_fleet_timeout: float = _opt(
        2.0, "RMCP+ client: seconds before a request is sent again (3 more tries, then unreachable)"
    )
    ipmi_fleet_in_flight: int = _opt(
        512, "RMCP+ client: most requests outstanding at once per worker process"
    )
    ipmi_fleet_keepalive: float = _opt(
        20.0, "RMCP+ client: seconds unused before a session gets a keep-alive (0: none; an idle "
        "session is then replaced after 50 s)"
    )
    ipmi_fleet_linger: float = _opt(
        300.0, "RMCP+ client: seconds a BMC session is kept without a power call or read before "
        "it is logged out (0: kept until the worker stops)"
    )
    ipmi_fleet_sessions: int = _opt(
        20000, "RMCP+ client: most BMC sessions a worker process keeps open (least used logged out)"
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

    # REST API and MAAS webhook (issue 7; scheduler/api.py)
    api_host: str = _opt("127.0.0.1", "Address `powerq api` binds to")
    api_port: int = _opt(8470, "Port `powerq api` listens on")
    api_state_fresh: float = _opt(
        5.0, "MAAS query: a stored state older than this many seconds is refreshed by a query job"
    )
    api_query_wait: float = _opt(
        4.0, "MAAS query: seconds to wait for that query job before answering with the stored state"
    )
    api_inflight_ttl: float = _opt(
        120.0, "MAAS on/off: seconds a node's running job blocks a second job for the same action"
    )
    api_workers_cache: float = _opt(
        10.0,
        "Seconds between the API's background checks of which rack queues have a worker "
        "(a rack not seen there is checked live before a job is refused)",
    )
    api_audit_maxlen: int = _opt(100_000, "Approximate length cap of the API audit stream")

    # Fleet page (issue 7; scheduler/fleetpage.py)
    fleet_fresh_age: float = _opt(
        60.0, "Fleet page: a state read less than this many seconds ago is drawn fresh"
    )
    fleet_stale_age: float = _opt(
        900.0, "Fleet page: a state older than this many seconds is drawn stale (faded)"
    )
    fleet_snapshot_every: float = _opt(
        15.0, "Fleet page: seconds between full snapshots on the event stream (ages, missed changes)"
    )
    fleet_stream_seconds: float = _opt(
        300.0, "Fleet page: seconds one event stream lasts before the page reconnects "
        "(its token is checked again then)"
    )

    # Observability (issue 7; scheduler/metrics.py, scheduler/logs.py)
    log_format: str = _opt(
        "text", "Log lines of `powerq worker`, `powerq api` and `powerq poll`: 'text' or 'json' "
        "(one object per line with ts, level, logger, msg, job_id, node, rack, power_type)"
    )
    metrics_auth: bool = _opt(
        False, "GET /metrics needs a read-scope API token (default: open, as exporters usually are)"
    )
    metrics_heartbeat: float = _opt(
        5.0, "Seconds between a worker's metric writes when no chunk flushes; its in-flight "
        "counts expire 3 heartbeats after it dies"
    )

    # Security (issue 5): Redis TLS (rediss://) and the audit stream; see scheduler/secrets.py
    # for key rotation. A password goes in the URL (redis://:PASSWORD@host:port/0): every
    # URL is shown with its password masked.
    redis_ssl_ca_certs: str = _opt(
        "", "rediss://: CA certificate file (PEM) the Redis server's certificate must chain to"
    )
    redis_ssl_certfile: str = _opt(
        "", "rediss://: client certificate file (PEM), when Redis asks for one (tls-auth-clients)"
    )
    redis_ssl_keyfile: str = _opt("", "rediss://: private key file (PEM) of the client certificate")
    redis_ssl_cert_reqs: str = _opt(
        "required",
        "rediss://: check the server's certificate: 'required' (and its host name), "
        "'optional' or 'none' (no check: only for tests)",
    )
    audit_maxlen: int = _opt(
        100_000, "Approximate length cap of the audit stream of power action requests and outcomes"
    )

    # Per-BMC protection (issue 5); see workers/bmcguard.py
    bmc_lease: str = _opt(
        "redis", "One call in flight per BMC: 'redis' (a lease per BMC shared by every worker "
        "process) or 'process' (a lock inside each worker process only)"
    )
    bmc_lease_ttl: float = _opt(
        15.0, "Seconds a BMC lease lives unless renewed (renewed while its call runs; a dead "
        "worker's lease is free again after this)"
    )
    bmc_lease_wait: float = _opt(
        10.0, "Seconds a call waits for a BMC lease held by another worker before it is 'busy'"
    )
    bmc_park_after: int = _opt(
        5, "Consecutive failed calls (unreachable / timeout, after retries) that park a BMC "
        "(0: never park)"
    )
    bmc_park_seconds: float = _opt(
        60.0, "Seconds a parked BMC is left alone: calls to it fail at once (`powerq unpark` "
        "releases it early)"
    )
    busy_backoff_max: float = _opt(
        30.0, "Largest retry delay ceiling after a busy / no-free-session reply, in seconds "
        "(the ceiling grows 4x per attempt from POWERQ_BACKOFF_BASE)"
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
            "ipmi_fleet_timeout", "ipmi_fleet_in_flight", "ipmi_fleet_sessions",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"POWERQ_{name.upper()} must be greater than 0")
        if self.backoff_base < 0 or self.backoff_max < self.backoff_base:
            raise SettingsError("POWERQ_BACKOFF_BASE must be >= 0 and <= POWERQ_BACKOFF_MAX")
        if self.confirm_threshold < 0:
            raise SettingsError("POWERQ_CONFIRM_THRESHOLD must be >= 0")
        if self.log_format not in ("text", "json"):  # Observability (issue 7)
            raise SettingsError("POWERQ_LOG_FORMAT must be 'text' or 'json'")
        if self.metrics_heartbeat <= 0:
            raise SettingsError("POWERQ_METRICS_HEARTBEAT must be greater than 0")
        if self.visibility_timeout <= self.task_time_limit + 30:
            raise SettingsError(
                "POWERQ_VISIBILITY_TIMEOUT must be longer than POWERQ_TASK_TIME_LIMIT + 30 s: "
                "a running chunk must never be delivered twice"
            )
        if self.cycle_mode not in ("off-on", "native"):
            raise SettingsError("POWERQ_CYCLE_MODE must be 'off-on' or 'native'")
        if self.redis_ssl_cert_reqs not in _CERT_REQS:  # Security (issue 5)
            raise SettingsError("POWERQ_REDIS_SSL_CERT_REQS must be 'required', 'optional' or 'none'")
        if self.audit_maxlen <= 0:  # Security (issue 5)
            raise SettingsError("POWERQ_AUDIT_MAXLEN must be greater than 0")
        if self.bmc_lease not in ("redis", "process"):  # Per-BMC protection (issue 5)
            raise SettingsError("POWERQ_BMC_LEASE must be 'redis' or 'process'")
        if self.bmc_lease_ttl <= 0 or self.bmc_lease_wait < 0 or self.bmc_park_seconds <= 0:
            raise SettingsError("POWERQ_BMC_LEASE_TTL and POWERQ_BMC_PARK_SECONDS must be "
                                "greater than 0, POWERQ_BMC_LEASE_WAIT at least 0")
        if self.ipmi_fleet_linger < 0:
            raise SettingsError("POWERQ_IPMI_FLEET_LINGER must be >= 0")
        if self.bmc_park_after < 0:
            raise SettingsError("POWERQ_BMC_PARK_AFTER must be >= 0")
        if self.busy_backoff_max < self.backoff_base:
            raise SettingsError("POWERQ_BUSY_BACKOFF_MAX must be >= POWERQ_BACKOFF_BASE")
        for name in ("redis_url", "broker_url"):
            url = getattr(self, name)
            if url and not url.startswith(("redis://", "rediss://", "unix://", "amqp://", "memory://")):
                raise SettingsError(f"POWERQ_{name.upper()} has an unknown scheme: {_mask_url(url)}")

    def __repr__(self) -> str:
        """Every option with its secrets masked: a Config reaches Celery's ``inspect conf`` /
        ``report`` (and so Flower), tracebacks and debug logs, which must never show them."""
        shown = ", ".join(f"{var[len('POWERQ_'):].lower()}={value!r}"
                          for var, value, _ in self.describe())
        return f"Config({shown})"

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


# -- Security (issue 5): TLS options for every Redis client ------------------------------------
_CERT_REQS = ("required", "optional", "none")


def redis_ssl_options(config: Config, url: str) -> dict[str, Any]:
    """The ``ssl_*`` keyword arguments of ``redis.Redis.from_url`` (and of Celery's
    ``broker_use_ssl`` for a Redis broker) for ``url``: empty unless it is ``rediss://``.
    The server certificate is checked (against ``redis_ssl_ca_certs``, or the system's
    CAs) unless ``redis_ssl_cert_reqs`` says otherwise; with 'required' its host name too."""
    if not url.startswith("rediss://"):
        return {}
    import ssl

    reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
    out: dict[str, Any] = {"ssl_cert_reqs": reqs[config.redis_ssl_cert_reqs],
                           "ssl_check_hostname": config.redis_ssl_cert_reqs == "required"}
    for name in ("ca_certs", "certfile", "keyfile"):
        value = getattr(config, f"redis_ssl_{name}")
        if value:
            out[f"ssl_{name}"] = os.path.expanduser(value)
    return out
# -- end of Security (issue 5) ------------------------------------------------------------------


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
