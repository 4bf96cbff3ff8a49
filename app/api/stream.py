"""The HTTP side of a request's stream (app.engine.work.Work.events): drained for a plain reply, or framed as SSE."""
from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from app.core.errors import ClientGone
from app.engine.work import Done, Work

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the events


def wants_events(accept: str | None) -> bool:
    return accept is not None and "text/event-stream" in accept.lower()


def sse(event: str | None, data: dict) -> str:
    """One Server-Sent Event (an `event:` line only when named)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def outcome(work: Work, request: Request) -> Done:
    """The drained stream's Done; if the client leaves first, the stream is closed (which drops the work)."""
    result = asyncio.ensure_future(work.outcome())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result.done():
        return result.result()
    result.cancel()
    raise ClientGone("the client closed the connection")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def b64(data: bytes) -> str:
    """An encoded image as JSON carries it (both /generate and /v1)."""
    return base64.b64encode(data).decode()
