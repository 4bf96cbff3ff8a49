"""Per-key token buckets (requests/min and images/min), in memory or in Redis (shared by replicas, one Lua call).

A bucket holds up to one minute's allowance and refills continuously; a request takes 1 request token and
one image token per image, both or neither. `take` answers 0 when allowed, else the seconds to wait.
"""
from __future__ import annotations

import threading
import time

import redis

from app.core.errors import BadRequest, Unavailable

# KEYS[1]: the bucket hash. ARGV: per-second rates and costs (requests, images). A rate of 0 = no limit.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rr, cr, ri, ci = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'r', 'i', 't')
local last = tonumber(b[3]) or now
local dt = math.max(0, now - last)
local r = math.min(rr * 60, (tonumber(b[1]) or rr * 60) + dt * rr)
local i = math.min(ri * 60, (tonumber(b[2]) or ri * 60) + dt * ri)
local wait = 0
if rr > 0 and cr > r then wait = math.max(wait, (cr - r) / rr) end
if ri > 0 and ci > i then wait = math.max(wait, (ci - i) / ri) end
if wait == 0 then
  if rr > 0 then r = r - cr end
  if ri > 0 then i = i - ci end
end
redis.call('HSET', KEYS[1], 'r', r, 'i', i, 't', now)
redis.call('EXPIRE', KEYS[1], 120)
return tostring(wait)
"""


class RateLimiter:
    """Token buckets per key id; `client` = a Redis client to share them, None = this process only."""

    def __init__(self, requests_per_min: float, images_per_min: float, client: redis.Redis | None = None,
                 prefix: str = "dmp:ratelimit:"):
        self.rr, self.ri = requests_per_min / 60, images_per_min / 60
        self.client, self.prefix = client, prefix
        self.script = client.register_script(TAKE) if client is not None else None
        self.buckets: dict[str, tuple[float, float, float]] = {}  # id -> (request tokens, image tokens, time)
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rr > 0 or self.ri > 0

    def take(self, key_id: str, images: int) -> float:
        """0 when the request may run (tokens taken), else seconds until it could."""
        if not self.enabled:
            return 0.0
        if self.ri > 0 and images > self.ri * 60:
            raise BadRequest(f"{images} images is over this key's limit of {self.ri * 60:g} images per minute",
                             error_type="over_key_limit")
        if self.script is None:
            return self._take_here(key_id, images)
        try:
            return float(self.script(keys=[self.prefix + key_id], args=[self.rr, 1, self.ri, images]))
        except redis.RedisError as e:
            raise Unavailable(f"rate limiter unavailable (Redis: {e.__class__.__name__})",
                              error_type="registry_unavailable") from e

    def _take_here(self, key_id: str, images: int) -> float:
        """The Lua script's arithmetic, for one process."""
        with self.lock:
            now = time.monotonic()
            r, i, last = self.buckets.get(key_id, (self.rr * 60, self.ri * 60, now))
            r = min(self.rr * 60, r + (now - last) * self.rr)
            i = min(self.ri * 60, i + (now - last) * self.ri)
            wait = max((1 - r) / self.rr if self.rr > 0 and r < 1 else 0.0,
                       (images - i) / self.ri if self.ri > 0 and i < images else 0.0)
            if wait == 0:
                r, i = r - (self.rr > 0), i - images * (self.ri > 0)
            self.buckets[key_id] = (r, i, now)
            return wait
