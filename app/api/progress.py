"""A request's progress as asyncio events: runner-thread step reports -> queue -> (kind, data) pairs; SSE framing."""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.core.errors import DeadlineExceeded
from app.engine.engine import Engine
from app.engine.images import encode_images
from app.engine.work import Progress, Spec
from app.model.vae import to_uint8

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the events


def wants_events(accept: str | None) -> bool:
    return accept is not None and "text/event-stream" in accept.lower()


def sse(event: str | None, data: dict) -> str:
    """One Server-Sent Event (an `event:` line only when named)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


class Inbox:
    """Items handed over from the runner thread to the event loop with at most one pending wake-up: a step costs
    the runner a deque append, not a loop wake-up each, and a slow reader gets the items in one batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.ready, self.waking = loop, deque(), asyncio.Event(), False

    def put(self, item) -> None:  # runner thread
        self.items.append(item)
        if not self.waking:
            self.waking = True
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self.waking = False  # before the reader drains: anything appended later schedules its own wake-up
        self.ready.set()

    async def take(self, timeout: float) -> list:
        """Everything handed over so far (waits for at least one item)."""
        while not self.items:
            self.ready.clear()
            if not self.items:
                await asyncio.wait_for(self.ready.wait(), timeout)
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out


class Followed:
    """An admitted request whose steps are reported to this event loop (admission errors raise before any byte
    of the reply is sent)."""

    def __init__(self, engine: Engine, spec: Spec, previews: int, preview_format: str = "png"):
        self.engine, self.spec, self.previews, self.preview_format = engine, spec, previews, preview_format
        self.base = engine.bases[spec.model]
        self.inbox: Inbox | None = None  # the steps, then the finished future
        self.work = None

    async def admit(self) -> "Followed":
        self.inbox = Inbox(asyncio.get_running_loop())
        # admission, then encoding the condition and pinning (which may read the patch back from the store)
        self.work = await run_in_threadpool(self.engine.submit, self.spec, listener=self.inbox.put,
                                            previews=self.previews)
        # the runner reports a step before it answers the future, both on its thread: the result comes last
        self.work.future.add_done_callback(self.inbox.put)
        return self

    async def events(self):
        """("queued", ahead), ("progress", (step, of, preview files | None)), then ("result", Result).

        Every preview step (`previews`, evenly spaced; the decoded x0 prediction, one file per image) and the
        last step are reported; plain steps that piled up while the reader was busy are folded into the latest.
        Closing the generator early (the client left) cancels the work; so does passing DMP_REQUEST_TIMEOUT.
        """
        deadline = time.monotonic() + self.engine.settings.request_timeout
        try:
            yield "queued", self.work.ahead
            while True:
                try:
                    items = await self.inbox.take(timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise DeadlineExceeded("the request ran past DMP_REQUEST_TIMEOUT")
                steps = [p for p in items if isinstance(p, Progress)]
                for i, p in enumerate(steps):
                    if p.x0 is not None or i == len(steps) - 1:
                        yield "progress", await _encode_step(self.base, p, self.preview_format)
                if isinstance(items[-1], Future):
                    yield "result", items[-1].result()
                    return
        finally:
            if not self.work.future.done():
                self.work.cancel()


async def _encode_step(base, p: Progress, fmt: str) -> tuple[int, int, list[bytes] | None]:
    """(step, of, preview files or None); decoding and encoding run off the event loop and off the runner."""
    if p.x0 is None:
        return p.step, p.of, None
    files = await run_in_threadpool(lambda: encode_images(to_uint8(base.vae.decode(p.x0)), fmt))
    return p.step, p.of, files
