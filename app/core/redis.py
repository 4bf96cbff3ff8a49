"""Redis clients with socket timeouts everywhere, so a lost Redis never hangs a request or a thread."""
from __future__ import annotations

import redis

from app.core.config import Settings


def redis_client(settings: Settings, wait: float = 0.0) -> redis.Redis:
    """A client for `DMP_REDIS_URL`; every connect, read and write gives up after `DMP_REDIS_TIMEOUT` seconds (plus
    `wait`, for a client whose commands block on the server, such as XREADGROUP BLOCK)."""
    t = settings.redis_timeout + wait
    assert settings.redis_url, "called only with DMP_REDIS_URL set"
    return redis.Redis.from_url(settings.redis_url, socket_timeout=t, socket_connect_timeout=t,
                                retry_on_timeout=False)
