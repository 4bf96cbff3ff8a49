"""One replica's side of a work queue (in-process, or a Redis Stream's consumer group): batch lines and webhook
events are both taken this way, up to a limit at once, each handled in its own task."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from functools import partial

from anyio import to_thread

from app.batch.embedded import MemoryQueue
from app.batch.shared import StreamQueue

TAKE_WAIT = 0.5  # seconds one take blocks for new items (XREADGROUP BLOCK) before the loop looks around again
# (queue token, item) -> a coroutine that handles the item and acknowledges it when done
Handle = Callable[[str, dict], Coroutine[object, object, None]]


class Consumer:
    """Takes items (a silent replica's first: XAUTOCLAIM, then new ones) while fewer than `limit` run, and keeps the
    running ones claimed (their idle time restarts every third of `idle`, so no other replica takes them)."""

    def __init__(self, queue: MemoryQueue | StreamQueue, limit: int, idle: float, handle: Handle):
        self.queue, self.limit, self.handle = queue, limit, handle
        self.running: dict[str, asyncio.Task] = {}  # queue token -> the task handling that item
        self.keep_every = idle / 3
        self._kept = self._reclaimed = time.monotonic()

    async def turn(self) -> None:
        """Start what there is room for (or wait for a running item to end), then refresh the claims when due;
        waits at most about TAKE_WAIT. Queue errors (Redis) propagate: the caller retries."""
        free = self.limit - len(self.running)
        if free <= 0:
            await asyncio.wait(list(self.running.values()), timeout=TAKE_WAIT, return_when=asyncio.FIRST_COMPLETED)
        else:
            items: list[tuple[str, dict]] = []
            if time.monotonic() - self._reclaimed > self.keep_every:  # a silent replica's items are the oldest
                items = await to_thread.run_sync(self.queue.reclaim, free)
                self._reclaimed = time.monotonic()
            if len(items) < free:
                items += await to_thread.run_sync(self.queue.take, free - len(items), TAKE_WAIT)
            for token, item in items:
                if token in self.running:  # reclaimed from itself while it still runs (a very slow item)
                    continue
                task = asyncio.get_running_loop().create_task(self.handle(token, item))
                self.running[token] = task
                task.add_done_callback(partial(self._ended, token))
        if time.monotonic() - self._kept > self.keep_every:
            await to_thread.run_sync(self.queue.keep, list(self.running))
            self._kept = time.monotonic()

    def _ended(self, token: str, _task: asyncio.Task) -> None:
        self.running.pop(token, None)

    def cancel(self) -> None:
        """Stop every running item (an unacknowledged one stays in the Stream for another replica)."""
        for task in list(self.running.values()):
            task.cancel()
