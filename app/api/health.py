"""Liveness and readiness probes."""
from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import EngineDep
from app.api.responses import errors
from app.api.schemas import Health
from app.core.errors import Unavailable

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=Health, responses=errors(503),
            summary="The process is up and has not failed to start")
async def live(engine: EngineDep):  # on the event loop: no thread pool to wait for under load
    if engine.state == "failed":  # `serve` exits on this too; answering 503 covers the moments before
        raise Unavailable(f"startup failed: {engine.error}", error_type="startup_failed")
    return Health(status="live")


@router.get("/ready", response_model=Health, responses=errors(503),
            summary="Models loaded and warmed, registry reachable, not draining")
async def ready(engine: EngineDep):
    ok, error_type, message = engine.readiness()  # no I/O, no lock: what the registry's threads last saw
    if not ok:
        raise Unavailable(message, error_type=error_type)
    return Health(status="ready", detail=engine.skipped_detail() if engine.skipped else None)


# HEAD too (some load balancers and uptime checkers probe with it); one operation each in the OpenAPI document
for path, probe in (("/live", live), ("/ready", ready)):
    router.add_api_route(path, probe, methods=["HEAD"], response_model=Health, include_in_schema=False)
