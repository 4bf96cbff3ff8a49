"""The engine facade: loads bases and patches, resolves requests, admits them (bounded), warms up, drains."""
from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager, suppress

import redis
import torch
from anyio import to_thread

from app.core.config import Settings
from app.core.errors import InvalidRequest, NotFound, Overloaded, PatchNotReady, Unavailable
from app.core.metrics import Metrics
from app.core.redis import redis_client
from app.engine import validation
from app.engine.allocator import keep_freed_memory
from app.engine.bases import ServedBase, load_bases
from app.engine.batcher import Batcher
from app.engine.cache import ResultCache
from app.engine.slots import Pins
from app.engine.work import Done, Inbox, Spec, Work, preview_steps
from app.model import kernels
from app.model.sampling import new_job
from app.registry.registry import PatchRegistry

QUIET_WAIT = 1.0  # the most background work waits so: under endless interactive load it still goes on

log = logging.getLogger("dmp.engine")


class NoServableBase(RuntimeError):
    """Nothing to serve: `python -m app serve` exits non-zero rather than stay up unready forever."""


class Engine:
    """Owns the bases, the patch registry and the batcher; the HTTP layer and the CLI both go through it."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, only: str | None = None):
        self.settings, self.only = settings, only  # only: serve just this base (the CLI's one generation)
        self.metrics = metrics or Metrics()
        self.metrics.max_queue.set(settings.max_queue)  # alerts compare dmp_inflight with it
        self.bases: dict[str, ServedBase] = {}
        self.skipped: dict[str, str] = {}  # DMP_MODEL_DIR entries not served, and why
        self.registry: PatchRegistry | None = None
        self.batcher: Batcher | None = None
        self.cache: ResultCache | None = None
        self.redis: redis.Redis | None = None
        self.state = "starting"  # starting -> warming -> ready -> draining -> stopped; or failed
        self.error: str | None = None
        self._inflight = 0
        self._background = 0  # background requests in flight: bounded by DMP_MAX_BACKGROUND, not DMP_MAX_QUEUE
        self._lock = threading.Condition()
        # (loop, future) of each interactive_quiet waiting for _inflight to reach 0: woken, not polling, so waiting
        # batch lines take no GIL from the runner
        self._quiet_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._encoder_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load bases and patches, start the runner, warm up; blocking (run it in a thread to stay live)."""
        try:
            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)  # shared CPUs: fewer threads, less spinning
            if self.settings.cpu_malloc_keep and torch.device(self.settings.torch_device).type == "cpu":
                log.info("malloc: %s", keep_freed_memory())
            self.bases, self.skipped = load_bases(self.settings, self.metrics, self.only)
            if not self.bases:
                raise NoServableBase(f"no servable base model in {self.settings.model_dir}"
                                     + (f"; {self.skipped_detail()}" if self.skipped else ""))
            self.metrics.fused_kernels.set(int(kernels.active(self.settings.torch_device)))
            if self.settings.redis_url:
                self.redis = client = redis_client(self.settings)
                if self.settings.cache_ttl > 0:
                    secret = self.settings.cache_secret
                    self.cache = ResultCache(client, self.settings.cache_ttl, self.metrics,
                                             secret.get_secret_value().encode() if secret else secrets.token_bytes(32))
            self.registry = PatchRegistry(self.settings, self.bases, self.metrics, client=self.redis)
            self.registry.start()
            for base in self.bases.values():
                if base.forward is not None:
                    # one CUDA graph / compiled CPU step per batch bucket, before the runner starts
                    base.forward.capture(progress=f"graphs {base.name}")
            self.batcher = Batcher(self.bases, self.settings.max_batch, self.settings.torch_dtype, self.metrics,
                                   self.settings.scheduler, self.settings.background_slowdown,
                                   self.settings.background_step, self.settings.background_grace,
                                   bind=self.settings.torch_threads if self.settings.cpu_bind
                                   and self.settings.torch_device == "cpu" else 0,
                                   threads=self.settings.torch_threads)
            self.batcher.start()
            self.state = "warming"
            if self.settings.warmup:
                self._warm_up()
            if self.state == "warming":
                self._freeze_heap()
                self.state = "ready"
            log.info("engine ready: %d base(s) on %s", len(self.bases), self.settings.torch_device)
        except NoServableBase as e:
            log.error("engine failed to start: %s", e)  # a configuration fact, not a bug: no traceback
            self.state, self.error = "failed", str(e)
        except Exception as e:
            log.exception("engine failed to start")
            self.state, self.error = "failed", f"{e.__class__.__name__}: {e}"

    @staticmethod
    def _freeze_heap() -> None:
        """Move what loading and compiling left (kept for the process's life) out of the cyclic collector's sight.

        A full collection walks every tracked object with the GIL held: after compiling the demo base's CPU graphs
        that is ~750K objects and 361-557 ms (bench/results/2026-12-06-cpu-gc-full-collection.log), a stall of the
        runner, which needs the GIL after every step; frozen, a full collection walks only what came after.
        Garbage first, so only live objects are frozen."""
        gc.collect()
        gc.freeze()

    def start_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.start, name="dmp-start", daemon=True)
        thread.start()
        return thread

    def _warm_up(self) -> None:
        """One tiny generation per base, so the first real request pays no first-call costs."""
        for base in self.bases.values():
            spec = self.resolve(model=base.name, class_label=0 if base.task == "class" else None,
                                caption="warm-up" if base.task == "text" else None, steps=1, seed=0)
            asyncio.run(self._outcome(spec, internal=True))

    def readiness(self) -> tuple[bool, str, str]:
        """(ready, error_type, message) for /health/ready."""
        if self.state == "failed":
            return False, "startup_failed", f"startup failed: {self.error}"
        if self.state in ("starting", "warming"):
            return False, "not_ready", f"the service is {self.state}"
        if self.state in ("draining", "stopped"):
            return False, "draining", "the service is draining before shutdown"
        if not self.bases:
            return False, "no_models", f"no servable base model in {self.settings.model_dir}" + (
                f"; {self.skipped_detail()}" if self.skipped else "")
        assert self.registry is not None, "made by start() before the state is ready"
        ok, why = self.registry.healthy()
        if not ok:
            return False, "registry_unavailable", why
        return True, "", "ready"

    def skipped_detail(self) -> str:
        """One line naming every DMP_MODEL_DIR entry not served, with the reason."""
        return "not served: " + "; ".join(f"{name}: {why}" for name, why in sorted(self.skipped.items()))

    def drain(self, timeout: float) -> bool:
        """Stop admitting, wait up to `timeout` s for in-flight requests; True if all finished."""
        if self.state not in ("failed", "stopped"):
            self.state = "draining"
        end = time.monotonic() + timeout
        with self._lock:
            while self._inflight and time.monotonic() < end:
                self._lock.wait(end - time.monotonic())
            return self._inflight == 0

    def cut(self) -> None:
        """End of the drain: the runner stops after its current step and answers every request it still holds
        with 503 shutting_down (their handlers reply that, as JSON)."""
        self.state = "stopped"
        if self.batcher is not None:
            self.batcher.stop()

    def stop(self) -> None:
        self.state = "stopped"
        gc.unfreeze()  # what this engine held may become garbage now (many engines in one process: tests)
        if self.batcher is not None:
            self.batcher.stop()
        if self.registry is not None:
            self.registry.stop()
        if self.redis is not None:
            self.redis.close()

    @property
    def inflight(self) -> int:
        return self._inflight

    async def interactive_quiet(self) -> None:
        """Return once no interactive request is in flight (or after QUIET_WAIT): background work does its own Python
        (a batch line's PNG, answer file, next line) then, not beside a request whose steps it would slow through
        the GIL."""
        loop = asyncio.get_running_loop()
        quiet = loop.create_future()
        with self._lock:
            if not self._inflight:
                return
            self._quiet_waiters.append((loop, quiet))
        try:
            await asyncio.wait_for(quiet, QUIET_WAIT)
        except TimeoutError:
            with self._lock:  # under endless interactive load the list would otherwise only grow
                if (loop, quiet) in self._quiet_waiters:
                    self._quiet_waiters.remove((loop, quiet))

    # ------------------------------------------------------------------ requests

    def base(self, name: str) -> ServedBase:
        if name not in self.bases:
            raise NotFound(f"no model named {name!r}; served: {', '.join(self.bases) or 'none'}",
                           error_type="model_not_found")
        return self.bases[name]

    def resolve(self, *, model: str | None = None, patch: str | None = None, class_label: int | str | None = None,
                caption: str | None = None, num_images: int = 1, steps: int | None = None,
                sampler: str | None = None, guidance_scale: float | None = None, seed: int | None = None,
                output_format: str = "png", patch_scale: float | None = None, patches: list | None = None,
                seeds: list[int] | None = None, negative_class_label: int | str | None = None,
                tenant: str | None = None) -> Spec:
        """Check a request against the served bases and limits (app.engine.validation) and fill in every default.
        `patch` + `patch_scale`, or `patches` [{name, scale}]: every patch must be ready and of the one base;
        `tenant`: the caller's (PatchRegistry.get: another tenant's patch is unknown here)."""
        if self.registry is None:
            raise Unavailable("the service is still starting", error_type="not_ready")
        # a composition needs all its patches in device slots at once; slot 0 is the base
        pairs = validation.mix(patch, patch_scale, patches, min(validation.MIX_WIDTH, self.settings.patch_slots - 1))
        records = [validation.ready(self.registry.get(name, tenant)) for name, _ in pairs]
        base = self.base(validation.base_name(self.bases, model, records[0] if records else None))
        for record in records:
            if record.base != base.name:
                raise InvalidRequest(f"patch {record.name!r} is for model {record.base!r}, not {base.name!r}",
                                     error_type="patch_model_mismatch")
        return validation.spec(self.settings, base, patch, class_label, caption, num_images, steps, sampler,
                               guidance_scale, seed, output_format, patches=pairs, seeds=seeds,
                               negative_label=negative_class_label)

    def condition(self, base: ServedBase, spec: Spec) -> torch.Tensor:
        """The model's y for this request: a label, the null class, or the caption's embedding (1, text_dim)."""
        if base.task == "text":
            assert spec.caption is not None, "validation requires a caption of a text model"
            return self.encode(base, spec.caption)
        return torch.tensor(spec.class_label if base.task == "class" else 0)

    def encode(self, base: ServedBase, caption: str) -> torch.Tensor:
        """A caption's embedding (1, text_dim); one encoder call at a time."""
        assert base.text_encoder is not None, "a text model is served with its encoder"
        with self._encoder_lock:
            return base.text_encoder.encode([caption])

    def check_admitting(self, internal: bool = False) -> None:
        """503 while draining or not ready (warm-up work is internal and may run before ready)."""
        if self.state in ("draining", "stopped"):
            raise Unavailable("the service is draining before shutdown", error_type="draining")
        if self.state != "ready" and not internal:
            raise Unavailable(f"the service is {self.state}", error_type="not_ready")

    @contextmanager
    def admission(self, internal: bool = False):
        """Hold one of DMP_MAX_QUEUE places for the block (429 when none is free; 503 while not admitting)."""
        self._admit(internal)
        try:
            yield
        finally:
            self._done(None)

    def _admit(self, internal: bool) -> None:
        self.check_admitting(internal)
        with self._lock:
            if self._inflight >= self.settings.max_queue:
                raise Overloaded(f"{self._inflight} requests in flight (DMP_MAX_QUEUE={self.settings.max_queue}); "
                                 "retry later")
            self._inflight += 1
            self.metrics.inflight.set(self._inflight)

    def _admit_background(self) -> None:
        self.check_admitting()
        with self._lock:
            if self._background >= self.settings.max_background:
                raise Overloaded(f"{self._background} background requests in flight "
                                 f"(DMP_MAX_BACKGROUND={self.settings.max_background}); retry later",
                                 error_type="background_full")
            self._background += 1

    def _done_background(self, _future: Future | None) -> None:
        with self._lock:
            self._background -= 1

    async def open(self, spec: Spec, *, follow: bool = False, previews: int = 0, preview_format: str = "png",
                   internal: bool = False, tenant: str | None = None, background: bool = False) -> Work:
        """Start a request: its Work, whose `events()` is the request's stream (a cache hit's is its Done alone).

        Refusals (draining, queue full, deadline unreachable, patch gone) raise here, before any byte of a reply is
        sent. `follow`: the stream reports every step; `previews` of them, evenly spaced, carry the decoded x0
        prediction. `tenant`: the caller's, as given to resolve (the patch is looked up again here: the name may have
        changed hands since). `background`: batch work, stepped only with the rows interactive requests leave (paused
        at a step boundary while they want them), admitted under DMP_MAX_BACKGROUND with DMP_BACKGROUND_TIMEOUT."""
        started = time.perf_counter()
        self.check_admitting(internal)  # also before the cache: a draining server answers nothing new
        hit = await self._cached(spec, tenant)
        if hit is not None:
            self._observe(spec, hit, time.perf_counter() - started)
            return Work(spec, ready=hit, background=background)
        work = Work(spec, inbox=Inbox(asyncio.get_running_loop()), follow=follow, preview_format=preview_format,
                    preview_at=preview_steps(spec.steps, previews) if follow else frozenset(),
                    on_done=lambda done: self._finished(spec, done, started), background=background)
        # admission, then encoding the condition and pinning (which may read the patch back from the store)
        await to_thread.run_sync(self._submit, work, internal, tenant)
        return work

    def _submit(self, work: Work, internal: bool, tenant: str | None) -> None:
        """Admit (bounded by DMP_MAX_QUEUE, or DMP_MAX_BACKGROUND; under the deadline scheduler only what can finish
        in time), encode the condition, pin the patch versions, make the sampling job and queue the work. The device
        slot is taken later, by the runner, when the request joins the batch."""
        assert self.registry is not None and self.batcher is not None, "admitting starts after start()"
        registry, batcher = self.registry, self.batcher
        if work.background:
            self._admit_background()
            done, timeout = self._done_background, self.settings.background_timeout
        else:
            self._admit(internal)
            done, timeout = self._done, self.settings.request_timeout
        work.deadline = time.monotonic() + timeout
        try:
            if not internal:
                batcher.admit(work)
        except BaseException:
            done(None)
            raise
        spec = work.spec
        base = self.bases[spec.model]
        pin = Pins([], [s for _, s in spec.patches]) if spec.patches else None
        try:
            y = self.condition(base, spec)
            for name, _ in spec.patches:  # every patch of the request pinned for its life
                assert pin is not None, "made above for a request with patches"
                record = registry.get(name, tenant)
                if record.base != base.name:
                    raise InvalidRequest(f"patch {name!r} is for model {record.base!r}",
                                         error_type="patch_model_mismatch")
                version = base.patches.acquire(name, registry.fetch) if record.state == "ready" else None
                if version is None:  # not ready, or deleted between the lookup and the pin
                    state = "gone" if record.state == "ready" else record.state
                    raise PatchNotReady(f"patch {name!r} is {state}")
                pin.versions.append(version)
            work.job = new_job(base.model, y=y, seed=list(spec.seeds) or spec.seed, sampler=spec.sampler,
                               steps=spec.steps, guidance_scale=spec.guidance_scale, n=spec.num_images,
                               negative=spec.negative_class_label, beta_schedule=base.beta_schedule,
                               clip_sample=base.clip_sample, device=self.settings.torch_device)
        except BaseException:
            if pin is not None:
                base.patches.release(pin)
            batcher.withdraw(work)
            done(None)
            raise
        work.pin = pin
        work.admitted_at = time.perf_counter()
        work.future.add_done_callback(done)
        assert work.inbox is not None, "made with an inbox by generate()"
        work.future.add_done_callback(work.inbox.put)  # after the runner's last report: the result comes last
        batcher.put(work)

    async def _cached(self, spec: Spec, tenant: str | None) -> Done | None:
        """The cached files of a seeded request, or None (cache off, no seed, or a miss)."""
        if self.cache is None or not spec.seeded:
            return None
        assert self.registry is not None, "made by start() before the state is ready"
        versions = tuple(self.registry.get(name, tenant).version for name, _ in spec.patches) or None
        files = await to_thread.run_sync(self.cache.get, self._cache_key(spec, versions))
        if files is None:
            return None
        return Done(files, versions, {"queue_ms": 0.0, "sample_ms": 0.0, "decode_ms": 0.0}, cached=True)

    def _cache_key(self, spec: Spec, versions: tuple[str, ...] | None) -> str:
        assert self.cache is not None, "called only with the cache on"
        return self.cache.key(spec, self.bases[spec.model].fingerprint, versions)

    def _finished(self, spec: Spec, done: Done, started: float) -> None:
        """A fresh result (worker thread): cached when seeded, its stage latencies observed."""
        if self.cache is not None and spec.seeded:
            self.cache.put(self._cache_key(spec, done.versions), done.files)
        self._observe(spec, done, time.perf_counter() - started)

    def _observe(self, spec: Spec, done: Done, total: float) -> None:
        """Stage latencies and images generated; a cache hit generated nothing and is counted on its own."""
        m, labels = self.metrics, (spec.model, spec.patch or "base")
        if done.cached:
            m.images_cached.labels(*labels).inc(spec.num_images)
            return
        m.queue_seconds.labels(*labels).observe(done.timings["queue_ms"] / 1000)
        m.sample_seconds.labels(*labels).observe(done.timings["sample_ms"] / 1000)
        m.decode_seconds.labels(*labels).observe(done.timings["decode_ms"] / 1000)
        m.total_seconds.labels(*labels).observe(total)
        m.images.labels(*labels).inc(spec.num_images)

    def _done(self, _future: Future | None) -> None:
        with self._lock:
            self._inflight -= 1
            self.metrics.inflight.set(self._inflight)
            self._lock.notify_all()
            woken = self._quiet_waiters if not self._inflight else []
            if woken:
                self._quiet_waiters = []
        for loop, quiet in woken:
            with suppress(RuntimeError):  # the waiter's loop ended meanwhile: nobody left to wake
                loop.call_soon_threadsafe(_wake, quiet)

    def generate(self, **request) -> tuple[Spec, Done]:
        """Blocking generation for the CLI: the same resolve -> open -> stream path as HTTP."""
        spec = self.resolve(**request)
        return spec, asyncio.run(self._outcome(spec))

    async def _outcome(self, spec: Spec, internal: bool = False) -> Done:
        return await (await self.open(spec, internal=internal)).outcome()

    def refresh_gauges(self) -> None:
        """Slot, version and device gauges, read at scrape time."""
        for base in self.bases.values():
            stats = base.patches.stats()
            self.metrics.slots_in_use.labels(base.name).set(stats["slots"])
            self.metrics.versions_held.labels(base.name).set(stats["held"])
            self.metrics.patch_host_bytes.labels(base.name).set(stats["host_bytes"])
            if base.forward is not None:
                for kind, count in base.forward.stats().items():
                    self.metrics.graph_forwards.labels(base.name, kind).set(count)
        if self.batcher is not None:
            self.metrics.admission_stretch.set(self.batcher.costs.stretch())
        self.metrics.ready.set(1 if self.readiness()[0] else 0)
        self.metrics.refresh_device_memory(self.settings.torch_device)


def _wake(future: asyncio.Future) -> None:
    if not future.done():  # its waiter may have timed out
        future.set_result(None)
