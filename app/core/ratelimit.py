"""Token buckets (requests/min and images/min) per key and per tenant, in memory or in Redis (shared by replicas,
one Lua call).

A bucket holds up to one minute's allowance and refills continuously; a request takes 1 request token and
one image token per image from each of its buckets (its key's and its tenant's), all or none. `take` answers 0 when
allowed, else the seconds to wait.
"""
from __future__ import annotations

import threading
import time

import redis

from app.core.errors import BadRequest, Unavailable

# KEYS: the bucket hashes. ARGV[1]: images asked for; then per bucket its per-second rates (requests, images). A
# rate of 0 = no limit. Every bucket is checked before any is charged: all or none.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ci = tonumber(ARGV[1])
local wait, state = 0, {}
for k = 1, #KEYS do
  local rr, ri = tonumber(ARGV[2 * k]), tonumber(ARGV[2 * k + 1])
  local b = redis.call('HMGET', KEYS[k], 'r', 'i', 't')
  local dt = math.max(0, now - (tonumber(b[3]) or now))
  local r = math.min(rr * 60, (tonumber(b[1]) or rr * 60) + dt * rr)
  local i = math.min(ri * 60, (tonumber(b[2]) or ri * 60) + dt * ri)
  if rr > 0 and 1 > r then wait = math.max(wait, (1 - r) / rr) end
  if ri > 0 and ci > i then wait = math.max(wait, (ci - i) / ri) end
  state[k] = {rr, ri, r, i}
end
for k = 1, #KEYS do
  local rr, ri, r, i = state[k][1], state[k][2], state[k][3], state[k][4]
  if wait == 0 then
    if rr > 0 then r = r - 1 end
    if ri > 0 then i = i - ci end
  end
  redis.call('HSET', KEYS[k], 'r', r, 'i', i, 't', now)
  redis.call('EXPIRE', KEYS[k], 120)
end
return tostring(wait)
"""


class Rates:
    """A bucket's allowance: requests and images per minute (0 = no limit)."""

    def __init__(self, requests_per_min: float, images_per_min: float):
        self.rr, self.ri = requests_per_min / 60, images_per_min / 60

    @property
    def enabled(self) -> bool:
        return self.rr > 0 or self.ri > 0


class RateLimiter:
    """Token buckets per key id, and per tenant when tenant rates are set; `client` = a Redis client to share them,
    None = this process only."""

    def __init__(self, requests_per_min: float, images_per_min: float, client: redis.Redis | None = None,
                 prefix: str = "dmp:ratelimit:", tenant_requests_per_min: float = 0, tenant_images_per_min: float = 0):
        self.key_rates = Rates(requests_per_min, images_per_min)
        self.tenant_rates = Rates(tenant_requests_per_min, tenant_images_per_min)
        self.client, self.prefix = client, prefix
        self.script = client.register_script(TAKE) if client is not None else None
        self.buckets: dict[str, tuple[float, float, float]] = {}  # bucket -> (request tokens, image tokens, time)
        self.lock = threading.Lock()

    def take(self, key_id: str, images: int, tenant: str | None = None) -> float:
        """0 when the request may run (tokens taken from the key's and the tenant's buckets), else seconds until it
        could."""
        # ids and tenants never hold ':', so a tenant's bucket cannot be a key's
        buckets = [(self.prefix + key_id, self.key_rates, "key")]
        if tenant is not None:
            buckets.append((self.prefix + f"tenant:{tenant}", self.tenant_rates, "tenant"))
        buckets = [b for b in buckets if b[1].enabled]
        if not buckets:
            return 0.0
        for _, rates, whose in buckets:
            if rates.ri > 0 and images > rates.ri * 60:
                raise BadRequest(f"{images} images is over this {whose}'s limit of {rates.ri * 60:g} images per "
                                 "minute", error_type=f"over_{whose}_limit")
        if self.script is None:
            return self._take_here(buckets, images)
        try:
            return float(self.script(keys=[name for name, _, _ in buckets],
                                     args=[images, *(x for _, r, _ in buckets for x in (r.rr, r.ri))]))
        except redis.RedisError as e:
            raise Unavailable(f"rate limiter unavailable (Redis: {e.__class__.__name__})",
                              error_type="registry_unavailable") from e

    def _take_here(self, buckets: list[tuple[str, Rates, str]], images: int) -> float:
        """The Lua script's arithmetic, for one process."""
        with self.lock:
            now, wait, state = time.monotonic(), 0.0, []
            for name, rates, _ in buckets:
                rr, ri = rates.rr, rates.ri
                r, i, last = self.buckets.get(name, (rr * 60, ri * 60, now))
                r = min(rr * 60, r + (now - last) * rr)
                i = min(ri * 60, i + (now - last) * ri)
                wait = max(wait, (1 - r) / rr if rr > 0 and r < 1 else 0.0,
                           (images - i) / ri if ri > 0 and i < images else 0.0)
                state.append((name, rates, r, i))
            for name, rates, r, i in state:
                if wait == 0:
                    r, i = r - (rates.rr > 0), i - images * (rates.ri > 0)
                self.buckets[name] = (r, i, now)
            return wait
