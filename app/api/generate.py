"""POST /generate: resolve, maybe answer from cache, admit, wait (dropping the work if the client leaves), encode."""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import replace

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep
from app.api.progress import Followed, sse, sse_response, wants_events
from app.api.responses import errors
from app.api.schemas import GenerateRequest, GenerateResponse
from app.core.errors import ServiceError, Unavailable
from app.engine.engine import Engine
from app.engine.images import encode_images, media_type
from app.engine.work import Result, Spec, Work

log = logging.getLogger("dmp.api")
router = APIRouter(tags=["generate"])
MAX_BODY_BYTES = 1024 * 1024  # a request body is a few hundred bytes; refuse megabytes before parsing them

RESPONSES = {200: {"description": "Images as base64 JSON; the raw PNG with Accept: image/png and num_images=1; "
                                  "Server-Sent Events (queued, progress, done | error) with Accept: text/event-stream",
                   "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                               "text/event-stream": {"schema": {"type": "string"}}}}}


class ClientGone(ServiceError):
    status, error_type = 499, "client_closed_request"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait(work: Work, request: Request, timeout: float) -> Result:
    """The work's result; if the client leaves or the deadline passes first, the work is dropped."""
    result = asyncio.wrap_future(work.future)
    result.add_done_callback(lambda f: f.cancelled() or f.exception())  # never an unretrieved exception
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result in done:
        return result.result()
    work.cancel()
    if gone in done:
        raise ClientGone("the client closed the connection")
    raise Unavailable("the request ran past DMP_REQUEST_TIMEOUT", error_type="deadline_exceeded")


def _wants_raw_png(accept: str | None, num_images: int) -> bool:
    return num_images == 1 and accept is not None and "image/png" in accept.lower()


@router.post("/generate", response_model=GenerateResponse, max_body_size=MAX_BODY_BYTES,
             responses=RESPONSES | errors(400, 404, 413, 422, 429, 503),
             summary="Generate images from a base model, optionally patched")
async def generate(body: GenerateRequest, request: Request, engine: EngineDep,
                   accept: str | None = Header(None, description="image/png + num_images=1: the raw PNG; "
                                                                  "text/event-stream: progress events")):
    started = time.perf_counter()
    engine.check_admitting()  # also before the cache: a draining server answers nothing new
    spec = engine.resolve(**body.model_dump(exclude={"previews"}))
    if wants_events(accept):
        cached = await _from_cache(engine, spec, body.seed is not None)
        followed = None if cached[0] is not None else await Followed(engine, spec, body.previews).admit()
        return sse_response(_events(engine, spec, body.seed is not None, cached, followed, started))
    raw = _wants_raw_png(accept, spec.num_images)
    if raw:
        spec = replace(spec, output_format="png")
    files, version, timings, cached = await _from_cache(engine, spec, body.seed is not None)
    if files is None:
        files, version, timings = await _run(engine, spec, request)
        await _remember(engine, spec, body.seed is not None, files, version)
    _observe(engine, spec, timings, time.perf_counter() - started)
    if raw:
        headers = {"X-Seed": str(spec.seed), "X-Model": spec.model,
                   "Server-Timing": ", ".join(f"{k[:-3]};dur={v:.1f}" for k, v in timings.items())}
        if spec.patch:
            headers |= {"X-Patch": spec.patch, "X-Patch-Version": version}
        return Response(files[0], media_type=media_type("png"), headers=headers)
    return _reply(spec, files, version, timings, cached)


def _reply(spec: Spec, files: list[bytes], version: str | None, timings: dict, cached: bool) -> GenerateResponse:
    patch = {"name": spec.patch, "version": version} if spec.patch else None
    return GenerateResponse(images=[base64.b64encode(f).decode() for f in files], seed=spec.seed, model=spec.model,
                            patch=patch, output_format=spec.output_format, cached=cached, timings=timings)


async def _events(engine: Engine, spec: Spec, deterministic: bool, cached, followed: Followed | None,
                  started: float):
    """SSE: `queued` {position}, `progress` {step, of[, preview]} per step, then `done` (the JSON body) or `error`."""
    files, version, timings, hit = cached
    try:
        if followed is not None:
            async for kind, data in followed.events():
                if kind == "queued":
                    yield sse("queued", {"position": data})
                elif kind == "progress":
                    step, of, preview = data
                    event = {"step": step, "of": of}
                    if preview is not None:
                        event["preview"] = [base64.b64encode(f).decode() for f in preview]
                    yield sse("progress", event)
                else:
                    files, version, timings = await _encode(data, spec)
            await _remember(engine, spec, deterministic, files, version)
        _observe(engine, spec, timings, time.perf_counter() - started)
        yield sse("done", _reply(spec, files, version, timings, hit).model_dump())
    except ServiceError as e:  # the status line is out already: the error travels as an event
        yield sse("error", {"error": e.message, "error_type": e.error_type})
    except Exception:
        log.exception("streamed generation failed")
        yield sse("error", {"error": "internal server error", "error_type": "internal"})


async def _remember(engine: Engine, spec: Spec, deterministic: bool, files: list[bytes], version) -> None:
    if engine.cache is not None and deterministic:
        await run_in_threadpool(engine.cache.put, engine.cache.key(spec, engine.bases[spec.model].fingerprint,
                                                                   version), files)


async def _from_cache(engine: Engine, spec: Spec, deterministic: bool):
    """(files, version, timings, True) on a hit; (None, ...) otherwise (cache off, no seed, or a miss)."""
    if engine.cache is None or not deterministic:
        return None, None, None, False
    version = engine.registry.get(spec.patch).version if spec.patch else None
    key = engine.cache.key(spec, engine.bases[spec.model].fingerprint, version)
    files = await run_in_threadpool(engine.cache.get, key)
    if files is None:
        return None, None, None, False
    return files, version, {"queue_ms": 0.0, "sample_ms": 0.0, "decode_ms": 0.0}, True


async def _run(engine: Engine, spec: Spec, request: Request):
    base = engine.bases[spec.model]
    y = await run_in_threadpool(engine.condition, base, spec)
    work = await run_in_threadpool(engine.submit, spec, y)  # pinning may read the patch back from the store
    return await _encode(await _wait(work, request, engine.settings.request_timeout), spec)


async def _encode(result: Result, spec: Spec):
    """(files, patch version, timings) with the encoding time added to decode_ms."""
    t0 = time.perf_counter()
    files = await run_in_threadpool(encode_images, result.images, spec.output_format)
    timings = dict(result.timings)
    timings["decode_ms"] += 1000 * (time.perf_counter() - t0)
    return files, result.patch_version, timings


def _observe(engine: Engine, spec: Spec, timings: dict, total: float) -> None:
    m, labels = engine.metrics, (spec.model, spec.patch or "base")
    m.queue_seconds.labels(*labels).observe(timings["queue_ms"] / 1000)
    m.sample_seconds.labels(*labels).observe(timings["sample_ms"] / 1000)
    m.decode_seconds.labels(*labels).observe(timings["decode_ms"] / 1000)
    m.total_seconds.labels(*labels).observe(total)
    m.images.labels(*labels).inc(spec.num_images)
