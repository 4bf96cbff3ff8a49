"""A patch's registry entry: name, base, content version and lifecycle state."""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)


NOBODY = ""  # a tenant that owns no patch: sees the shared ones alone (a caller without credentials, keys on)
PATH_KEYS = ("train_config",)  # metadata holding the trainer's settings, whose file paths are the trainer host's


def _strip_paths(value):
    """File paths reduced to their last part: where the trainer's files lived is nobody's business."""
    if isinstance(value, dict):
        return {k: _strip_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_paths(v) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return value


def public_metadata(meta: dict) -> dict:
    """A patch's metadata as shown to clients: strings, with the paths inside the training settings stripped."""
    shown = {k: str(v) for k, v in meta.items()}
    for key in PATH_KEYS:
        if key in shown:
            try:
                shown[key] = json.dumps(_strip_paths(json.loads(shown[key])))
            except (ValueError, RecursionError):
                del shown[key]  # not the JSON the trainer writes: show nothing rather than something unchecked
    return shown


def version_of(data: bytes) -> str:
    """The content version: short hex sha256 of the file bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class PatchRecord:
    """What GET /patches shows about one patch name."""

    name: str
    version: str
    state: str = "loading"
    base: str | None = None
    task: str | None = None
    domain: str | None = None
    size_bytes: int = 0
    error: str | None = None
    metadata: dict = field(default_factory=dict)
    updated_at: float = field(default_factory=time.time)
    generation: int = 0  # orders writes of one name across replicas and Redis restarts (microseconds)
    signer: str | None = None  # key id of the signature that verified, when DMP_PATCH_PUBLIC_KEYS is set
    digest: str = ""  # the file's whole sha256 (the version is its first 64 bits)
    owner: str | None = None  # the tenant (of DMP_API_KEYS) it belongs to; None = shared by all

    def visible_to(self, tenant: str | None) -> bool:
        """Whether a caller sees this patch: the operator (None) sees all, a tenant its own and the shared ones."""
        return tenant is None or self.owner is None or self.owner == tenant

    def summary(self) -> dict:
        return {"name": self.name, "base": self.base, "version": self.version, "state": self.state,
                "task": self.task, "domain": self.domain, "size_bytes": self.size_bytes, "error": self.error,
                "method": self.metadata.get("method", "dmp") if self.metadata else None,
                "updated_at": self.updated_at, "generation": self.generation, "signer": self.signer,
                "owner": self.owner}
