"""Patch registry: validates and stores patch versions, any number per base, and hands each validated version to
its base (the engine's side, which owns host copies and device slots); keeps replicas in step through Redis pub/sub.

States: loading -> ready (validated and handed to its base) or failed (refused when loaded from the store);
a replaced or deleted version becomes retired. Where a ready patch is resident (stored / host / device) is the
base's to say. Dependencies point one way: the engine uses the registry; the registry knows bases only through
the `ServedModel` protocol below.
"""
from __future__ import annotations

import builtins
import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Protocol

import redis
from torch import nn

from app.core.config import Settings
from app.core.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PatchError,
    PatchNotReady,
    ServiceError,
    Unavailable,
)
from app.core.metrics import Metrics
from app.core.signing import PatchVerifier
from app.model.dmp import DMP, patch_from_bytes, read_header
from app.registry.records import PatchRecord, version_of
from app.registry.stores import CHANNEL, DiskStore, OwnedElsewhere, RedisStore, Stored, parse_event

log = logging.getLogger("dmp.registry")
RESYNC_SECONDS = 2.0
HISTORY_PER_NAME = 20  # version events kept per name
HISTORY_NAMES = 1000  # names whose history is kept
TOMBSTONES_KEPT = 10_000  # deleted names each replica remembers (also bounded by DMP_PATCH_TOMBSTONE_SECONDS)
PING_EVERY = 0.2  # seconds between the watcher's Redis pings
PING_SLOW = 0.5  # a ping unanswered this long makes the replica unready (Redis hung, connection still open)


class PatchSink(Protocol):
    """Where validated patch versions go: one base's host cache and device slots."""

    def offer(self, name: str, version: str, patch: DMP, nbytes: int) -> bool: ...  # True: replaced a version

    def withdraw(self, name: str) -> bool: ...

    def residency(self, name: str) -> str: ...  # "stored" | "host" | "device"

    def held_versions(self, name: str) -> list[str]: ...


class ServedModel(Protocol):
    """What the registry needs of a served base: enough to validate a patch against it, and its sink."""

    @property
    def name(self) -> str: ...

    @property
    def model(self) -> nn.Module: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def patches(self) -> PatchSink: ...


class PatchRegistry:
    """All patches of all served bases, one store behind them."""

    def __init__(self, settings: Settings, bases: Mapping[str, ServedModel], metrics: Metrics, client=None):
        self.settings, self.bases, self.metrics = settings, bases, metrics
        self.origin = uuid.uuid4().hex
        self.store = (RedisStore(client, self.origin, settings.patch_tombstone_seconds) if client is not None
                      else DiskStore(settings.patch_root))
        if settings.patch_seed_dir is not None and isinstance(self.store, DiskStore):
            copied = self.store.seed_from(settings.patch_seed_dir)
            if copied:
                log.info("copied shipped patches %s from %s into %s", copied, settings.patch_seed_dir,
                         settings.patch_root)
        self.verifier = PatchVerifier(settings.public_key_paths) if settings.public_key_paths else None
        self.records: dict[str, PatchRecord] = {}
        # recent ready versions' files and signatures (at most DMP_PATCH_HOST_BYTES), to refill a Redis that lost
        # its data
        self._bytes: OrderedDict[str, tuple[bytes, bytes | None]] = OrderedDict()
        # names deleted on this replica's watch: name -> (generation, when), so no refill brings them back
        self._tombstones: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._bytes_total = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self.connected = not self.store.shared  # Redis: set once the listener has subscribed and synced
        self._ping_ok = True  # the watcher's last ping
        self._ping_started: float | None = None  # when a ping still in flight began
        self._reported: set = set()  # bad data already logged (each once)
        # what this replica saw happen to each name since it started: name -> (version, event, time), oldest first
        self._history: OrderedDict[str, deque[tuple[str, str, float]]] = OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load every stored patch; with Redis, seed the shipped patches once and follow changes."""
        if isinstance(self.store, RedisStore):
            self._start_listener()
            threading.Thread(target=self._watch, name="dmp-redis-watch", daemon=True).start()
        else:
            for name in self.store.names():
                self._load(name, self.store.load_record(name))

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=3)

    def _start_listener(self) -> None:
        self._listener = threading.Thread(target=self._listen, name="dmp-registry", daemon=True)
        self._listener.start()

    def healthy(self) -> tuple[bool, str]:
        """(reachable, why not), from what the sync and watcher threads last saw: no Redis call, no lock, so a
        probe answers at once however hung Redis is. A sync thread that died is restarted (unready meanwhile)."""
        if not self.store.shared:
            return True, ""
        assert self._listener is not None, "start() runs the listener with a shared store"
        if not self._listener.is_alive() and not self._stop.is_set():
            log.error("patch sync thread died; restarting it")
            self.connected = False
            self._start_listener()
            return False, "patch sync thread died; restarted"
        started = self._ping_started
        if not self._ping_ok or (started is not None and time.monotonic() - started > PING_SLOW):
            return False, "redis unreachable (no answer to ping)"
        if not self.connected:
            return False, "patch registry is resynchronising with redis"
        return True, ""

    def _watch(self) -> None:
        """Ping Redis a few times a second, so readiness knows within PING_SLOW that it stopped answering."""
        while not self._stop.wait(PING_EVERY):
            self._ping_started = time.monotonic()
            try:
                self.store.ping()
                self._ping_ok = True
            except redis.RedisError:
                self._ping_ok = False
            self._ping_started = None

    def _report(self, key, message: str, *args) -> None:
        """Log bad stored data once per distinct item (any client can write Redis: never a log flood)."""
        if key not in self._reported and len(self._reported) < 10_000:
            self._reported.add(key)
            log.warning(message, *args)

    # ------------------------------------------------------------------ queries

    # No lock here: these run on the event loop, and the lock can be held by a write waiting on a hung Redis.
    # dict.copy()/get are atomic under the GIL.
    # Tenants: `tenant` is the caller's tenant (of its API key), None for the operator (admin token, or keys off),
    # records.NOBODY for a caller without credentials. A patch with an owner exists only for that tenant and the
    # operator; to anyone else it is absent (404 identical to an unknown name's, so names do not leak).
    def list(self, tenant: str | None = None) -> list[PatchRecord]:
        return sorted((r for r in self.records.copy().values() if r.visible_to(tenant)), key=lambda r: r.name)

    def get(self, name: str, tenant: str | None = None) -> PatchRecord:
        record = self.records.get(name)
        if record is None or not record.visible_to(tenant):
            raise NotFound(f"no patch named {name!r}", error_type="patch_not_found")
        return record

    def held_versions(self, name: str) -> builtins.list[str]:  # builtins: `list` here is the method above
        """Retired versions of `name` that running requests still use."""
        return [v for b in self.bases.values() for v in b.patches.held_versions(name)]

    def history(self, name: str, tenant: str | None = None) -> builtins.list[dict]:
        """Versions of `name` this replica installed or deleted since it started, newest first; a tenant sees the
        history of a name it sees now (a deleted name's owner is gone with it: the operator's alone)."""
        events, record = self._history.get(name), self.records.get(name)
        if events is None or (tenant is not None and (record is None or not record.visible_to(tenant))):
            raise NotFound(f"no patch named {name!r} seen since this replica started", error_type="patch_not_found")
        return [{"version": v, "event": e, "at": at} for v, e, at in reversed(list(events))]

    def _note(self, name: str, version: str, event: str) -> None:
        events = self._history.pop(name, None) or deque(maxlen=HISTORY_PER_NAME)
        events.append((version, event, time.time()))
        self._history[name] = events  # most recently changed last: the oldest names go first
        while len(self._history) > HISTORY_NAMES:
            self._history.popitem(last=False)

    def summary(self, record: PatchRecord) -> dict:
        """The record's fields plus where it is resident: device (in a slot), host (in memory) or stored."""
        base = self.bases.get(record.base) if record.state == "ready" and record.base is not None else None
        return record.summary() | {"resident": base.patches.residency(record.name) if base else "stored"}

    def fetch(self, name: str, version: str) -> DMP:
        """Read `version` of `name` back from the store and validate it again (a store is untrusted input)."""
        try:
            data = self.store.load(name)
        except redis.RedisError as e:
            raise self._unreachable(e) from None
        record = self.records.get(name)
        # the whole sha256 when this replica verified the version itself: with signatures on, a 64-bit version
        # alone would let whoever writes Redis swap in other bytes that match it
        want = record.digest if record is not None and record.version == version and record.digest else None
        if data is None or version_of(data) != version or (want and hashlib.sha256(data).hexdigest() != want):
            raise PatchNotReady(f"patch {name!r} version {version} is no longer in the store (replaced or deleted)")
        return self._validate(data)[1]

    # ------------------------------------------------------------------ admin

    def put(self, name: str, data: bytes, signature: bytes | None = None, tenant: str | None = None,
            owner: str | None = None, set_owner: bool = False) -> tuple[PatchRecord, bool]:
        """Check the name and signature, validate in full, then store, install and announce; a refused upload
        changes nothing. A tenant's upload belongs to it; the operator's is `owner` when `set_owner` (None =
        shared), else keeps the name's owner (a new name: shared)."""
        version = version_of(data)
        self._check_name(name)
        signer = self._verify(data, signature)
        with self._lock:
            old = self.records.get(name)
            if tenant is not None and old is not None:
                self._check_owned(name, old.owner, tenant, "replace")
            if tenant is not None:
                owner = tenant
            elif not set_owner:
                owner = old.owner if old is not None else None
            base, patch = self._validate(data)
            try:
                generation = self.store.save(name, data, version, self._next_generation(name), signature,
                                             owner=owner, tenant_write=tenant is not None)
            except redis.RedisError as e:
                raise self._unreachable(e) from None
            except OwnedElsewhere as e:  # another replica's write this one has not seen yet
                assert tenant is not None, "only a tenant's write is checked in the store"
                self._check_owned(name, e.owner, tenant, "replace")
                raise
            if old is not None and old.base is not None and old.base != base.name and old.base in self.bases:
                self.bases[old.base].patches.withdraw(name)  # the name moved to another base
            record = self._install(name, version, base, patch, Stored(data, generation, signature, owner), signer)
            return record, old is None

    def delete(self, name: str, tenant: str | None = None) -> PatchRecord:
        with self._lock:
            record = self.get(name, tenant)  # another tenant's: 404, as for a name that does not exist
            if tenant is not None:
                self._check_owned(name, record.owner, tenant, "delete")
            try:
                generation = self.store.delete(name, self._next_generation(name))
            except redis.RedisError as e:
                raise self._unreachable(e) from None
            self._forget(name, generation)
            record.state = "retired"
            return record

    # ------------------------------------------------------------------ internals

    def _check_owned(self, name: str, owner: str | None, tenant: str, action: str) -> None:
        """A tenant changes its own patches only: a shared one is the operator's (403: the tenant sees it anyway),
        another tenant's name is taken (409, the one thing a would-be writer must learn; never whose it is)."""
        if owner == tenant:
            return
        self.metrics.patch_refusals.labels("owner").inc()
        if owner is None:
            raise Forbidden(f"patch {name!r} is shared; only the operator may {action} it", error_type="shared_patch")
        raise Conflict(f"the patch name {name!r} is taken; choose another name", error_type="name_taken")

    def _unreachable(self, e: redis.RedisError) -> Unavailable:
        return Unavailable(f"patch store unreachable: {e.__class__.__name__}", error_type="registry_unavailable")

    def _next_generation(self, name: str) -> int:
        """Past every generation this replica knew for `name` (causal order), else the clock in microseconds."""
        record, tombstone = self.records.get(name), self._tombstones.get(name)
        known = max(record.generation if record else 0, tombstone[0] if tombstone else 0)
        return max(time.time_ns() // 1000, known + 1)

    def _check_name(self, name: str) -> None:
        """A patch named like a served base would be shadowed by it wherever a model id is either (/v1)."""
        if name in self.bases:
            self.metrics.patch_refusals.labels("name").inc()
            raise InvalidRequest(f"{name!r} is the name of a served base model; name the patch otherwise",
                                 error_type="name_is_a_base")

    def _verify(self, data: bytes, signature: bytes | None) -> str | None:
        """The signer's key id when DMP_PATCH_PUBLIC_KEYS is set (raises when the signature does not hold)."""
        if self.verifier is None:
            return None
        try:
            return self.verifier.verify(data, signature)
        except PatchError as e:
            self.metrics.patch_refusals.labels(e.error_type).inc()
            raise

    def _validate(self, data: bytes):
        """Find the served base the patch is for (fingerprint, else base_name) and check the whole file."""
        try:
            meta = read_header(data).get("__metadata__") or {}
            base = self._base_for(meta)
            patch = patch_from_bytes(data, base=base.model, max_bytes=self.settings.max_patch_bytes)
        except PatchError:
            self.metrics.patch_refusals.labels("invalid").inc()
            raise
        return base, patch

    def _base_for(self, meta: dict) -> ServedModel:
        fp = meta.get("base_fingerprint")
        for base in self.bases.values():
            if fp and base.fingerprint == fp:
                return base
        named = meta.get("base_name")
        if isinstance(named, str) and named in self.bases:
            return self.bases[named]  # patch_from_bytes then says why it does not fit
        if not self.bases:
            raise PatchError("this server serves no base model")
        raise PatchError(f"no served base matches this patch (base_name={named!r}, fingerprint "
                         f"{str(fp)[:12]}…); served: {', '.join(self.bases)}")

    def _install(self, name: str, version: str, base: ServedModel, patch, stored: Stored,
                 signer: str | None) -> PatchRecord:
        data = stored.data
        replaced = base.patches.offer(name, version, patch, len(data))
        meta = dict(patch.metadata)
        record = PatchRecord(name, version, "ready", base.name, meta.get("task"), meta.get("domain"), len(data),
                             metadata=meta, generation=stored.generation, signer=signer,
                             digest=hashlib.sha256(data).hexdigest(), owner=stored.owner)
        self.records[name] = record
        self._tombstones.pop(name, None)
        self._note(name, version, "installed")
        self._keep_bytes(name, data, stored.signature)
        self.metrics.patch_installs.labels(base.name).inc()
        if replaced:
            self.metrics.patch_swaps.labels(base.name).inc()
        log.info("patch %s version %s ready on %s%s", name, version, base.name, " (swap)" if replaced else "")
        return record

    def _load(self, name: str, stored: Stored | None) -> None:
        """Install a stored patch; one this replica cannot serve fails the name here (never an older version
        served instead), logged once per version."""
        if stored is None:
            return
        data = stored.data
        version = version_of(data)
        with self._lock:
            current = self.records.get(name)
            if current is not None and current.version == version and current.state in ("ready", "failed"):
                current.generation = max(current.generation, stored.generation)
                current.owner = stored.owner  # the operator may give the same bytes another owner
                return  # already served, or already refused (and logged)
            # generation 0: written by hand or by a server without generations, taken as is
            if stored.generation and self._refill_if_newer(name, stored.generation):
                return  # the store went back to an older write (Redis lost its data): ours was put back
            self.records[name] = PatchRecord(name, version, "loading", size_bytes=len(data),
                                             generation=stored.generation, owner=stored.owner)
            try:
                self._check_name(name)
                signer = self._verify(data, stored.signature)
                base, patch = self._validate(data)
                if current is not None and current.base not in (None, base.name) and current.base in self.bases:
                    self.bases[current.base].patches.withdraw(name)
                self._install(name, version, base, patch, stored, signer)
            except Exception as e:  # stored bytes are untrusted input: whatever is wrong fails this record alone
                why = e.message if isinstance(e, ServiceError) else f"{e.__class__.__name__}: {e}"
                log.warning("patch %s version %s refused on this replica: %s", name, version, why)
                if current is not None and current.base is not None and current.base in self.bases:
                    self.bases[current.base].patches.withdraw(name)  # the other replicas serve the new version
                self._drop_bytes(name)
                self.records[name] = PatchRecord(name, version, "failed", size_bytes=len(data), error=why,
                                                 generation=stored.generation, owner=stored.owner)

    def _refill_if_newer(self, name: str, stored_generation: int) -> bool:
        """True when this replica knows a newer write of `name` (its file or its delete) than the store holds,
        and wrote it back (compare-and-set: a concurrent newer write wins)."""
        if not self.store.shared:
            return False
        record, tombstone = self.records.get(name), self._tombstones.get(name)
        if tombstone is not None and tombstone[0] > stored_generation:
            return bool(self.store.delete(name, tombstone[0], refill=True))
        if record is not None and record.state == "ready" and record.generation > stored_generation:
            held = self._bytes.get(name)
            if held is not None:
                return bool(self.store.save(name, held[0], record.version, record.generation, held[1], refill=True,
                                            owner=record.owner))
        return False

    def _keep_bytes(self, name: str, data: bytes, signature: bytes | None) -> None:
        """Remember a ready file for refilling Redis; the least recent go first past DMP_PATCH_HOST_BYTES."""
        if not self.store.shared:
            return  # the disk store does not lose its data with a server
        self._drop_bytes(name)
        self._bytes[name] = (data, signature)
        self._bytes_total += len(data)
        while self._bytes_total > self.settings.patch_host_bytes and self._bytes:
            self._bytes_total -= len(self._bytes.popitem(last=False)[1][0])

    def _drop_bytes(self, name: str) -> None:
        held = self._bytes.pop(name, None)
        self._bytes_total -= len(held[0]) if held else 0

    def _forget(self, name: str, generation: int) -> None:
        """Drop a deleted name, remembering its delete's generation (a lower bound when learnt second-hand)."""
        record = self.records.pop(name, None)
        self._drop_bytes(name)
        if self.store.shared:
            self._tombstones.pop(name, None)
            self._tombstones[name] = (generation, time.time())
            while len(self._tombstones) > TOMBSTONES_KEPT:
                self._tombstones.popitem(last=False)
        if record is not None:
            self._note(name, record.version, "deleted")
        if record is not None and record.base is not None and record.base in self.bases:
            self.bases[record.base].patches.withdraw(name)  # which also removes the name's metric series

    # ------------------------------------------------------------------ redis replicas

    @property
    def _redis(self) -> RedisStore:
        """The store as Redis: the sync thread's methods below run only with a shared store."""
        assert isinstance(self.store, RedisStore), "only with DMP_REDIS_URL"
        return self.store

    def _populate(self) -> None:
        """A Redis without the seeded marker is new or lost its data: the replicas that notice fill it with the
        patches they serve and the deletes they saw, then with the shipped ones in DMP_PATCH_DIR. Every write is a
        compare-and-set on the name's generation: a write made since Redis came back (newer) is never undone."""
        if self._redis.seeded():
            return
        with self._lock:
            held = {n: (*self._bytes[n], r.version, max(r.generation, 1), r.owner) for n, r in self.records.items()
                    if r.state == "ready" and n in self._bytes}
            cutoff = time.time() - self.settings.patch_tombstone_seconds
            deleted = {n: gen for n, (gen, at) in self._tombstones.items() if at > cutoff}
        disk = DiskStore(self.settings.patch_root)
        for name in disk.names():
            if name not in held and name not in deleted:
                stored = disk.load_record(name)
                if stored is None:  # removed since the listing
                    continue
                try:
                    self._check_name(name)
                    self._verify(stored.data, stored.signature)
                    self._validate(stored.data)
                except ServiceError as e:
                    log.warning("not seeding patch %s: %s", name, e.message)
                    continue
                # generation 1: a shipped file is older than any write made through the API
                held[name] = (stored.data, stored.signature, version_of(stored.data), 1, stored.owner)
        filled = sum(bool(self.store.save(name, data, version, generation, signature, refill=True, owner=owner))
                     for name, (data, signature, version, generation, owner) in held.items())
        for name, generation in deleted.items():
            self.store.delete(name, generation, refill=True)
        self._redis.mark_seeded()  # after the writes, so no replica reads a half-filled Redis as the truth
        log.info("filled redis: %d patch(es) written, %d not (newer writes there), %d delete(s)", filled,
                 len(held) - filled, len(deleted))

    def _listen(self) -> None:
        """Follow pub/sub; on any Redis error, reconnect and resync everything (missed messages included)."""
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._redis.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                self._resync()
                self.connected = True
                last = time.monotonic()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message and message.get("type") == "message":
                        self._on_event(message["data"])
                    if time.monotonic() - last > RESYNC_SECONDS:
                        self._resync()  # also notices a Redis that stopped answering
                        last = time.monotonic()
            except (redis.RedisError, OSError) as e:
                if self.connected:
                    log.warning("lost redis (%s); retrying", e.__class__.__name__)
                self.connected = False
                self._stop.wait(0.3)
            except Exception:  # a bug or data nobody foresaw: unready, resync from scratch, never a dead thread
                log.exception("patch sync failed; resynchronising")
                self.connected = False
                self._stop.wait(0.3)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def _on_event(self, raw: bytes) -> None:
        event = parse_event(raw)
        if event is None:
            self._report("event", "ignoring a malformed message on %s (logged once): %r", CHANNEL, raw[:200])
            return
        name = event["name"]
        if event.get("origin") == self.origin:
            return
        if event.get("op") == "delete":
            with self._lock:
                record = self.records.get(name)
                if record is not None:  # the delete's generation, as exact as Redis still knows it
                    self._forget(name, max(record.generation + 1, self._redis.deleted_generation(name)))
        else:
            self._load(name, self.store.load_record(name))

    def _resync(self) -> None:
        """Make local records match Redis: load new or changed versions, forget deleted names."""
        self._populate()
        with self._lock:
            local = {n: (r.version, r.generation) for n, r in self.records.items()}
        versions, bad = self._redis.versions()  # read after `local`: a name put meanwhile is not taken as deleted
        for field in bad:
            self._report(("field", field), "skipping field %r of the patch versions hash: not a patch name", field)
        for name in set(local) - set(versions):
            with self._lock:
                record = self.records.get(name)
                if record is None or record.generation != local[name][1]:
                    continue  # changed since the snapshot: the next resync looks again
                if not self._refill_if_newer(name, 0):  # gone without a newer delete: Redis lost it, put back
                    self._forget(name, record.generation + 1)
        for name, version in versions.items():
            if local.get(name, (None,))[0] != version:
                self._load(name, self.store.load_record(name))
