"""API keys on the generation routes: Bearer check (401), per-key rate limit (429 + Retry-After), per-key metrics."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from app.core.apikeys import KeyRing
from app.core.config import Settings, id_secret_bytes
from app.core.errors import Overloaded, Unauthorized
from app.core.metrics import Metrics
from app.core.ratelimit import RateLimiter

log = logging.getLogger("dmp.api")
api_bearer = HTTPBearer(auto_error=False, scheme_name="APIKey", description="An API key from DMP_API_KEYS")
# `openapi_extra` of the key-checked routes: the `{}` alternative says the key is optional (DMP_API_KEYS unset)
KEY_OPTIONAL: dict[str, list[dict]] = {"security": [{}]}


class KeyGate:
    """The key ring and the rate limiter of one app (both absent when DMP_API_KEYS is unset)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.ring = (KeyRing.parse(settings.api_keys.get_secret_value(), id_secret_bytes(settings.key_id_secret))
                     if settings.api_keys else None)
        self._limiter: RateLimiter | None = None
        if self.ring is not None and self.ring.unnamed and settings.key_id_secret is None:
            log.warning("%d API key(s) without an id are labelled with a secret derived from DMP_API_KEYS itself; "
                        "set DMP_KEY_ID_SECRET (or name them ID:KEY) so that a guessed key cannot be checked "
                        "against /metrics", self.ring.unnamed)

    def limiter(self, redis_client) -> RateLimiter:
        """Built on first use: the Redis client exists only once the engine has started."""
        if self._limiter is None:
            self._limiter = RateLimiter(self.settings.key_requests_per_min, self.settings.key_images_per_min,
                                        client=redis_client if self.settings.redis_url else None)
        return self._limiter


@dataclass
class Caller:
    """Who is calling (key id, None when keys are off); `charge` spends their rate-limit tokens."""

    key_id: str | None
    gate: KeyGate
    redis: object

    async def charge(self, images: int) -> None:
        if self.key_id is None:
            return
        wait = await run_in_threadpool(self.gate.limiter(self.redis).take, self.key_id, images)
        metrics = self.gate.metrics
        if wait > 0:
            metrics.key_requests.labels(self.key_id, "rate_limited").inc()
            raise Overloaded(f"rate limit of API key {self.key_id!r} reached; retry in {wait:.1f} s",
                             error_type="rate_limited", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        metrics.key_requests.labels(self.key_id, "allowed").inc()
        metrics.key_images.labels(self.key_id).inc(images)


async def require_key(request: Request,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_bearer)]) -> Caller:
    """401 unless keys are off or the Bearer token is one of them."""
    gate: KeyGate = request.app.state.keys
    redis_client = request.app.state.engine.redis
    if gate.ring is None:
        return Caller(None, gate, redis_client)
    if credentials is None:
        gate.metrics.key_refusals.labels("missing").inc()
        raise Unauthorized("send Authorization: Bearer <API key>", error_type="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
    key_id = gate.ring.identify(credentials.credentials)
    if key_id is None:
        gate.metrics.key_refusals.labels("invalid").inc()
        raise Unauthorized("invalid API key", error_type="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return Caller(key_id, gate, redis_client)


KeyDep = Annotated[Caller, Depends(require_key)]
