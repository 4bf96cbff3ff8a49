"""Running a resolved request for any route: result cache, admission, waiting (or following its steps), encoding,
stage metrics. /generate and /v1/images/generations differ only in how they frame the outcome."""
from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from app.api.progress import Followed
from app.core.errors import ClientGone, DeadlineExceeded
from app.engine.engine import Engine
from app.engine.images import encode_images
from app.engine.work import Result, Spec, Work


class Produced(NamedTuple):
    files: list[bytes]
    version: str | None  # the patch version that ran
    timings: dict[str, float]
    cached: bool


async def produce(engine: Engine, spec: Spec, deterministic: bool, request: Request, started: float) -> Produced:
    """The files for `spec`, from the cache or a fresh run (dropped if the client leaves)."""
    out = await _from_cache(engine, spec, deterministic)
    if out is None:
        # admission, then encoding the condition and pinning (which may read the patch back from the store)
        work = await run_in_threadpool(engine.submit, spec)
        out = await _encode(await _wait(work, request, engine.settings.request_timeout), spec)
        await _remember(engine, spec, deterministic, out)
    _observe(engine, spec, out, time.perf_counter() - started)
    return out


async def admit_followed(engine: Engine, spec: Spec, deterministic: bool, previews: int, preview_format: str):
    """(cached result, None) or (None, admitted Followed): admission errors raise before the stream starts."""
    out = await _from_cache(engine, spec, deterministic)
    if out is not None:
        return out, None
    return None, await Followed(engine, spec, previews, preview_format).admit()


async def produce_events(engine: Engine, spec: Spec, deterministic: bool, admitted, started: float):
    """("queued", ahead), ("progress", (step, of, preview files | None))..., then ("done", Produced)."""
    out, followed = admitted
    if followed is not None:
        async for kind, data in followed.events():
            if kind == "result":
                out = await _encode(data, spec)
            else:
                yield kind, data
        await _remember(engine, spec, deterministic, out)
    _observe(engine, spec, out, time.perf_counter() - started)
    yield "done", out


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
    raise DeadlineExceeded("the request ran past DMP_REQUEST_TIMEOUT")


async def _from_cache(engine: Engine, spec: Spec, deterministic: bool) -> Produced | None:
    """The cached files of a seeded request, or None (cache off, no seed, or a miss)."""
    if engine.cache is None or not deterministic:
        return None
    version = engine.registry.get(spec.patch).version if spec.patch else None
    key = engine.cache.key(spec, engine.bases[spec.model].fingerprint, version)
    files = await run_in_threadpool(engine.cache.get, key)
    if files is None:
        return None
    return Produced(files, version, {"queue_ms": 0.0, "sample_ms": 0.0, "decode_ms": 0.0}, True)


async def _remember(engine: Engine, spec: Spec, deterministic: bool, out: Produced) -> None:
    if engine.cache is not None and deterministic:
        key = engine.cache.key(spec, engine.bases[spec.model].fingerprint, out.version)
        await run_in_threadpool(engine.cache.put, key, out.files)


async def _encode(result: Result, spec: Spec) -> Produced:
    """Encoded files, with the encoding time added to decode_ms."""
    t0 = time.perf_counter()
    files = await run_in_threadpool(encode_images, result.images, spec.output_format)
    timings = dict(result.timings)
    timings["decode_ms"] += 1000 * (time.perf_counter() - t0)
    return Produced(files, result.patch_version, timings, False)


def _observe(engine: Engine, spec: Spec, out: Produced, total: float) -> None:
    """Stage latencies and images generated; a cache hit generated nothing and is counted on its own."""
    m, labels = engine.metrics, (spec.model, spec.patch or "base")
    if out.cached:
        m.images_cached.labels(*labels).inc(spec.num_images)
        return
    m.queue_seconds.labels(*labels).observe(out.timings["queue_ms"] / 1000)
    m.sample_seconds.labels(*labels).observe(out.timings["sample_ms"] / 1000)
    m.decode_seconds.labels(*labels).observe(out.timings["decode_ms"] / 1000)
    m.total_seconds.labels(*labels).observe(total)
    m.images.labels(*labels).inc(spec.num_images)
