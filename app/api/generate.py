"""POST /generate: resolve, charge the API key, open the request's stream; reply with its outcome as JSON or a raw
PNG, or frame each of its events as Server-Sent Events."""
from __future__ import annotations

import logging
from dataclasses import replace

from fastapi import APIRouter, Header, Request, Response

from app.api.deps import EngineDep
from app.api.keys import KEY_OPTIONAL, KeyDep
from app.api.responses import errors
from app.api.schemas import GenerateRequest, GenerateResponse
from app.api.stream import b64, outcome, sse, sse_response, wants_events
from app.core.errors import ServiceError
from app.engine.images import media_type
from app.engine.work import Done, Queued, Spec, Step, Work

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
    engine.check_admitting()  # before anything else: a draining server answers nothing new
    spec = engine.resolve(**body.model_dump(exclude={"previews"}), tenant=caller.tenant)
    await caller.charge(spec.num_images)
    if wants_events(accept):
        work = await engine.open(spec, follow=True, previews=body.previews, tenant=caller.tenant)
        return sse_response(_events(work))
    raw = _wants_raw_png(accept, spec.num_images)
    if raw:
        spec = replace(spec, output_format="png")
    done = await outcome(await engine.open(spec, tenant=caller.tenant), request)
    if raw:
        headers = {"X-Seed": str(spec.seed), "X-Model": spec.model,
                   "Server-Timing": ", ".join(f"{k[:-3]};dur={v:.1f}" for k, v in done.timings.items())}
        if spec.patch:
            assert done.versions, "a patched result names its versions"
            headers |= {"X-Patch": spec.patch, "X-Patch-Version": done.versions[0]}
        return Response(done.files[0], media_type=media_type("png"), headers=headers)
    return _reply(spec, done)


def _reply(spec: Spec, done: Done) -> GenerateResponse:
    used = [{"name": name, "version": version, "scale": scale}
            for (name, scale), version in zip(spec.patches, done.versions or (), strict=True)]
    patch = {"name": used[0]["name"], "version": used[0]["version"]} if used else None
    return GenerateResponse(images=[b64(f) for f in done.files], seed=spec.seed, seeds=list(spec.seeds),
                            model=spec.model, patch=patch, patches=used, output_format=spec.output_format,
                            cached=done.cached, timings=done.timings)



async def _events(work: Work):
    """SSE: `queued` {position}, `progress` {step, of[, preview]} per step, then `done` (the JSON body) or `error`."""
    try:
        async for event in work.events():
            if isinstance(event, Queued):
                yield sse("queued", {"position": event.position})
            elif isinstance(event, Step):
                data: dict[str, int | list[str]] = {"step": event.step, "of": event.of}
                if event.preview is not None:
                    data["preview"] = [b64(f) for f in event.preview]
                yield sse("progress", data)
            else:
                yield sse("done", _reply(work.spec, event).model_dump())
    except ServiceError as e:  # the status line is out already: the error travels as an event
        yield sse("error", {"error": e.message, "error_type": e.error_type})
    except Exception:
        log.exception("streamed generation failed")
        yield sse("error", {"error": "internal server error", "error_type": "internal"})
