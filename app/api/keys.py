"""Who is calling: an API key (DMP_API_KEYS: its tenant and scope) or the operator (DMP_ADMIN_TOKEN); Bearer checks
(401/403), per-key and per-tenant rate limits (429 + Retry-After) and metrics."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from app.api.deps import bearer, is_admin_token
from app.core.apikeys import ApiKey, KeyRing
from app.core.config import Settings, id_secret_bytes
from app.core.errors import Forbidden, NotFound, Overloaded, Unauthorized
from app.core.metrics import Metrics
from app.core.ratelimit import RateLimiter
from app.registry.records import NOBODY

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
            s = self.settings
            self._limiter = RateLimiter(s.key_requests_per_min, s.key_images_per_min,
                                        client=redis_client if s.redis_url else None,
                                        tenant_requests_per_min=s.tenant_requests_per_min,
                                        tenant_images_per_min=s.tenant_images_per_min)
        return self._limiter


@dataclass
class Caller:
    """Who is calling: a key (None: keys off, the operator, or no credential on an open route) or the operator (the
    admin token, on listing and admin routes); `charge` spends the key's and its tenant's rate-limit tokens."""

    key: ApiKey | None
    operator: bool
    gate: KeyGate
    redis: object

    @property
    def tenant(self) -> str | None:
        """Whose patches the caller sees (the registry's `tenant`): None = all of them (the operator, or keys off);
        NOBODY = the shared ones alone (no credential while keys are on)."""
        if self.key is not None:
            return self.key.tenant
        return None if self.operator or self.gate.ring is None else NOBODY

    async def charge(self, images: int) -> None:
        if self.key is None:  # keys off: no bucket
            return
        key = self.key
        wait = await run_in_threadpool(self.gate.limiter(self.redis).take, key.id, images, key.tenant)
        metrics = self.gate.metrics
        if wait > 0:
            metrics.key_requests.labels(key.id, "rate_limited").inc()
            metrics.tenant_requests.labels(key.tenant, "rate_limited").inc()
            raise Overloaded(f"rate limit of API key {key.id!r} or its tenant reached; retry in {wait:.1f} s",
                             error_type="rate_limited", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        metrics.key_requests.labels(key.id, "allowed").inc()
        metrics.key_images.labels(key.id).inc(images)
        metrics.tenant_requests.labels(key.tenant, "allowed").inc()
        metrics.tenant_images.labels(key.tenant).inc(images)


def identify(request: Request, credentials: HTTPAuthorizationCredentials | None, required: bool) -> Caller:
    """The caller behind a Bearer credential. `required` (generation and gate routes, when keys are on): an API key,
    else 401; the admin token is not a key there. Otherwise (listing and describing routes): the admin token is the
    operator, a key its tenant, no credential a caller who sees the shared patches alone; a wrong one is 401."""
    gate: KeyGate = request.app.state.keys
    redis_client = request.app.state.engine.redis
    if not required and credentials is not None and is_admin_token(gate.settings, credentials.credentials):
        return Caller(None, True, gate, redis_client)
    if gate.ring is None or (credentials is None and not required):
        return Caller(None, False, gate, redis_client)
    if credentials is None:
        gate.metrics.key_refusals.labels("missing").inc()
        raise Unauthorized("send Authorization: Bearer <API key>", error_type="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
    key_id = gate.ring.identify(credentials.credentials)
    if key_id is None:
        gate.metrics.key_refusals.labels("invalid").inc()
        raise Unauthorized("invalid API key", error_type="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return Caller(gate.ring.keys[key_id], False, gate, redis_client)


async def require_key(request: Request,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_bearer)]) -> Caller:
    """Generation and gate routes: 401 unless keys are off or the Bearer token is one of them."""
    return identify(request, credentials, required=True)


async def read_key(request: Request,
             credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_bearer)]) -> Caller:
    """Listing and describing routes: open, but what a caller sees depends on its credential (none: the shared
    patches alone; the admin token: all)."""
    return identify(request, credentials, required=False)


async def require_patch_admin(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    """Upload and delete: the admin token (the operator) or an API key with the admin scope (its tenant); 404 while
    neither exists, 401 without a credential or with a wrong one, 403 for a key without the admin scope."""
    gate: KeyGate = request.app.state.keys
    settings, ring = gate.settings, gate.ring
    if settings.admin_token is None and not (ring is not None and ring.has_admins):
        raise NotFound("admin routes are disabled (DMP_ADMIN_TOKEN is not set and no API key has the admin scope)",
                       error_type="not_found")
    if credentials is None:
        raise Unauthorized("send Authorization: Bearer <admin token, or an API key with the admin scope>",
                           headers={"WWW-Authenticate": "Bearer"})
    if is_admin_token(settings, credentials.credentials):
        return Caller(None, True, gate, request.app.state.engine.redis)
    key_id = ring.identify(credentials.credentials) if ring is not None else None
    if ring is None or key_id is None:
        raise Unauthorized("wrong admin token", error_type="invalid_token",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if not ring.keys[key_id].admin:
        raise Forbidden(f"API key {key_id!r} has no admin scope (DMP_API_KEYS entry ID+admin)",
                        error_type="not_admin")
    return Caller(ring.keys[key_id], False, gate, request.app.state.engine.redis)


KeyDep = Annotated[Caller, Depends(require_key)]
ReaderDep = Annotated[Caller, Depends(read_key)]
PatchAdminDep = Annotated[Caller, Depends(require_patch_admin)]
