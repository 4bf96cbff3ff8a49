"""API keys from `DMP_API_KEYS`: a file or a comma-separated list of entries, stored only as SHA-256 hashes.

An entry is `KEY`, `sha256:HEX`, `ID:KEY` or `ID:sha256:HEX`, where a named key's `ID` may carry its tenant and
scope: `ID@TENANT`, `ID+admin`, `ID@TENANT+admin` (neither `@` nor `+` was allowed in an id before, so every older
list reads the same). A key's tenant owns the patches its admin-scoped keys upload; without `@TENANT` a key is a
tenant of its own, named by its id. Ids and tenants (never keys) label metrics and rate-limit buckets, and /metrics
may be read by more than the operator (it is open while DMP_API_KEYS is unset): an unnamed key's id is therefore the
first 12 hex digits of an HMAC of its hash, which an observer cannot test guesses against (a plain hash prefix gave
a weak key away in 1,573 guesses). The HMAC key is `DMP_KEY_ID_SECRET`, else one derived from every entry's hash:
the same on every replica and across restarts (so Redis rate-limit buckets stay shared), and unknown to anyone who
does not hold every key of the list (a list of one weak key stays guessable: set the secret, or name the keys). In a
file, one entry per line; blank lines and `#` comments are skipped.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HASH_RE = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
# what stands before a named entry's first ':'; a plain ID_RE id is the older form
LABEL_RE = re.compile(r"^(?P<id>[A-Za-z0-9_.-]{1,64})(?:@(?P<tenant>[A-Za-z0-9_.-]{1,64}))?(?P<admin>\+admin)?$")


@dataclass(frozen=True)
class ApiKey:
    """What a key may do: its id, the tenant it acts for, and whether it may upload and delete that tenant's
    patches (the `admin` scope)."""

    id: str
    tenant: str
    admin: bool = False


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

    def __init__(self, entries: list[tuple[str, bytes]], unnamed: int = 0, grants: dict[str, ApiKey] | None = None):
        self.unnamed = unnamed  # entries whose id is an HMAC (parse)
        if not entries:
            raise ValueError("DMP_API_KEYS holds no keys")
        ids = [i for i, _ in entries]
        if len(set(ids)) != len(ids):
            raise ValueError("DMP_API_KEYS: two keys with the same id")
        self.entries = entries
        # key id -> its tenant and scope; a key not named here is its own tenant, without the admin scope
        self.keys = {i: (grants or {}).get(i) or ApiKey(i, i) for i in ids}
        self.tenants = frozenset(k.tenant for k in self.keys.values())
        self.has_admins = any(k.admin for k in self.keys.values())

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
        parsed = [_entry(item, n) for n, item in enumerate(items, 1)]
        secret = id_secret or derived_id_secret([digest for digest, _ in parsed])
        return cls([(grant.id if grant else unnamed_key_id(digest, secret), digest) for digest, grant in parsed],
                   unnamed=sum(grant is None for _, grant in parsed),
                   grants={grant.id: grant for _, grant in parsed if grant is not None})

    def identify(self, key: str) -> str | None:
        """The id of `key`, or None; compares against all hashes so timing says nothing about which matched."""
        digest, found = key_hash(key), None
        for key_id, stored in self.entries:
            if hmac.compare_digest(digest, stored):
                found = key_id
        return found


def _entry(item: str, number: int) -> tuple[bytes, ApiKey | None]:
    """(sha256 digest, its id, tenant and scope when named) of the `number`th entry; the messages never echo a
    key."""
    label, secret = item.split(":", 1) if ":" in item and not HASH_RE.match(item) else (None, item)
    grant = None
    if label is not None:
        m = LABEL_RE.match(label)
        if m is None:
            raise ValueError(f"DMP_API_KEYS: bad key id {label!r} (ID, ID@TENANT, ID+admin or ID@TENANT+admin; "
                             "each name letters, digits, _ . - ; at most 64)")
        grant = ApiKey(m["id"], m["tenant"] or m["id"], bool(m["admin"]))
    which = f"key {grant.id!r}" if grant else f"entry {number}"
    if m := HASH_RE.match(secret):
        digest = bytes.fromhex(m.group(1))
    elif not secret:
        raise ValueError(f"DMP_API_KEYS: {which} is empty")
    elif not (secret.isascii() and secret.isprintable()):
        # HTTP header values are ASCII: such a key could never be presented, so it would never authenticate
        raise ValueError(f"DMP_API_KEYS: {which} has characters outside printable ASCII; no client can send it")
    else:
        digest = key_hash(secret)
    return digest, grant
