"""Redis result cache: a deterministic request (same model, patch version, seed, parameters) answered once."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from dataclasses import asdict

import redis

from app.core.metrics import Metrics
from app.engine.work import Spec

log = logging.getLogger("dmp.cache")


class ResultCache:
    """Encoded images per request key, with a TTL; any Redis error is a miss, never a failed request.

    Entries are `<hex HMAC-SHA256 of key + payload>:<JSON list of base64 files>`, keyed by DMP_CACHE_SECRET:
    anything else under `dmp:result:*` (garbage, or well-formed bytes that a replica with the secret did not write
    for this key) is a miss counted as `invalid`."""

    def __init__(self, client: redis.Redis, ttl: int, metrics: Metrics, secret: bytes):
        self.client, self.ttl, self.metrics, self.secret = client, ttl, metrics, secret

    def _mac(self, key: str, payload: bytes) -> bytes:
        return hmac.new(self.secret, key.encode() + b"\0" + payload, hashlib.sha256).hexdigest().encode()

    def _files(self, key: str, raw: bytes) -> list[bytes] | None:
        """The files of a signed entry, or None when it is not one."""
        mac, _, payload = raw.partition(b":")
        if not hmac.compare_digest(mac, self._mac(key, payload)):
            return None
        try:
            files = json.loads(payload)
            return [base64.b64decode(f, validate=True) for f in files] if isinstance(files, list) else None
        except (ValueError, TypeError, binascii.Error, RecursionError):
            return None

    @staticmethod
    def key(spec: Spec, fingerprint: str, patch_versions: tuple[str, ...] | None) -> str:
        fields = asdict(spec)
        del fields["seeded"]  # only seeded results are cached: the flag is not part of what was made
        blob = json.dumps([fields, fingerprint, patch_versions], sort_keys=True)  # fields: scales and seeds too
        return "dmp:result:" + hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> list[bytes] | None:
        try:
            raw = self.client.get(key)
        except redis.RedisError as e:
            log.debug("cache read failed: %s", e)
            self.metrics.cache.labels("error").inc()
            return None
        files = self._files(key, raw) if isinstance(raw, bytes) else None
        if raw and files is None:
            log.debug("cache entry %s is not one of ours: a miss", key)
        self.metrics.cache.labels("hit" if files else "invalid" if raw else "miss").inc()
        return files or None

    def put(self, key: str, files: list[bytes]) -> None:
        try:
            payload = json.dumps([base64.b64encode(f).decode() for f in files]).encode()
            self.client.set(key, self._mac(key, payload) + b":" + payload, ex=self.ttl)
        except redis.RedisError as e:
            log.debug("cache write failed: %s", e)
            self.metrics.cache.labels("error").inc()
