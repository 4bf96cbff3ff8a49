"""Where patch bytes live: a directory (embedded default, atomic writes) or Redis (shared by replicas)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import redis

from app.registry.records import NAME_RE

CHANNEL = "dmp:patch-events"
VERSIONS = "dmp:patch-versions"  # hash name -> version
SEEDED = "dmp:seeded"


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

    def save(self, name: str, data: bytes, version: str) -> None:
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
            os.replace(tmp, self.path(name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, name: str, version: str | None = None) -> None:
        self.path(name).unlink(missing_ok=True)

    def ping(self) -> None:
        return None


class RedisStore:
    """Patch bytes under `dmp:patch:<name>`, versions in one hash, changes announced on a pub/sub channel."""

    shared = True

    def __init__(self, client: redis.Redis, origin: str):
        self.client, self.origin = client, origin

    @staticmethod
    def key(name: str) -> str:
        return f"dmp:patch:{name}"

    def versions(self) -> tuple[dict[str, str], list[bytes]]:
        """({name: version}, the fields that are not a valid name and version): Redis is untrusted input, and one
        bad field must not stop the others from syncing."""
        good, bad = {}, []
        for k, v in self.client.hgetall(VERSIONS).items():
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
            return self.client.get(self.key(name))
        except redis.ResponseError:
            return b""

    def save(self, name: str, data: bytes, version: str) -> None:
        event = json.dumps({"op": "put", "name": name, "version": version, "origin": self.origin})
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.key(name), data).hset(VERSIONS, name, version).publish(CHANNEL, event)
        pipe.execute()

    def delete(self, name: str, version: str | None = None) -> None:
        event = json.dumps({"op": "delete", "name": name, "version": version, "origin": self.origin})
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.key(name)).hdel(VERSIONS, name).publish(CHANNEL, event)
        pipe.execute()

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
