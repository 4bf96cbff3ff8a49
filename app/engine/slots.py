"""A base's patches on the engine side: versions pinned by requests, a bounded host cache, device slots as an LRU.

Three tiers: the store (disk or Redis, the registry's), host memory (validated copies, pinned on CUDA, at most
DMP_PATCH_HOST_BYTES of unpinned ones), and the PatchPool's device slots. A request pins the version current at
admission of every patch it composes (`Pins`; their host copies stay until the request ends); the runner seats
them all in slots just before it joins the batch (all or none), evicting the least recently used slots that no
running request uses. Slots are fixed-address graph inputs,
so a swap-in is an in-place copy and no graph is recaptured. Pool tensors are written by the runner thread only.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.core.metrics import Metrics
from app.model.dmp import DMP, PatchPool

Loader = Callable[[str, str], DMP]  # (name, version) -> the validated patch, read from the store


@dataclass(eq=False)
class Version:
    """One patch version of one base and where it is resident."""

    name: str
    version: str
    nbytes: int
    host: DMP | None = None  # validated copy in host memory; None = only in the store
    slot: int | None = None  # device slot while resident
    refs: int = 0  # admitted requests pinning this version
    seated: int = 0  # running requests reading its slot: it cannot be evicted
    retired: bool = False
    used: int = 0  # LRU clock of the last pin or seat

    @property
    def residency(self) -> str:
        return "device" if self.slot is not None else "host" if self.host is not None else "stored"


@dataclass(eq=False)
class Pins:
    """One request's pinned versions, one per patch it composes (1 to MIX_WIDTH), with each one's scale."""

    versions: list[Version]
    scales: list[float]

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.versions]


def _on_host(patch: DMP, device: str) -> DMP:
    """Pinned host memory on CUDA, so a swap-in is an asynchronous copy."""
    if device == "cuda":
        with torch.no_grad():
            for p in patch.parameters():
                p.data = p.data.pin_memory()
    return patch


class PatchSlots:
    """name -> current version; retired versions live until their last request releases them."""

    def __init__(self, base: str, pool: PatchPool, host_bytes: int, metrics: Metrics, device: str = "cpu"):
        self.base, self.pool, self.host_bytes, self.metrics, self.device = base, pool, host_bytes, metrics, device
        self._lock = threading.Lock()
        self.current: dict[str, Version] = {}
        self.held: list[Version] = []  # retired versions still pinned
        self._clock = itertools.count(1)
        # bookkeeping that keeps every operation O(slots), not O(patches): thousands of patches per base
        self._slotted: dict[int, Version] = {}  # slot -> version in it
        self._hosted: OrderedDict[Version, None] = OrderedDict()  # versions with a host copy, least recent first
        self._host_total = 0

    # ------------------------------------------------------------------ registry side (any thread)

    def offer(self, name: str, version: str, patch: DMP, nbytes: int) -> bool:
        """A validated patch version becomes current (host copy cached); True if it replaced an older version."""
        patch = _on_host(patch, self.device)
        with self._lock:
            old = self.current.get(name)
            if old is not None and old.version == version:
                if old.host is None:
                    self._host(old, patch)
                return False
            entry = self.current[name] = Version(name, version, nbytes, used=next(self._clock))
            self._host(entry, patch)
            if old is not None:
                self._retire(old)
            return old is not None

    def withdraw(self, name: str) -> bool:
        with self._lock:
            old = self.current.pop(name, None)
            if old is not None:
                self._retire(old)
            self.metrics.forget_patch(self.base, name)
            return old is not None

    # ------------------------------------------------------------------ request side

    def acquire(self, name: str, load: Loader) -> Version | None:
        """Pin the current version of `name` (None if unknown); reads it back from the store if it left host memory."""
        with self._lock:
            entry = self.current.get(name)
            if entry is None:
                return None
            entry.refs += 1
            entry.used = next(self._clock)
            if entry.host is not None:
                self._hosted.move_to_end(entry)
            if entry.host is not None or entry.slot is not None:
                return entry
        try:
            start = time.perf_counter()
            patch = _on_host(load(name, entry.version), self.device)  # I/O outside the lock
            self.metrics.patch_swap_in_seconds.labels(self.base, "store").observe(time.perf_counter() - start)
        except BaseException:
            self.release(entry)
            raise
        with self._lock:
            if entry.host is None:
                self._host(entry, patch)
        return entry

    def release(self, entry: Version | Pins, seated: bool = False) -> None:
        """A request is done with its version (or every version of its Pins); `seated`: it held their slots."""
        if isinstance(entry, Pins):
            for version in entry.versions:
                self.release(version, seated)
            return
        with self._lock:
            entry.refs -= 1
            entry.seated -= seated
            if entry.retired and entry.refs == 0:
                self.held.remove(entry)
                self._drop(entry)
            self._trim_host()

    # ------------------------------------------------------------------ runner thread

    def seat(self, entry: Version, evict: bool = True, avoid: Version | None = None) -> int | None:
        """The device slot of a pinned version for one running request, swapping it in if needed; None when it is
        not resident and every slot is used by running requests (or `evict` is off: only resident ones seat)."""
        with self._lock:
            if entry.slot is None:
                if not evict:
                    return None
                start = time.perf_counter()
                if self.pool.free_slots() == 0 and not self._evict_device():
                    return None
                assert entry.host is not None, "a version without a slot keeps its host copy"
                entry.slot = self.pool.install(entry.host)  # in place; non-blocking from pinned memory on CUDA
                self._slotted[entry.slot] = entry
                self.metrics.patch_swap_ins.labels(self.base, entry.name).inc()
                self.metrics.patch_swap_in_seconds.labels(self.base, "host").observe(time.perf_counter() - start)
                self._gauge(entry.name)
            elif entry is avoid:
                return None
            entry.seated += 1
            entry.used = next(self._clock)
            return entry.slot

    def seat_waiting(self, pins: list[Pins | None]) -> list[tuple[tuple[int, float], ...] | None]:
        """Seat waiting requests' pinned versions, oldest first: the (slot, scale) pairs of each (() for the bare
        base), or None for one that must keep waiting. A composition seats all its versions or none.

        When every slot is read by running requests, the first one that cannot be seated blocks: younger requests
        may still join versions that are resident, except the one whose slot frees soonest (the victim), so the
        blocked one gets a slot within one request's run: requests queue, never fail, and a cold patch is not
        starved by hot ones."""
        mixes: list[tuple[tuple[int, float], ...] | None] = []
        blocked, victim = False, None
        for pin in pins:
            mix = () if pin is None else self._seat_all(pin, evict=not blocked, avoid=victim)
            if mix is None and not blocked:
                blocked, victim = True, self.victim()
            mixes.append(mix)
        return mixes

    def _seat_all(self, pins: Pins, evict: bool, avoid: Version | None) -> tuple[tuple[int, float], ...] | None:
        """Every version of a request seated, as (slot, scale) pairs; None (and none left seated) if one cannot."""
        seated: list[tuple[Version, int]] = []
        for version in pins.versions:
            slot = self.seat(version, evict=evict, avoid=avoid)
            if slot is None:
                with self._lock:
                    for v, _ in seated:
                        v.seated -= 1  # still resident: evictable again once no running request reads it
                return None
            seated.append((version, slot))
        return tuple((slot, scale) for (_, slot), scale in zip(seated, pins.scales, strict=True))

    def victim(self) -> Version | None:
        """The resident version that frees its slot soonest if no new request joins it: fewest running, then LRU."""
        with self._lock:
            seated = [v for v in self._resident() if v.seated > 0]
            return min(seated, key=lambda v: (v.seated, v.used), default=None)

    # ------------------------------------------------------------------ queries

    def residency(self, name: str) -> str:
        with self._lock:
            entry = self.current.get(name)
            return entry.residency if entry is not None else "stored"

    def held_versions(self, name: str) -> list[str]:
        with self._lock:
            return [v.version for v in self.held if v.name == name]

    def stats(self) -> dict[str, int]:
        """Slots in use (slot 0 excluded), retired versions still pinned, host copies and their bytes."""
        with self._lock:
            return {"slots": len(self._slotted), "held": len(self.held), "host": len(self._hosted),
                    "host_bytes": self._host_total}

    # ------------------------------------------------------------------ internals (lock held)

    def _resident(self) -> list[Version]:
        return list(self._slotted.values())

    def _evict_device(self) -> bool:
        """Free the least recently seated slot no running request reads; False if every slot is in use."""
        # a pinned version whose host copy is gone keeps its slot: that slot is its only copy outside the store
        idle = [v for v in self._resident() if v.seated == 0 and (v.host is not None or v.refs == 0)]
        if not idle:
            return False
        lru = min(idle, key=lambda v: v.used)
        self._unslot(lru)
        self.metrics.patch_evictions.labels(self.base, lru.name).inc()
        return True

    def _unslot(self, entry: Version) -> None:
        assert entry.slot is not None, "only resident versions are unslotted"
        self.pool.free(entry.slot)
        del self._slotted[entry.slot]
        entry.slot = None
        self._gauge(entry.name)

    def _gauge(self, name: str) -> None:
        """Resident versions of `name`; a patch that is not resident has no series (cardinality <= slots)."""
        count = sum(1 for v in self._resident() if v.name == name)
        if count:
            self.metrics.patch_resident.labels(self.base, name).set(count)
        else:
            self.metrics.patch_resident.remove(self.base, name)

    def _host(self, entry: Version, patch: DMP) -> None:
        entry.host = patch
        self._hosted[entry] = None
        self._host_total += entry.nbytes
        self._trim_host()

    def _unhost(self, entry: Version) -> None:
        if entry.host is not None:
            entry.host = None
            del self._hosted[entry]
            self._host_total -= entry.nbytes

    def _trim_host(self) -> None:
        """Drop least recently used host copies of unpinned versions while over the byte budget."""
        if self._host_total <= self.host_bytes:
            return
        for v in [v for v in self._hosted if v.refs == 0]:
            self._unhost(v)
            if self._host_total <= self.host_bytes:
                break

    def _retire(self, entry: Version) -> None:
        entry.retired = True
        if entry.refs == 0:
            self._drop(entry)
        else:
            self.held.append(entry)

    def _drop(self, entry: Version) -> None:
        if entry.slot is not None:
            self._unslot(entry)
        self._unhost(entry)
