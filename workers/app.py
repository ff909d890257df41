"""The Celery application: JSON only, one queue per rack, nothing created by accident.

``app`` at module level is what ``celery -A workers.app flower`` and the workers use;
:func:`make_app` builds one for any :class:`scheduler.config.Config` (tests use their own).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from scheduler.config import Config

TASK_RUN_CHUNK = "powerq.run_chunk"


def rack_queue_name(rack: str) -> str:
    return f"powerq.rack.{rack}"


def rack_queue(rack: str) -> Queue:
    """The queue of one rack, declared identically by senders and the rack's workers."""
    name = rack_queue_name(rack)
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def make_app(config: Config) -> Celery:
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
        # redeliver a chunk that is still running.
        broker_transport_options={"visibility_timeout": int(config.task_time_limit * 2) + 60},
        include=["workers.tasks"],
    )
    app.conf.powerq_config = config
    return app


def config_of(app: Celery) -> Config:
    cfg: Any = app.conf.get("powerq_config")
    return cfg if isinstance(cfg, Config) else Config.from_env()


app = make_app(Config.from_env())
