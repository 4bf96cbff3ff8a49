"""Signed batch events (Standard Webhooks, as OpenAI sends them and `client.webhooks.unwrap` verifies them),
delivered at least once: an event is queued with the status change that ends its batch (with Redis: in the same
transaction, into a Stream every replica's sender reads as one consumer group) and acknowledged only after a 2xx
answer or its last attempt, so when the replica sending it dies, another one reclaims it and goes on."""
from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime

import redis
from anyio import to_thread
from standardwebhooks import Webhook

from app.batch.consumer import Consumer
from app.batch.embedded import DiskStore, MemoryQueue
from app.batch.records import now
from app.batch.shared import RedisStore, StreamQueue
from app.core.config import Settings
from app.core.metrics import Metrics

log = logging.getLogger("dmp.batch")
SENDING = 8  # events one replica delivers at once


class WebhookSender:
    """Posts queued events to DMP_WEBHOOK_URL, signed with DMP_WEBHOOK_SECRET; every attempt goes to the delivery
    log, named by the replica that made it (`sender`), and the attempts are counted across replicas."""

    def __init__(self, settings: Settings, metrics: Metrics, store: DiskStore | RedisStore,
                 outbox: MemoryQueue | StreamQueue, sender: str):
        assert settings.webhook_url and settings.webhook_secret, "made only when webhooks are configured"
        self.url, self.attempts = settings.webhook_url, settings.webhook_attempts
        self.timeout = settings.webhook_timeout
        self.signer = Webhook(settings.webhook_secret.get_secret_value())
        self.metrics, self.store, self.outbox, self.sender = metrics, store, outbox, sender
        self.backoff = 1.0  # seconds before the 2nd attempt; doubles each time
        self.consumer = Consumer(outbox, SENDING, settings.batch_reclaim_idle, self._deliver)

    async def run(self) -> None:
        """Take events (new ones, and ones a dead replica was sending) and deliver them, until cancelled."""
        while True:
            try:
                await self.consumer.turn()
            except (redis.RedisError, OSError) as e:
                log.warning("webhook sender: %s; retrying", e)
                await asyncio.sleep(1)

    def headers(self, event: dict, body: bytes) -> dict[str, str]:
        """webhook-id (the event id: the same on every retry, so receivers drop repeats), -timestamp, -signature."""
        at = datetime.now(UTC)
        return {"content-type": "application/json", "webhook-id": event["id"],
                "webhook-timestamp": str(int(at.timestamp())),
                "webhook-signature": self.signer.sign(event["id"], at, body.decode())}

    async def _deliver(self, token: str, item: dict) -> None:
        """The attempts left of one event (a reclaimed one goes on from the count in the log), then acknowledge."""
        import httpx  # here, not at the top: importing httpx loads its CLI's rich, not needed without webhooks

        batch_id, body = item["batch"], item["event"].encode()
        event = json.loads(body)
        try:
            made = sum(d["event_id"] == event["id"] for d in await to_thread.run_sync(self.store.deliveries, batch_id))
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
                for attempt in range(made + 1, self.attempts + 1):
                    if attempt > 1:
                        await asyncio.sleep(self.backoff * 2 ** (attempt - 2))
                    if await self._attempt(client, batch_id, event, body, attempt):
                        break
                else:
                    log.warning("webhook %s for batch %s not delivered after %d attempts", event["type"], batch_id,
                                self.attempts)
            await to_thread.run_sync(self.outbox.ack, token)
        except asyncio.CancelledError:
            raise
        except Exception:  # the store failed: the event stays queued (pending in the Stream) and is sent again
            log.exception("webhook %s for batch %s: delivery interrupted; it will be retried", event["type"],
                          batch_id)
            await asyncio.sleep(1)
            await to_thread.run_sync(self.outbox.retry, token, item)

    async def _attempt(self, client, batch_id: str, event: dict, body: bytes, attempt: int) -> bool:
        """One signed POST (signed afresh: receivers reject old timestamps), logged; True on a 2xx answer."""
        import httpx

        entry = {"event_id": event["id"], "type": event["type"], "attempt": attempt, "at": now(), "url": self.url,
                 "sender": self.sender}
        try:
            reply = await client.post(self.url, content=body, headers=self.headers(event, body))
            entry["status_code"] = reply.status_code
            ok = 200 <= reply.status_code < 300
        except httpx.HTTPError as e:
            entry["error"], ok = f"{e.__class__.__name__}: {e}", False
        entry["outcome"] = "delivered" if ok else ("retry" if attempt < self.attempts else "failed")
        self.metrics.webhook_deliveries.labels(entry["outcome"]).inc()
        await to_thread.run_sync(self.store.log_delivery, batch_id, entry)
        return ok

    def close(self) -> None:
        self.consumer.cancel()
