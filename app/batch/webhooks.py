"""Signed batch events (Standard Webhooks, as OpenAI sends them and `client.webhooks.unwrap` verifies them), each
delivered at least once while this process lives: retried with exponential backoff until a 2xx answer."""
from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime

from standardwebhooks import Webhook

from app.batch.records import now
from app.core.config import Settings
from app.core.metrics import Metrics

log = logging.getLogger("dmp.batch")


class WebhookSender:
    """Posts events to DMP_WEBHOOK_URL, signed with DMP_WEBHOOK_SECRET; every attempt goes to the delivery log."""

    def __init__(self, settings: Settings, metrics: Metrics, log_delivery):
        assert settings.webhook_url and settings.webhook_secret, "made only when webhooks are configured"
        self.url, self.attempts = settings.webhook_url, settings.webhook_attempts
        self.timeout = settings.webhook_timeout
        self.signer = Webhook(settings.webhook_secret.get_secret_value())
        self.metrics, self.log_delivery = metrics, log_delivery
        self.backoff = 1.0  # seconds before the 2nd attempt; doubles each time
        self._tasks: set[asyncio.Task] = set()

    def send(self, batch_id: str, event: dict) -> None:
        """Deliver in the background (the caller, a finishing batch, does not wait for the receiver)."""
        task = asyncio.get_running_loop().create_task(self._deliver(batch_id, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def headers(self, event: dict, body: bytes) -> dict[str, str]:
        """webhook-id (the event id: the same on every retry, so receivers drop repeats), -timestamp, -signature."""
        at = datetime.now(UTC)
        return {"content-type": "application/json", "webhook-id": event["id"],
                "webhook-timestamp": str(int(at.timestamp())),
                "webhook-signature": self.signer.sign(event["id"], at, body.decode())}

    async def _deliver(self, batch_id: str, event: dict) -> None:
        import httpx  # here, not at the top: importing httpx loads its CLI's rich, not needed without webhooks

        body = json.dumps(event, separators=(",", ":")).encode()
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
            for attempt in range(1, self.attempts + 1):
                entry = {"event_id": event["id"], "type": event["type"], "attempt": attempt, "at": now(),
                         "url": self.url}
                try:
                    # signed afresh each attempt: receivers reject timestamps older than a few minutes
                    reply = await client.post(self.url, content=body, headers=self.headers(event, body))
                    entry["status_code"] = reply.status_code
                    ok = 200 <= reply.status_code < 300
                except httpx.HTTPError as e:
                    entry["error"], ok = f"{e.__class__.__name__}: {e}", False
                entry["outcome"] = "delivered" if ok else ("retry" if attempt < self.attempts else "failed")
                self.metrics.webhook_deliveries.labels(entry["outcome"]).inc()
                await asyncio.to_thread(self.log_delivery, batch_id, entry)
                if ok:
                    return
                if attempt < self.attempts:
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        log.warning("webhook %s for batch %s not delivered after %d attempts", event["type"], batch_id,
                    self.attempts)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
