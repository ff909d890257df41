"""The Celery application: JSON only, one queue per rack, nothing created by accident.

``app`` at module level is what ``celery -A workers.app flower`` and the workers use;
:func:`make_app` builds one for any :class:`scheduler.config.Config` (tests use their own).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue

from scheduler.config import Config, redis_ssl_options

TASK_RUN_CHUNK = "powerq.run_chunk"


def rack_queue_name(rack: str) -> str:
    return f"powerq.rack.{rack}"


def rack_queue(rack: str) -> Queue:
    """The queue of one rack, declared identically by senders and the rack's workers."""
    name = rack_queue_name(rack)
    # Durable queue and exchange, persistent messages: on RabbitMQ a chunk survives a
    # broker restart (Redis keeps them as long as its own persistence does).
    exchange = Exchange(name, type="direct", durable=True, delivery_mode="persistent")
    return Queue(name, exchange, routing_key=name, durable=True)


def is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


def broker_transport_options(config: Config) -> dict[str, Any]:
    """Transport options for the configured broker.

    Redis: a visibility timeout longer than any chunk may run, so a chunk still running is
    never delivered twice. AMQP (RabbitMQ): publisher confirms, so a publish the broker
    refuses raises instead of vanishing (one round trip per chunk message: cheap).
    """
    url = config.effective_broker_url
    if is_redis_url(url):
        vt = int(config.visibility_timeout)
        return {
            "visibility_timeout": vt,
            # kombu scans for messages whose worker died every interval x throttle seconds
            # (10 x 10 by default): a dead worker's chunk would wait up to 100 s past its
            # visibility timeout. Scan every few seconds instead.
            "unacked_restore_interval": max(1, min(10, vt // 8)),
            "unacked_restore_throttle": 1,
        }
    if url.startswith("amqp"):
        return {"confirm_publish": True}
    return {}


def _keep_redis_conninfo() -> None:
    """Work around a worker crash in Celery 5.7 + kombu 5.7 when the Redis broker goes away.

    On a lost broker connection Celery's consumer first calls ``Connection.collect()``,
    which drops the transport's ``client`` (the URL and options) when closing the channel
    fails, and then ``Connection.close()``, which closes the channel again: kombu then tries
    to hand the unacknowledged messages back, builds a new Redis pool from ``client``, and
    raises ``AttributeError`` (not a connection error), which Celery treats as unrecoverable:
    the worker exits instead of reconnecting. Each channel keeps its connection's ``client``
    from when it was opened and falls back to it; with Redis down the hand-back then fails
    as a connection error, which kombu ignores (the messages stay in the unacked set and are
    restored by the next worker's visibility scan), and the worker reconnects.
    """
    from kombu.transport import redis as kredis

    channel = kredis.Channel
    if getattr(channel, "_powerq_keeps_conninfo", False):
        return
    original_init = channel.__init__
    original_connparams = channel._connparams

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        self._powerq_client = getattr(args[0] if args else kwargs.get("connection"), "client", None)
        original_init(self, *args, **kwargs)

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is not None and transport.client is None and self._powerq_client is not None:
            transport.client = self._powerq_client
            try:
                return original_connparams(self, asynchronous=asynchronous)
            finally:
                transport.client = None
        return original_connparams(self, asynchronous=asynchronous)

    setattr(channel, "__init__", __init__)  # noqa: B010 - patching a third-party class
    setattr(channel, "_connparams", _connparams)  # noqa: B010
    setattr(channel, "_powerq_keeps_conninfo", True)  # noqa: B010


def make_app(config: Config) -> Celery:
    _keep_redis_conninfo()
    app = Celery("powerq", broker=config.effective_broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        # A mistyped rack must fail loudly, not create a queue nobody consumes.
        task_create_missing_queues=False,
        task_queues=[],
        # One chunk at a time per pool slot: a slow rack chunk never holds other work.
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # Chunks enforce their own deadline (task_time_limit); the broker must never
        # redeliver a chunk that is still running (Redis), and a refused publish must raise
        # (AMQP): see broker_transport_options.
        broker_transport_options=broker_transport_options(config),
        # rediss:// broker (issue 5): the certificate options of POWERQ_REDIS_SSL_*; without
        # them kombu would connect to a rediss:// broker without checking its certificate.
        broker_use_ssl=redis_ssl_options(config, config.effective_broker_url) or False,
        task_default_delivery_mode="persistent",
        # At-least-once delivery: a chunk is acknowledged when it has finished, so one
        # whose worker died is delivered again (after the visibility timeout on Redis, at
        # once on RabbitMQ); the journal in the store makes each node's action happen once.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        include=["workers.tasks"],
    )
    app.conf.powerq_config = config
    _LOGGING["format"] = config.log_format  # logging setup (issue 7), see below
    return app


# --- what `inspect conf` shows (issue 5) -----------------------------------------------------
def _censored_conf(state: Any, with_defaults: bool = False, **_: Any) -> Any:
    """Celery's ``conf`` inspect command, censored. Celery's own sends ``app.conf.table()``
    as it is to every ``inspect conf`` caller, Flower's ``/api/workers`` among them: any
    setting holding a secret would show. This one masks what Celery's ``report`` masks (keys
    naming a key, secret, password or token; broker and backend URLs). powerq's own Config
    in it shows its secrets masked by its repr (before that repr, it printed the Fernet key
    and the Redis and Flower passwords)."""
    from celery.app.utils import filter_hidden_settings
    from celery.utils.saferepr import saferepr
    from celery.utils.serialization import jsonify

    table = filter_hidden_settings(state.app.conf.table(with_defaults=with_defaults))
    return jsonify(table, keyfilter=lambda k: isinstance(k, str) and not k.startswith("__"),
                   unknown_type_filter=saferepr)


def _register_censored_conf() -> None:
    from celery.utils.serialization import strtobool
    from celery.worker.control import inspect_command

    inspect_command(name="conf", alias="dump_conf", signature="[include_defaults=False]",
                    args=[("with_defaults", strtobool)])(_censored_conf)


_register_censored_conf()


# --- logging setup (issue 7): Celery's own log lines go through scheduler/logs.py -----------
_LOGGING = {"format": "text"}
"""The log format of the last app made: one config per process (worker, beat, API)."""


@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    """Any receiver here makes Celery leave logging alone (no handlers of its own, no
    stdout redirection): every record, Celery's included, reaches our one root handler,
    text or JSON, through the redaction filter."""
    from scheduler.logs import setup_logging

    setup_logging(_LOGGING["format"], loglevel or "INFO")


@signals.celeryd_init.connect
def _quiet_banner(instance: Any = None, **_: Any) -> None:
    """No multi-line startup banner on stdout when the log is JSON (one object per line)."""
    if instance is not None and _LOGGING["format"] == "json":
        instance.quiet = True
# --- end of logging setup ---------------------------------------------------------------------


def config_of(app: Celery) -> Config:
    cfg: Any = app.conf.get("powerq_config")
    return cfg if isinstance(cfg, Config) else Config.from_env()


app = make_app(Config.from_env())
