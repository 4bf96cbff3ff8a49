"""Reference-counted patch versions in a base's PatchPool: a request pins the version current at admission."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from app.model.dmp import DMP, PatchError, PatchPool


@dataclass
class Installed:
    """One patch version living in one pool slot."""

    name: str
    version: str
    slot: int
    refs: int = 0
    retired: bool = False


class SlotTable:
    """name -> current version's slot; old versions keep their slot until their last request releases it.

    Pool writes happen under the owning base's lock (taken by the caller), never during a forward.
    """

    def __init__(self, pool: PatchPool):
        self.pool = pool
        self._lock = threading.Lock()
        self.current: dict[str, Installed] = {}
        self.held: list[Installed] = []  # retired versions still pinned

    def has_room(self) -> bool:
        with self._lock:
            return self.pool.free_slots() > 0

    def install(self, name: str, version: str, patch: DMP) -> tuple[Installed, bool]:
        """Copy `patch` into a free slot and make it current; returns (entry, replaced_an_older_version)."""
        with self._lock:
            old = self.current.get(name)
            if old is not None and old.version == version:
                return old, False
            if self.pool.free_slots() == 0:
                raise PatchError(f"no free patch slot ({self.pool.slots - 1} in use; raise DMP_PATCH_SLOTS)")
            entry = Installed(name, version, self.pool.install(patch))
            self.current[name] = entry
            if old is not None:
                self._retire(old)
            return entry, old is not None

    def remove(self, name: str) -> bool:
        with self._lock:
            old = self.current.pop(name, None)
            if old is not None:
                self._retire(old)
            return old is not None

    def acquire(self, name: str) -> Installed | None:
        """Pin the current version of `name` (None if not installed)."""
        with self._lock:
            entry = self.current.get(name)
            if entry is not None:
                entry.refs += 1
            return entry

    def release(self, entry: Installed) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.retired and entry.refs == 0:
                self.held.remove(entry)
                self.pool.free(entry.slot)

    def _retire(self, entry: Installed) -> None:
        entry.retired = True
        if entry.refs == 0:
            self.pool.free(entry.slot)
        else:
            self.held.append(entry)

    def stats(self) -> tuple[int, int]:
        """(slots in use excluding slot 0, retired versions still pinned)."""
        with self._lock:
            return self.pool.slots - 1 - self.pool.free_slots(), len(self.held)
