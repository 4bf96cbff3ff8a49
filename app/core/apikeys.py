"""API keys from `DMP_API_KEYS`: a file or a comma-separated list of entries, stored only as SHA-256 hashes.

An entry is `KEY`, `sha256:HEX`, `ID:KEY` or `ID:sha256:HEX`; without an ID the key's id is the first 12 hex
digits of its hash. Ids (never keys) label metrics and rate-limit buckets. In a file, one entry per line;
blank lines and `#` comments are skipped.
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


class KeyRing:
    """Key id by presented key, checked against every stored hash in constant time."""

    def __init__(self, entries: list[tuple[str, bytes]]):
        if not entries:
            raise ValueError("DMP_API_KEYS holds no keys")
        ids = [i for i, _ in entries]
        if len(set(ids)) != len(ids):
            raise ValueError("DMP_API_KEYS: two keys with the same id")
        self.entries = entries

    @classmethod
    def parse(cls, value: str) -> "KeyRing":
        """From the setting: an existing file's lines, else a comma-separated list."""
        path = Path(value)
        if path.is_file():
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            items = [ln for ln in lines if ln and not ln.startswith("#")]
        elif "/" in value:
            raise ValueError(f"DMP_API_KEYS names no readable file: {value}")
        else:
            items = [x.strip() for x in value.split(",") if x.strip()]
        return cls([_entry(item) for item in items])

    def identify(self, key: str) -> str | None:
        """The id of `key`, or None; compares against all hashes so timing says nothing about which matched."""
        digest, found = key_hash(key), None
        for key_id, stored in self.entries:
            if hmac.compare_digest(digest, stored):
                found = key_id
        return found


def _entry(item: str) -> tuple[str, bytes]:
    """(id, sha256 digest) of one entry."""
    if m := HASH_RE.match(item):
        return m.group(1)[:12].lower(), bytes.fromhex(m.group(1))
    if ":" in item:
        key_id, secret = item.split(":", 1)
        if not ID_RE.match(key_id):
            raise ValueError(f"DMP_API_KEYS: bad key id {key_id!r} (letters, digits, _ . - ; at most 64)")
        if m := HASH_RE.match(secret):
            return key_id, bytes.fromhex(m.group(1))
        if not secret:
            raise ValueError(f"DMP_API_KEYS: key {key_id!r} is empty")
        return key_id, key_hash(secret)
    digest = key_hash(item)
    return digest.hex()[:12], digest
