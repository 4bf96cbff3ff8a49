"""The Batch API behind the routes: files, batches and their state machine, and this replica's line worker.

validating -> in_progress -> finalizing -> completed, or failed (bad input), cancelling -> cancelled, expired (the
24 h window closed first). Each line runs as the same request /v1/images/generations would run, at the batcher's
background priority, at most DMP_BATCH_INFLIGHT at once per replica; its answer is written once (the first wins),
and the replica that writes a batch's last answer finalizes it, queueing its webhook event with the final status
(every replica's sender delivers queued events: app/batch/webhooks.py)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial

import redis
from anyio import to_thread

from app.batch.consumer import TAKE_WAIT, Consumer
from app.batch.embedded import DiskStore, MemoryQueue
from app.batch.records import (
    ACTIVE,
    FINAL_EVENTS,
    InputError,
    Line,
    answer_line,
    batch_object,
    check_jsonl,
    event,
    expired_line,
    file_object,
    new_id,
    now,
    parse_lines,
    well_formed,
)
from app.batch.shared import SENDERS, WEBHOOKS, RedisStore, StreamQueue
from app.batch.webhooks import WebhookSender
from app.core.config import Settings
from app.core.errors import BadRequest, NotFound, PayloadTooLarge, ServiceError, Unavailable
from app.core.metrics import Metrics
from app.core.redis import redis_client

log = logging.getLogger("dmp.batch")
Answer = Callable[[dict, str], Awaitable[tuple[int, dict]]]  # a line's body, its owner -> (status, reply)


class Conflict(ServiceError):
    status, error_type = 409, "conflict"


class BatchService:
    """One per app: the store (disk or Redis), the line queue (in-process or a Redis Stream) and the worker."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.store: DiskStore | RedisStore | None = None
        self.queue: MemoryQueue | StreamQueue | None = None
        self.webhooks: WebhookSender | None = None
        self.lines: Consumer | None = None  # this replica's line worker, once the store is open
        self._tasks: list[asyncio.Task] = []  # the line worker's loop and the webhook sender's

    # ---------------------------------------------------------------- lifecycle

    def _open(self) -> None:
        s = self.settings
        consumer = f"{socket.gethostname()}-{os.getpid()}"
        outbox: MemoryQueue | StreamQueue
        if s.redis_url:
            client, blocking = redis_client(s), redis_client(s, wait=TAKE_WAIT)
            queue = StreamQueue(client, blocking, consumer, s.batch_reclaim_idle)
            outbox = StreamQueue(client, blocking, consumer, s.batch_reclaim_idle, WEBHOOKS, SENDERS)
            self.store, self.queue = RedisStore(client, s.batch_ttl), queue
        else:
            outbox = MemoryQueue()
            self.store, self.queue = DiskStore(s.batch_root, s.batch_ttl, outbox), MemoryQueue()
        if s.webhook_url:
            self.webhooks = WebhookSender(s, self.metrics, self.store, outbox, consumer)

    def start(self, engine, answer: Answer) -> None:
        """Start the worker (it takes lines once the engine is ready)."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._work(engine, answer)))

    async def stop(self) -> None:
        # an unanswered line stays in the Stream (or on disk), an undelivered event in the Stream, for another
        # replica or a restart
        for task in self._tasks:
            task.cancel()
        if self.lines is not None:
            self.lines.cancel()
        if self.webhooks is not None:
            self.webhooks.close()

    def _ready(self) -> tuple[DiskStore | RedisStore, MemoryQueue | StreamQueue]:
        if self.store is None or self.queue is None:
            raise Unavailable("the batch store is not open yet", error_type="not_ready")
        return self.store, self.queue

    # ---------------------------------------------------------------- files

    def upload(self, owner: str, filename: str, purpose: str, data: bytes) -> dict:
        store, _ = self._ready()
        if purpose != "batch":
            raise BadRequest(f"purpose {purpose!r} is not served: only 'batch' files", error_type="invalid_value")
        if len(data) > self.settings.batch_max_file_bytes:
            raise PayloadTooLarge(f"the file is over {self.settings.batch_max_file_bytes} bytes "
                                  "(DMP_BATCH_MAX_FILE_BYTES)")
        try:
            lines = check_jsonl(data)
        except InputError as e:
            raise BadRequest(e.message, error_type=e.code) from None
        if lines > self.settings.batch_max_lines:
            raise BadRequest(f"the file has {lines} requests; at most {self.settings.batch_max_lines} "
                             "(DMP_BATCH_MAX_LINES)", error_type="too_many_requests")
        file = file_object(new_id("file-"), len(data), filename[:256] or "batch.jsonl", purpose,
                           self.settings.batch_ttl)
        store.put_file(file, owner, data)
        return file

    def file(self, owner: str, file_id: str) -> dict:
        store, _ = self._ready()
        found = store.get_file(file_id) if well_formed("file-", file_id) else None
        if found is None or found[1] != owner:  # another key's file does not exist for this one
            raise NotFound(f"no file {file_id!r}", error_type="file_not_found")
        return found[0]

    def file_content(self, owner: str, file_id: str) -> bytes:
        self.file(owner, file_id)
        data = self._ready()[0].file_data(file_id)
        if data is None:
            raise NotFound(f"no file {file_id!r}", error_type="file_not_found")
        return data

    def files(self, owner: str) -> list[dict]:
        return self._ready()[0].files(owner)

    def delete_file(self, owner: str, file_id: str) -> None:
        self.file(owner, file_id)
        self._ready()[0].delete_file(file_id)

    # ---------------------------------------------------------------- batches

    async def create(self, owner: str, input_file_id: str, metadata: dict | None) -> dict:
        batch = await to_thread.run_sync(self._create, owner, input_file_id, metadata)
        self._count_finished(batch)
        return self.view(batch)

    def _create(self, owner: str, input_file_id: str, metadata: dict | None) -> dict:
        store, queue = self._ready()
        file = self.file(owner, input_file_id)
        if file["purpose"] != "batch":
            raise BadRequest(f"file {input_file_id!r} has purpose {file['purpose']!r}, not 'batch'",
                             error_type="invalid_value")
        batch = batch_object(new_id("batch_"), input_file_id, metadata)
        try:
            lines = parse_lines(store.file_data(input_file_id) or b"", self.settings.batch_max_lines)
        except InputError as e:
            store.put_batch(batch, owner)
            error = {"code": e.code, "message": e.message, "param": e.param, "line": e.line}
            failed = store.update_batch(batch["id"], ("validating",), {
                "status": "failed", "failed_at": now(), "errors": {"object": "list", "data": [error]}},
                self._event("failed", batch["id"]))
            assert failed is not None, "nothing else knows this batch yet"
            return failed
        batch["request_counts"]["total"] = len(lines)  # before any line is queued: the last answer compares with it
        store.put_batch(batch, owner)
        queue.push([line.item(batch["id"]) for line in lines])
        started = store.update_batch(batch["id"], ("validating",), {"status": "in_progress", "in_progress_at": now()})
        return started or store.get_batch(batch["id"])[0]  # type: ignore[index]  # a worker may have finished it

    def batch(self, owner: str, batch_id: str) -> dict:
        found = self._ready()[0].get_batch(batch_id) if well_formed("batch_", batch_id) else None
        if found is None or found[1] != owner:
            raise NotFound(f"no batch {batch_id!r}", error_type="batch_not_found")
        return self.view(found[0])

    def batches(self, owner: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """A page of the owner's batches, newest first, after the batch `after` (OpenAI's cursor)."""
        found = self._ready()[0].batches(owner)
        ids = [b["id"] for b in found]
        start = ids.index(after) + 1 if after in ids else 0
        page = found[start:start + limit]
        return [self.view(b) for b in page], start + limit < len(found)

    async def cancel(self, owner: str, batch_id: str) -> dict:
        await to_thread.run_sync(self._cancel, owner, batch_id)
        await self._finish_if_done(batch_id)  # every line may already be answered
        return await to_thread.run_sync(self.batch, owner, batch_id)

    def _cancel(self, owner: str, batch_id: str) -> None:
        self.batch(owner, batch_id)
        store, _ = self._ready()
        if store.update_batch(batch_id, ("validating", "in_progress"),
                              {"status": "cancelling", "cancelling_at": now()}) is None:
            status = self.batch(owner, batch_id)["status"]
            if status != "cancelling":
                raise Conflict(f"batch {batch_id!r} is {status}: only a running batch can be cancelled")

    def deliveries(self, owner: str, batch_id: str) -> list[dict]:
        self.batch(owner, batch_id)
        return self._ready()[0].deliveries(batch_id)

    def view(self, batch: dict) -> dict:
        """The batch as OpenAI shows it: request_counts live while it runs."""
        if batch["status"] in ACTIVE and self.store is not None:
            batch = batch | {"request_counts": _request_counts(batch, self.store.counts(batch["id"]))}
        return batch

    # ---------------------------------------------------------------- the worker

    async def _work(self, engine, answer: Answer) -> None:
        """Open the store; then take lines (new ones, and ones a silent replica left) while the engine is ready, up
        to DMP_BATCH_INFLIGHT, and deliver webhook events."""
        while self.store is None:
            try:
                await to_thread.run_sync(self._open)
                for batch_id in await to_thread.run_sync(self._requeue):
                    await self._finish_if_done(batch_id)
            except (redis.RedisError, OSError) as e:
                log.warning("batch store not available (%s); retrying", e)
                self.store = None
                await asyncio.sleep(1)
        store, queue = self._ready()
        if self.webhooks is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self.webhooks.run()))
        self.lines = lines = Consumer(queue, self.settings.batch_inflight, self.settings.batch_reclaim_idle,
                                      partial(self._line, engine, answer))
        swept = time.monotonic()
        while True:
            try:
                if engine.state != "ready":
                    await asyncio.sleep(0.2)
                else:
                    await lines.turn()
                if time.monotonic() - swept > 60:
                    await to_thread.run_sync(store.sweep)
                    swept = time.monotonic()
            except (redis.RedisError, OSError) as e:
                log.warning("batch worker: %s; retrying", e)
                await asyncio.sleep(1)

    async def _line(self, engine, answer: Answer, token: str, item: dict) -> None:
        """Answer one line once (unless a reclaimed line already has its answer), finalize, then acknowledge."""
        store, queue = self._ready()
        batch_id, index, custom_id = item["batch"], int(item["line"]), item["custom_id"]
        try:
            await engine.interactive_quiet()  # a line's Python would slow a running interactive request's steps
            found = await to_thread.run_sync(store.get_batch, batch_id)
            if found is not None and not await to_thread.run_sync(store.answered, batch_id, index):
                batch = found[0]
                if batch["status"] == "cancelling":
                    kind, record = "skipped", None
                elif now() > batch["expires_at"]:
                    kind, record = "expired", expired_line(custom_id)
                else:
                    status, body = await self._attempt(engine, answer, json.loads(item["body"]), found[1])
                    kind = "completed" if status == 200 else "failed"
                    record = answer_line(custom_id, status, body)
                if await to_thread.run_sync(store.answer, batch_id, index, kind, record) is not None:
                    self.metrics.batch_answered.labels(kind).inc()
            if found is not None:
                await self._finish_if_done(batch_id)
            await to_thread.run_sync(queue.ack, token)
        except asyncio.CancelledError:
            raise
        except Exception:
            # in the Stream it stays pending (a replica reclaims it after DMP_BATCH_RECLAIM_IDLE); in-process, it
            # goes back in the queue
            log.exception("batch %s line %d failed outside its request; it will be retried", batch_id, index)
            await asyncio.sleep(1)
            await to_thread.run_sync(queue.retry, token, item)

    async def _attempt(self, engine, answer: Answer, body: dict, owner: str) -> tuple[int, dict]:
        """The line's answer; a full queue or a passing unavailability is waited out (the line is not failed)."""
        while True:
            try:
                return await answer(body, owner)
            except ServiceError:
                if engine.state in ("draining", "stopped", "failed"):
                    raise
                await asyncio.sleep(self.settings.retry_after)

    async def _finish_if_done(self, batch_id: str) -> None:
        store, _ = self._ready()
        found = await to_thread.run_sync(store.get_batch, batch_id)
        if found is None or found[0]["status"] not in ACTIVE:
            return
        if sum((await to_thread.run_sync(store.counts, batch_id)).values()) < found[0]["request_counts"]["total"]:
            return
        self._count_finished(await to_thread.run_sync(self._finalize, batch_id))

    def _finalize(self, batch_id: str) -> dict | None:
        """Every line answered: write the output and error files (in line order) and end the batch."""
        store, _ = self._ready()
        store.update_batch(batch_id, ("validating", "in_progress"), {"status": "finalizing", "finalizing_at": now()})
        found = store.get_batch(batch_id)
        if found is None or found[0]["status"] not in ("finalizing", "cancelling"):
            return None
        batch, owner = found
        answers = store.answers(batch_id)
        counts = Counter(a["kind"] for a in answers.values())
        final = ("cancelled" if batch["status"] == "cancelling" else "expired" if counts["expired"] else "completed")
        ordered = [answers[i] for i in sorted(answers)]
        files = {}
        for name, kinds in (("output", ("completed",)), ("error", ("failed", "expired"))):
            records = [a["record"] for a in ordered if a["kind"] in kinds]
            if records:
                data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
                file = file_object(new_id("file-"), len(data), f"{batch_id}_{name}.jsonl", "batch_output",
                                   self.settings.batch_ttl)
                store.put_file(file, owner, data)
                files[f"{name}_file_id"] = file["id"]
        return store.update_batch(batch_id, ("finalizing", "cancelling"), files | {
            "status": final, f"{final}_at": now(), "request_counts": _request_counts(batch, counts)},
            self._event(final, batch_id))

    def _event(self, status: str, batch_id: str) -> dict | None:
        """The webhook event of a batch ending `status`, queued with that change (None without webhooks)."""
        return event(FINAL_EVENTS[status], batch_id) if self.webhooks is not None else None

    def _count_finished(self, batch: dict | None) -> None:
        """A batch this replica brought to a final state (its event is queued already): counted in /metrics."""
        if batch is not None and batch["status"] in FINAL_EVENTS:
            self.metrics.batches_finished.labels(batch["status"]).inc()

    def _requeue(self) -> list[str]:
        """In-process queue only: the lines a previous process left unanswered go back in the queue; the batches
        it left with every line answered but not finalized are returned (to be finalized now)."""
        store, queue = self._ready()
        answered = []
        for batch in store.unfinished():
            data = store.file_data(batch["input_file_id"]) or b""
            try:
                lines: list[Line] = parse_lines(data, self.settings.batch_max_lines)
            except InputError:
                continue
            todo = [line.item(batch["id"]) for line in lines if not store.answered(batch["id"], line.index)]
            queue.push(todo)
            if not todo:
                answered.append(batch["id"])
        return answered

    def refresh_gauges(self) -> None:
        """Lines queued and running (all replicas' when shared) and the oldest one's age, read at scrape time."""
        if self.queue is None:
            return
        try:
            queued, running, age = self.queue.stats()
        except redis.RedisError:
            return  # the scrape still answers; the gauges keep their last values
        self.metrics.batch_lines.labels("queued").set(queued)
        self.metrics.batch_lines.labels("running").set(running)
        self.metrics.batch_oldest_seconds.set(age)


def _request_counts(batch: dict, counts: Counter) -> dict:
    return {"total": batch["request_counts"]["total"], "completed": counts["completed"],
            "failed": counts["failed"] + counts["expired"]}
