"""Where patch bytes live: a directory (embedded default, atomic writes) or Redis (shared by replicas)."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import redis

from app.registry.records import NAME_RE

CHANNEL = "dmp:patch-events"
VERSIONS = "dmp:patch-versions"  # hash name -> version
GENERATIONS = "dmp:patch-generations"  # hash name -> generation (microseconds; only moves forward)
SIGNATURES = "dmp:patch-signatures"  # hash name -> the signature bundle (JSON) stored with the record
OWNERS = "dmp:patch-owners"  # hash name -> the tenant (of DMP_API_KEYS) a patch belongs to; absent = shared
OWNER_SUFFIX = ".owner"  # NAME.safetensors.owner beside a patch file: its tenant
SEEDED = "dmp:seeded"
SEEDED_FILE = ".seeded.json"  # in a user patch directory: the shipped names already copied in
SIGNATURE_SUFFIX = ".sig"  # NAME.safetensors.sig beside a patch file

# Every write is a compare-and-set on the name's generation, atomic in Redis (a script runs alone). KEYS: bytes,
# versions, generations, signatures, tombstone, owners. A client's write (ARGV[4] = '0') always lands, one generation
# past anything stored or deleted; a refill from a replica's memory (ARGV[4] = '1') lands only when newer than both, so
# it never undoes a write made after Redis lost its data. Stored values are untrusted: a read that fails or is not
# a number counts as generation 0.
_GENERATION_OF = """
local function number(reply)
  if type(reply) ~= 'string' then return 0 end
  return tonumber(reply) or 0
end
local stored = number(redis.pcall('HGET', KEYS[3], ARGV[1]))
local deleted = number(redis.pcall('GET', KEYS[5]))
local gen = tonumber(ARGV[2])
if ARGV[4] == '1' then
  if gen <= stored or gen <= deleted then return 0 end
else
  gen = math.max(gen, stored + 1, deleted + 1)
end
"""
# ARGV[11] = '1': a tenant's write (its tenant in ARGV[10]), refused when the name exists and is not that tenant's:
# checked here as well as in the replica's memory, where another replica's write may not have arrived yet
_PUT = _GENERATION_OF + """
if ARGV[11] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  local owner = redis.pcall('HGET', KEYS[6], ARGV[1])
  if type(owner) ~= 'string' then owner = '' end
  if owner ~= ARGV[10] then return 'owner:' .. owner end
end
redis.call('SET', KEYS[1], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[6])
redis.call('HSET', KEYS[3], ARGV[1], string.format('%d', gen))
if ARGV[7] == '' then redis.call('HDEL', KEYS[4], ARGV[1]) else redis.call('HSET', KEYS[4], ARGV[1], ARGV[7]) end
if ARGV[10] == '' then redis.call('HDEL', KEYS[6], ARGV[1]) else redis.call('HSET', KEYS[6], ARGV[1], ARGV[10]) end
redis.call('DEL', KEYS[5])
redis.call('PUBLISH', ARGV[8], ARGV[9])
return string.format('%d', gen)
"""
_DELETE = _GENERATION_OF + """
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('SET', KEYS[5], string.format('%d', gen), 'EX', ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return string.format('%d', gen)
"""


class OwnedElsewhere(Exception):
    """A tenant's write refused by the store: the name is stored as another tenant's, or shared (owner None)."""

    def __init__(self, owner: str | None):
        super().__init__(owner)
        self.owner = owner


@dataclass
class Stored:
    """One name's record as read from a store: the file, its generation, its signature bundle and its tenant."""

    data: bytes
    generation: int = 0
    signature: bytes | None = None
    owner: str | None = None


class DiskStore:
    """Patches as `<dir>/<name>.safetensors`."""

    shared = False

    def __init__(self, root: Path):
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.safetensors") if NAME_RE.match(p.stem))

    def path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def load(self, name: str) -> bytes | None:
        try:
            return self.path(name).read_bytes()
        except FileNotFoundError:
            return None

    def load_record(self, name: str) -> Stored | None:
        """The file, the signature and owner beside it (generation 0: one process owns a directory)."""
        try:
            data = self.path(name).read_bytes()
        except FileNotFoundError:
            return None
        signature, owner = (self._read(path) for path in (self.signature_path(name), self.owner_path(name)))
        return Stored(data, 0, signature, owner.decode(errors="replace").strip() or None if owner else None)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def signature_path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors{SIGNATURE_SUFFIX}"

    def owner_path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors{OWNER_SUFFIX}"

    def save(self, name: str, data: bytes, version: str, generation: int = 0, signature: bytes | None = None,
             refill: bool = False, owner: str | None = None, tenant_write: bool = False) -> int:
        """Write the signature and owner (or remove stale ones), then the patch; returns the generation (0: one
        process owns the directory, nothing to order; so the registry's own owner check under its lock suffices
        for `tenant_write`)."""
        for path, value in ((self.signature_path(name), signature), (self.owner_path(name), owner)):
            if value is None:
                path.unlink(missing_ok=True)
            else:
                self._write(path, value.encode() if isinstance(value, str) else value)
        self._write(self.path(name), data)
        return generation

    def _write(self, path: Path, data: bytes) -> None:
        """Temp file in the same directory, fsync, rename: readers see the old or the new file, never half. The
        file takes the directory's read/write bits (mkstemp's 0600 would hide it from the shipped files' readers)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-", suffix=".tmp")
        try:
            os.fchmod(fd, self.root.stat().st_mode & 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, name: str, generation: int = 0, refill: bool = False) -> int:
        self.path(name).unlink(missing_ok=True)
        self.signature_path(name).unlink(missing_ok=True)
        self.owner_path(name).unlink(missing_ok=True)
        return generation

    def ping(self) -> None:
        return None

    def seed_from(self, shipped: Path) -> list[str]:
        """Copy each shipped patch (with its signature and owner) in once per name, so a later delete sticks and a
        name added to the shipped set arrives; returns the names copied."""
        marker = self.root / SEEDED_FILE
        try:
            seen = set(json.loads(marker.read_text()))
        except FileNotFoundError:
            seen = set()
        source = DiskStore(shipped)
        if source.root.resolve() == self.root.resolve():
            return []
        copied = []
        for name in source.names():
            if name in seen:
                continue
            stored = source.load_record(name)
            if stored is not None and not self.path(name).exists():  # never overwrite an upload of the same name
                self.save(name, stored.data, "", signature=stored.signature, owner=stored.owner)
                copied.append(name)
            seen.add(name)
        if copied or not marker.exists():
            self._write(marker, json.dumps(sorted(seen)).encode())
        return copied


class RedisStore:
    """Patch bytes under `dmp:patch:<name>`, versions in one hash, changes announced on a pub/sub channel."""

    shared = True

    def __init__(self, client: redis.Redis, origin: str, tombstone_seconds: int):
        self.client, self.origin, self.tombstone_seconds = client, origin, tombstone_seconds
        self._put, self._delete = client.register_script(_PUT), client.register_script(_DELETE)

    @staticmethod
    def key(name: str) -> str:
        return f"dmp:patch:{name}"

    @staticmethod
    def tombstone(name: str) -> str:
        return f"dmp:patch-deleted:{name}"

    def _keys(self, name: str) -> list[str]:
        return [self.key(name), VERSIONS, GENERATIONS, SIGNATURES, self.tombstone(name), OWNERS]

    def versions(self) -> tuple[dict[str, str], list[bytes]]:
        """({name: version}, the fields that are not a valid name and version): Redis is untrusted input, and one
        bad field must not stop the others from syncing."""
        good: dict[str, str] = {}
        bad: list[bytes] = []
        fields = cast(dict[bytes, bytes], self.client.hgetall(VERSIONS))  # the client does not decode responses
        for k, v in fields.items():
            try:
                name, version = k.decode(), v.decode()
            except UnicodeDecodeError:
                bad.append(k)
                continue
            if NAME_RE.match(name):
                good[name] = version
            else:
                bad.append(k)
        return good, bad

    def names(self) -> list[str]:
        return sorted(self.versions()[0])

    def load(self, name: str) -> bytes | None:
        """The stored bytes; a key of another Redis type (WRONGTYPE) reads as bytes no patch file can be."""
        try:
            return cast(bytes | None, self.client.get(self.key(name)))  # the client does not decode responses
        except redis.ResponseError:
            return b""

    def load_record(self, name: str) -> Stored | None:
        """Bytes, generation and signature read in one transaction; a value of the wrong type or form reads as
        bytes no patch file can be, generation 0, no signature."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.key(name))  # one command a statement: the stubs type a queued command as its reply
        pipe.hget(GENERATIONS, name)
        pipe.hget(SIGNATURES, name)
        pipe.hget(OWNERS, name)
        data, generation, signature, owner = pipe.execute(raise_on_error=False)
        if data is None:
            return None
        if isinstance(data, redis.ResponseError):
            data = b""
        try:
            generation = int(generation)
        except (TypeError, ValueError):
            generation = 0
        owner = owner.decode(errors="replace") if isinstance(owner, bytes) and owner else None
        return Stored(data, generation, signature if isinstance(signature, bytes) else None, owner)

    def save(self, name: str, data: bytes, version: str, generation: int = 0, signature: bytes | None = None,
             refill: bool = False, owner: str | None = None, tenant_write: bool = False) -> int:
        """Store a version; returns its generation, or 0 when a refill lost to a newer write or delete.
        `tenant_write`: `owner`'s own upload, refused (OwnedElsewhere) when the stored name is not `owner`'s."""
        event = json.dumps({"op": "put", "name": name, "version": version, "origin": self.origin})
        args: list[str | bytes | int] = [name, generation, self.tombstone_seconds, int(refill), data, version,
                                         signature or b"", CHANNEL, event, owner or "", int(tenant_write)]
        reply = self._put(keys=self._keys(name), args=args)
        if isinstance(reply, bytes) and reply.startswith(b"owner:"):
            raise OwnedElsewhere(reply[6:].decode(errors="replace") or None)
        return int(reply)

    def delete(self, name: str, generation: int = 0, refill: bool = False) -> int:
        """Remove a name and leave a tombstone (for DMP_PATCH_TOMBSTONE_SECONDS) no older refill can pass."""
        event = json.dumps({"op": "delete", "name": name, "origin": self.origin})
        args: list[str | bytes | int] = [name, generation, self.tombstone_seconds, int(refill), CHANNEL, event]
        return int(self._delete(keys=self._keys(name), args=args))

    def deleted_generation(self, name: str) -> int:
        """The generation of the delete of `name` that Redis remembers; 0 when none (or not a number)."""
        try:
            return int(cast(bytes | None, self.client.get(self.tombstone(name))) or 0)
        except (TypeError, ValueError, redis.ResponseError):
            return 0

    def seeded(self) -> bool:
        """False for a new Redis, or one that lost its data: a replica must fill it."""
        return bool(self.client.exists(SEEDED))

    def mark_seeded(self) -> None:
        self.client.set(SEEDED, "1")

    def ping(self) -> None:
        self.client.ping()


def parse_event(raw) -> dict | None:
    """A pub/sub event as {op, name, ...}, or None when it is not one of ours (any client may publish)."""
    try:
        event = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict) or event.get("op") not in ("put", "delete"):
        return None
    name = event.get("name")
    return event if isinstance(name, str) and NAME_RE.match(name) else None
