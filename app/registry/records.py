"""A patch's registry entry: name, base, content version and lifecycle state."""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)


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

    def summary(self) -> dict:
        return {"name": self.name, "base": self.base, "version": self.version, "state": self.state,
                "task": self.task, "domain": self.domain, "size_bytes": self.size_bytes, "error": self.error,
                "method": self.metadata.get("method", "dmp") if self.metadata else None,
                "updated_at": self.updated_at}
