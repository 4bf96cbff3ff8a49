"""Redis result cache: a deterministic request (same model, patch version, seed, parameters) answered once."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import asdict

import redis

from app.core.metrics import Metrics
from app.engine.work import Spec

log = logging.getLogger("dmp.cache")


class ResultCache:
    """Encoded images per request key, with a TTL; any Redis error is a miss, never a failed request."""

    def __init__(self, client: redis.Redis, ttl: int, metrics: Metrics):
        self.client, self.ttl, self.metrics = client, ttl, metrics

    @staticmethod
    def key(spec: Spec, fingerprint: str, patch_version: str | None) -> str:
        blob = json.dumps([asdict(spec), fingerprint, patch_version], sort_keys=True)
        return "dmp:result:" + hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> list[bytes] | None:
        try:
            raw = self.client.get(key)
        except redis.RedisError as e:
            log.debug("cache read failed: %s", e)
            self.metrics.cache.labels("error").inc()
            return None
        self.metrics.cache.labels("hit" if raw else "miss").inc()
        return [base64.b64decode(s) for s in json.loads(raw)] if raw else None

    def put(self, key: str, files: list[bytes]) -> None:
        try:
            self.client.set(key, json.dumps([base64.b64encode(f).decode() for f in files]), ex=self.ttl)
        except redis.RedisError as e:
            log.debug("cache write failed: %s", e)
            self.metrics.cache.labels("error").inc()
