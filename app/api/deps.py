"""FastAPI dependencies: settings, engine, registry, the admin and metrics tokens (constant-time checks).

All `async def`: none blocks, and FastAPI runs a plain `def` dependency on its threadpool, a thread hop per request
(with the GIL handed back and forth) that an eager runner thread pays for."""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.config import Settings
from app.core.errors import NotFound, Unauthorized, Unavailable
from app.engine.engine import Engine
from app.registry.registry import PatchRegistry

bearer = HTTPBearer(auto_error=False, description="DMP_ADMIN_TOKEN (or an API key with the admin scope on "
                    "PUT/DELETE /patches; DMP_METRICS_TOKEN on /metrics)")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_registry(engine: Annotated[Engine, Depends(get_engine)]) -> PatchRegistry:
    if engine.registry is None:
        raise Unavailable("the service is still starting", error_type="not_ready")
    return engine.registry


def is_admin_token(settings: Settings, presented: str) -> bool:
    """Whether `presented` is DMP_ADMIN_TOKEN (constant-time; False while it is unset)."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    return bool(token) and hmac.compare_digest(presented.encode(), token.encode())


async def require_metrics_reader(settings: Annotated[Settings, Depends(get_settings)],
                           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """/metrics is the operator's: it names tenants and their patches, so once DMP_API_KEYS (or DMP_METRICS_TOKEN)
    is set it needs DMP_METRICS_TOKEN or DMP_ADMIN_TOKEN; 404 while keys are on and neither token is set."""
    if settings.api_keys is None and settings.metrics_token is None:
        return
    tokens = [t.get_secret_value().encode() for t in (settings.metrics_token, settings.admin_token) if t]
    if not tokens:
        raise NotFound("/metrics is off: DMP_API_KEYS is set and neither DMP_METRICS_TOKEN nor DMP_ADMIN_TOKEN is",
                       error_type="not_found")
    if credentials is None:
        raise Unauthorized("send Authorization: Bearer <DMP_METRICS_TOKEN or the admin token>",
                           headers={"WWW-Authenticate": "Bearer"})
    presented = credentials.credentials.encode()
    if not [t for t in tokens if hmac.compare_digest(presented, t)]:  # every token compared: no early exit
        raise Unauthorized("wrong metrics token", error_type="invalid_token",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[PatchRegistry, Depends(get_registry)]
MetricsReaderDep = Depends(require_metrics_reader)
