"""What the engine runs: a resolved request, its in-flight state, and the typed stream of its events.

The runner thread reports into a Work (`report`, then its future); `Work.events()` hands those to one asyncio
reader as Queued, Step... and Done. Every route consumes that one stream: the plain routes drain it, the SSE
routes frame each event."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from anyio import to_thread

from app.core.errors import DeadlineExceeded
from app.engine.images import encode_images
from app.engine.slots import Pins
from app.model.sampling import Job


def past_deadline() -> DeadlineExceeded:
    return DeadlineExceeded("the request ran past DMP_REQUEST_TIMEOUT")


@dataclass(frozen=True)
class Spec:
    """A fully resolved request: every default filled in, so it also keys the result cache."""

    model: str
    patch: str | None
    class_label: int | None
    caption: str | None
    num_images: int
    steps: int
    sampler: str
    guidance_scale: float
    seed: int
    output_format: str
    seeded: bool = True  # the client chose the seed: the result is reproducible, so it may be cached
    patches: tuple[tuple[str, float], ...] = ()  # (name, scale) of every patch the rows add; () = the base
    seeds: tuple[int, ...] = ()  # image i's seed (seed + i, or the client's list); () = one generator (seed)
    negative_class_label: int | None = None  # CFG's unconditional half takes this class instead of the null one


@dataclass(frozen=True)
class Queued:
    position: int  # requests of the same base waiting before this one when it was admitted


@dataclass(frozen=True)
class Step:
    step: int  # steps done
    of: int
    preview: list[bytes] | None = None  # the predicted clean images, encoded, at a preview step


@dataclass(frozen=True)
class Done:
    files: list[bytes]  # encoded in the spec's output_format
    versions: tuple[str, ...] | None  # the version of each of the spec's patches that ran; None for the base
    timings: dict[str, float]
    cached: bool = False


Event = Queued | Step | Done


@dataclass
class Result:
    """What the runner answers: decoded images (n, H, W, C) uint8 and where the time went."""

    images: torch.Tensor
    patch_versions: tuple[str, ...] | None
    timings: dict[str, float]


@dataclass(frozen=True)
class Progress:
    """One step done, as the runner reports it: the decoded x0 prediction (n, H, W, C) uint8 at a preview step."""

    step: int
    of: int
    images: torch.Tensor | None


class Inbox:
    """Items handed over from the runner thread to one event loop with at most one pending wake-up: a step costs
    the runner a deque append, not a loop wake-up each, and a slow reader gets the items in one batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.ready, self.waking = loop, asyncio.Event(), False
        self.items: deque[Progress | Future] = deque()  # step reports, then the work's finished future

    def put(self, item) -> None:  # runner thread
        self.items.append(item)
        if not self.waking:
            self.waking = True
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the reader's loop has closed (a test's asyncio.run ended): nobody left to wake
                pass

    def _wake(self) -> None:
        self.waking = False  # before the reader drains: anything appended later schedules its own wake-up
        self.ready.set()

    async def take(self, deadline: float) -> list[Progress | Future]:
        """Everything handed over so far (waits for at least one item until the monotonic `deadline`)."""
        while not self.items:
            self.ready.clear()
            if not self.items:
                try:
                    await asyncio.wait_for(self.ready.wait(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise past_deadline() from None
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out


@dataclass(eq=False)
class Work:
    """One admitted request: its sampling job, pinned patch version, deadline, reply future and event inbox; or a
    cache hit (`ready`), whose stream is its Done alone."""

    spec: Spec
    job: Job | None = None
    pin: Pins | None = None  # the versions of its patches, pinned for its life
    deadline: float = 0.0
    inbox: Inbox | None = None
    follow: bool = False  # the runner reports every step (streaming routes)
    preview_at: frozenset[int] = frozenset()  # steps after which the report carries the decoded x0 prediction
    preview_format: str = "png"
    ready: Done | None = None
    on_done: Callable[[Done], None] | None = None  # the engine's bookkeeping (cache, metrics); blocking, off the loop
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    admitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    ahead: int = 0
    seated: bool = False  # its pin holds a device slot (set by the runner when it joins the batch)
    background: bool = False  # batch work: only the rows interactive requests leave, its own admission bound
    replayed: tuple[float, float] | None = None  # (monotonic at admission, seconds its replay gave it to finish)

    @property
    def running_job(self) -> Job:
        """The sampling job, which every work the runner holds has (a cache hit never reaches the runner)."""
        assert self.job is not None, "a queued work has a job"
        return self.job

    @property
    def images(self) -> int:
        return self.spec.num_images

    @property
    def steps(self) -> int:
        return len(self.job.t_list) if self.job is not None else self.spec.steps

    @property
    def steps_done(self) -> int:
        return self.job.index if self.job is not None else 0

    def cancel(self) -> None:
        """The client went away (or gave up): the runner drops this work at the next step boundary."""
        self.cancelled.set()

    def report(self, progress: Progress) -> None:
        """Runner thread: a step of a followed request is done."""
        assert self.inbox is not None, "a followed work has an inbox"
        self.inbox.put(progress)

    async def events(self) -> AsyncIterator[Event]:
        """Queued, then (followed requests) a Step per step, then Done; the request's error raises instead.

        Every preview step and the last step are reported; plain steps that piled up while the reader was busy are
        folded into the latest. Leaving early (the client left) or passing the deadline cancels the work."""
        if self.ready is not None:
            yield self.ready
            return
        assert self.inbox is not None, "a work that is not a cache hit has an inbox"
        try:
            yield Queued(self.ahead)
            while True:
                items = await self.inbox.take(self.deadline)
                steps = [p for p in items if isinstance(p, Progress)]
                for i, p in enumerate(steps):
                    if p.images is not None:
                        yield Step(p.step, p.of, await to_thread.run_sync(encode_images, p.images,
                                                                          self.preview_format))
                    elif i == len(steps) - 1:
                        yield Step(p.step, p.of)
                if isinstance(items[-1], Future):
                    yield await to_thread.run_sync(self._done, items[-1].result())
                    return
        finally:
            if not self.future.done():
                self.cancel()

    async def outcome(self) -> Done:
        """The stream drained: what the plain routes answer with."""
        async for event in self.events():
            if isinstance(event, Done):
                return event
        raise AssertionError("a stream ends with Done or raises")  # unreachable

    def _done(self, result: Result) -> Done:
        """The result encoded (the encoding time added to decode_ms), then the engine's bookkeeping."""
        t0 = time.perf_counter()
        files = encode_images(result.images, self.spec.output_format)
        timings = dict(result.timings)
        timings["decode_ms"] += 1000 * (time.perf_counter() - t0)
        done = Done(files, result.patch_versions, timings)
        if self.on_done is not None:
            self.on_done(done)
        return done


def preview_steps(steps: int, count: int) -> frozenset[int]:
    """`count` steps spread evenly over a run, before the last one (fewer when the run is short)."""
    return frozenset(round(steps * i / (count + 1)) for i in range(1, count + 1)) - {0, steps}
