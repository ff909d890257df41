"""Worker presence (issue 4): a rack whose worker beats is known to be served without a
broadcast; a stopped or silent worker is not counted; without a beat the CLI asks the
workers (inspect) as before. Against the session's real Redis."""

from __future__ import annotations

import time

import redis

from workers.dispatch import (
    PRESENCE_EVERY,
    Presence,
    presence_key,
    racks_with_presence,
    racks_without_worker,
)


class _NoBroadcast:
    """Stands in for the Celery app: the broadcast must not be needed."""

    class control:  # noqa: N801 - mirrors celery's attribute
        @staticmethod
        def inspect(timeout: float) -> None:
            raise AssertionError("asked the workers although every rack had a live beat")


def test_a_beating_worker_serves_its_racks_without_a_broadcast(redis_client: redis.Redis, prefix: str) -> None:
    presence = Presence(redis_client, prefix, ["r1", "r2"], "w1@host").start()
    try:
        deadline = time.monotonic() + 5
        while racks_with_presence(redis_client, prefix, ["r1", "r2", "r3"]) != {"r1", "r2"}:
            assert time.monotonic() < deadline, "the first beat never landed"
            time.sleep(0.05)
        assert racks_without_worker(_NoBroadcast(), ["r1", "r2"], 30.0, redis_client, prefix) == []  # type: ignore[arg-type]
    finally:
        presence.stop()
    # Stopping withdraws at once.
    assert racks_with_presence(redis_client, prefix, ["r1", "r2"]) == set()


def test_a_silent_worker_is_not_counted(redis_client: redis.Redis, prefix: str) -> None:
    seconds, micros = redis_client.time()
    now = seconds + micros / 1e6
    redis_client.zadd(presence_key(prefix, "r1"), {"dead@host": now - 3 * PRESENCE_EVERY - 1})
    redis_client.zadd(presence_key(prefix, "r2"), {"alive@host": now})
    assert racks_with_presence(redis_client, prefix, ["r1", "r2"]) == {"r2"}
