"""API keys from `DMP_API_KEYS`: a file or a comma-separated list of entries, stored only as SHA-256 hashes.

An entry is `KEY`, `sha256:HEX`, `ID:KEY` or `ID:sha256:HEX`. Ids (never keys) label metrics and rate-limit
buckets, and /metrics is readable by whoever reaches it: an unnamed key's id is therefore the first 12 hex digits
of an HMAC of its hash, which an observer cannot test guesses against (a plain hash prefix gave a weak key away in
1,573 guesses). The HMAC key is `DMP_KEY_ID_SECRET`, else one derived from every entry's hash: the same on every
replica and across restarts (so Redis rate-limit buckets stay shared), and unknown to anyone who does not hold
every key of the list (a list of one weak key stays guessable: set the secret, or name the keys). In a file, one
entry per line; blank lines and `#` comments are skipped.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HASH_RE = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def unnamed_key_id(digest: bytes, id_secret: bytes) -> str:
    """The id of a key given without one: 48 bits of HMAC-SHA256(secret, its SHA-256)."""
    return hmac.new(id_secret, digest, hashlib.sha256).hexdigest()[:12]


def derived_id_secret(digests: list[bytes]) -> bytes:
    """The id secret when DMP_KEY_ID_SECRET is unset: a hash of every entry's hash, in a fixed order."""
    return hashlib.sha256(b"dmp-api-key-ids\0" + b"".join(sorted(digests))).digest()


class KeyRing:
    """Key id by presented key, checked against every stored hash in constant time."""

    def __init__(self, entries: list[tuple[str, bytes]], unnamed: int = 0):
        self.unnamed = unnamed  # entries whose id is an HMAC (parse)
        if not entries:
            raise ValueError("DMP_API_KEYS holds no keys")
        ids = [i for i, _ in entries]
        if len(set(ids)) != len(ids):
            raise ValueError("DMP_API_KEYS: two keys with the same id")
        self.entries = entries

    @classmethod
    def parse(cls, value: str, id_secret: bytes | None = None) -> KeyRing:
        """From the setting: an existing file's lines, else a comma-separated list; `id_secret` names unnamed keys
        (None: derived from the list)."""
        path = Path(value)
        if path.is_file():
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            items = [ln for ln in lines if ln and not ln.startswith("#")]
        elif "/" in value:
            raise ValueError(f"DMP_API_KEYS names no readable file: {value}")
        else:
            items = [x.strip() for x in value.split(",") if x.strip()]
        entries = [_entry(item, n) for n, item in enumerate(items, 1)]
        secret = id_secret or derived_id_secret([digest for _, digest in entries])
        return cls([(key_id or unnamed_key_id(digest, secret), digest) for key_id, digest in entries],
                   unnamed=sum(key_id is None for key_id, _ in entries))


    def identify(self, key: str) -> str | None:
        """The id of `key`, or None; compares against all hashes so timing says nothing about which matched."""
        digest, found = key_hash(key), None
        for key_id, stored in self.entries:
            if hmac.compare_digest(digest, stored):
                found = key_id
        return found


def _entry(item: str, number: int) -> tuple[str | None, bytes]:
    """(id or None when unnamed, sha256 digest) of the `number`th entry; the messages never echo a key."""
    key_id, secret = item.split(":", 1) if ":" in item and not HASH_RE.match(item) else (None, item)
    if key_id is not None and not ID_RE.match(key_id):
        raise ValueError(f"DMP_API_KEYS: bad key id {key_id!r} (letters, digits, _ . - ; at most 64)")
    which = f"key {key_id!r}" if key_id else f"entry {number}"
    if m := HASH_RE.match(secret):
        digest = bytes.fromhex(m.group(1))
    elif not secret:
        raise ValueError(f"DMP_API_KEYS: {which} is empty")
    elif not (secret.isascii() and secret.isprintable()):
        # HTTP header values are ASCII: such a key could never be presented, so it would never authenticate
        raise ValueError(f"DMP_API_KEYS: {which} has characters outside printable ASCII; no client can send it")
    else:
        digest = key_hash(secret)
    return key_id, digest
