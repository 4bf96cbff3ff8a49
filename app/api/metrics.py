"""GET /metrics: Prometheus text exposition, for the operator (docs/service.md "Tenants")."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep, MetricsReaderDep
from app.api.keys import KEY_OPTIONAL
from app.api.responses import errors

router = APIRouter(tags=["metrics"])


@router.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                         "description": "Prometheus metrics"}} | errors(401, 404),
            response_class=Response, dependencies=[MetricsReaderDep], openapi_extra=KEY_OPTIONAL,
            summary="Prometheus metrics (the operator's: a token when DMP_API_KEYS or DMP_METRICS_TOKEN is set)")
async def metrics(engine: EngineDep, request: Request):
    await run_in_threadpool(engine.refresh_gauges)
    await run_in_threadpool(request.app.state.batches.refresh_gauges)
    return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)
