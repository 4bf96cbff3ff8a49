"""POST /generate: resolve, charge the API key, then produce as JSON, a raw PNG, or a stream of progress events."""
from __future__ import annotations

import base64
import logging
import time
from dataclasses import replace

from fastapi import APIRouter, Header, Request, Response

from app.api.deps import EngineDep
from app.api.keys import KEY_OPTIONAL, KeyDep
from app.api.produce import Produced, admit_followed, produce, produce_events
from app.api.progress import sse, sse_response, wants_events
from app.api.responses import errors
from app.api.schemas import GenerateRequest, GenerateResponse
from app.core.errors import ServiceError
from app.engine.engine import Engine
from app.engine.images import media_type
from app.engine.work import Spec

log = logging.getLogger("dmp.api")
router = APIRouter(tags=["generate"])
MAX_BODY_BYTES = 1024 * 1024  # a request body is a few hundred bytes; refuse megabytes before parsing them

RESPONSES = {200: {"description": "Images as base64 JSON; the raw PNG with Accept: image/png and num_images=1; "
                                  "Server-Sent Events (queued, progress, done | error) with Accept: text/event-stream",
                   "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                               "text/event-stream": {"schema": {"type": "string"}}}}}


def _wants_raw_png(accept: str | None, num_images: int) -> bool:
    return num_images == 1 and accept is not None and "image/png" in accept.lower()


@router.post("/generate", response_model=GenerateResponse, max_body_size=MAX_BODY_BYTES,
             responses=RESPONSES | errors(400, 401, 404, 413, 422, 429, 503),
             summary="Generate images from a base model, optionally patched", openapi_extra=KEY_OPTIONAL)
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, caller: KeyDep,
                   accept: str | None = Header(None, description="image/png + num_images=1: the raw PNG; "
                                                                  "text/event-stream: progress events")):
    started = time.perf_counter()
    engine.check_admitting()  # also before the cache: a draining server answers nothing new
    spec = engine.resolve(**body.model_dump(exclude={"previews"}))
    await caller.charge(spec.num_images)
    deterministic = body.seed is not None
    if wants_events(accept):
        admitted = await admit_followed(engine, spec, deterministic, body.previews, "png")
        return sse_response(_events(engine, spec, deterministic, admitted, started))
    raw = _wants_raw_png(accept, spec.num_images)
    if raw:
        spec = replace(spec, output_format="png")
    out = await produce(engine, spec, deterministic, request, started)
    if raw:
        headers = {"X-Seed": str(spec.seed), "X-Model": spec.model,
                   "Server-Timing": ", ".join(f"{k[:-3]};dur={v:.1f}" for k, v in out.timings.items())}
        if spec.patch:
            headers |= {"X-Patch": spec.patch, "X-Patch-Version": out.version}
        return Response(out.files[0], media_type=media_type("png"), headers=headers)
    return _reply(spec, out)


def _reply(spec: Spec, out: Produced) -> GenerateResponse:
    patch = {"name": spec.patch, "version": out.version} if spec.patch else None
    return GenerateResponse(images=[base64.b64encode(f).decode() for f in out.files], seed=spec.seed,
                            model=spec.model, patch=patch, output_format=spec.output_format, cached=out.cached,
                            timings=out.timings)


async def _events(engine: Engine, spec: Spec, deterministic: bool, admitted, started: float):
    """SSE: `queued` {position}, `progress` {step, of[, preview]} per step, then `done` (the JSON body) or `error`."""
    try:
        async for kind, data in produce_events(engine, spec, deterministic, admitted, started):
            if kind == "queued":
                yield sse("queued", {"position": data})
            elif kind == "progress":
                step, of, preview = data
                event = {"step": step, "of": of}
                if preview is not None:
                    event["preview"] = [base64.b64encode(f).decode() for f in preview]
                yield sse("progress", event)
            else:
                yield sse("done", _reply(spec, data).model_dump())
    except ServiceError as e:  # the status line is out already: the error travels as an event
        yield sse("error", {"error": e.message, "error_type": e.error_type})
    except Exception:
        log.exception("streamed generation failed")
        yield sse("error", {"error": "internal server error", "error_type": "internal"})
