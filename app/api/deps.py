"""FastAPI dependencies: settings, engine, registry, admin auth (constant-time token check).

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

bearer = HTTPBearer(auto_error=False, description="DMP_ADMIN_TOKEN")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_registry(engine: Annotated[Engine, Depends(get_engine)]) -> PatchRegistry:
    if engine.registry is None:
        raise Unavailable("the service is still starting", error_type="not_ready")
    return engine.registry


async def require_admin(settings: Annotated[Settings, Depends(get_settings)],
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Admin routes exist only when DMP_ADMIN_TOKEN is set; the token is compared in constant time."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not token:
        raise NotFound("admin routes are disabled (DMP_ADMIN_TOKEN is not set)", error_type="not_found")
    if credentials is None:
        raise Unauthorized("send Authorization: Bearer <admin token>", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise Unauthorized("wrong admin token", error_type="invalid_token",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[PatchRegistry, Depends(get_registry)]
AdminDep = Depends(require_admin)
