"""The engine facade: loads bases and patches, resolves requests, admits them (bounded), warms up, drains."""
from __future__ import annotations

import difflib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from app.core.config import Settings
from app.core.errors import BadRequest, InvalidRequest, NotFound, Overloaded, PatchNotReady, Unavailable
from app.core.metrics import Metrics
from app.core.redis import redis_client
from app.engine.bases import ServedBase, load_bases
from app.engine.batcher import Batcher
from app.engine.cache import ResultCache
from app.engine.work import Progress, Result, Spec, Work, preview_steps
from app.model import kernels
from app.model.sampling import TRAIN_TIMESTEPS, new_job
from app.registry.registry import PatchRegistry

log = logging.getLogger("dmp.engine")


class NoServableBase(RuntimeError):
    """Nothing to serve: `python -m app serve` exits non-zero rather than stay up unready forever."""


def class_id(base: ServedBase, name: str) -> int:
    """A class label given by name (any synonym, any case) -> its id; unknown: 400 naming up to 3 close ones."""
    key = name.strip().lower()
    if key in base.label_ids:
        return base.label_ids[key]
    if not base.label_ids:
        raise BadRequest(f"model {base.name} has no class names: send class_label as a number",
                         error_type="unknown_class")
    close = difflib.get_close_matches(key, base.label_ids, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise BadRequest(f"model {base.name} has no class named {name!r}{hint}", error_type="unknown_class")


class Engine:
    """Owns the bases, the patch registry and the batcher; the HTTP layer and the CLI both go through it."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.metrics.max_queue.set(settings.max_queue)  # alerts compare dmp_inflight with it
        self.bases: dict[str, ServedBase] = {}
        self.skipped: dict[str, str] = {}  # DMP_MODEL_DIR entries not served, and why
        self.registry: PatchRegistry | None = None
        self.batcher: Batcher | None = None
        self.cache: ResultCache | None = None
        self.redis = None
        self.state = "starting"  # starting -> warming -> ready -> draining -> stopped; or failed
        self.error: str | None = None
        self._inflight = 0
        self._lock = threading.Condition()
        self._encoder_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load bases and patches, start the runner, warm up; blocking (run it in a thread to stay live)."""
        try:
            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)  # shared CPUs: fewer threads, less spinning
            self.bases, self.skipped = load_bases(self.settings, self.metrics)
            if not self.bases:
                raise NoServableBase(f"no servable base model in {self.settings.model_dir}"
                                     + (f"; {self.skipped_detail()}" if self.skipped else ""))
            self.metrics.fused_kernels.set(int(kernels.active(self.settings.torch_device)))
            if self.settings.redis_url:
                self.redis = redis_client(self.settings)
                if self.settings.cache_ttl > 0:
                    secret = self.settings.cache_secret
                    self.cache = ResultCache(self.redis, self.settings.cache_ttl, self.metrics,
                                             secret.get_secret_value().encode() if secret else secrets.token_bytes(32))
            self.registry = PatchRegistry(self.settings, self.bases, self.metrics, client=self.redis)
            self.registry.start()
            for base in self.bases.values():
                if base.forward is not None:
                    # one CUDA graph / compiled CPU step per batch bucket, before the runner starts
                    base.forward.capture(progress=f"graphs {base.name}")
            self.batcher = Batcher(self.bases, self.settings.max_batch, self.settings.torch_dtype, self.metrics)
            self.batcher.start()
            self.state = "warming"
            if self.settings.warmup:
                self._warm_up()
            if self.state == "warming":
                self.state = "ready"
            log.info("engine ready: %d base(s) on %s", len(self.bases), self.settings.torch_device)
        except NoServableBase as e:
            log.error("engine failed to start: %s", e)  # a configuration fact, not a bug: no traceback
            self.state, self.error = "failed", str(e)
        except Exception as e:
            log.exception("engine failed to start")
            self.state, self.error = "failed", f"{e.__class__.__name__}: {e}"

    def start_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.start, name="dmp-start", daemon=True)
        thread.start()
        return thread

    def _warm_up(self) -> None:
        """One tiny generation per base, so the first real request pays no first-call costs."""
        for base in self.bases.values():
            spec = self.resolve(model=base.name, class_label=0 if base.task == "class" else None,
                                caption="warm-up" if base.task == "text" else None, steps=1, seed=0)
            self.submit(spec, internal=True).future.result(
                timeout=self.settings.request_timeout)

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
        if self.batcher is not None:
            self.batcher.stop()
        if self.registry is not None:
            self.registry.stop()
        if self.redis is not None:
            self.redis.close()

    @property
    def inflight(self) -> int:
        return self._inflight

    # ------------------------------------------------------------------ requests

    def base(self, name: str) -> ServedBase:
        if name not in self.bases:
            raise NotFound(f"no model named {name!r}; served: {', '.join(self.bases) or 'none'}",
                           error_type="model_not_found")
        return self.bases[name]

    def resolve(self, *, model: str | None = None, patch: str | None = None, class_label: int | str | None = None,
                caption: str | None = None, num_images: int = 1, steps: int | None = None,
                sampler: str | None = None, guidance_scale: float | None = None, seed: int | None = None,
                output_format: str = "png") -> Spec:
        """Check a request against the served bases and limits and fill in every default."""
        s = self.settings
        if self.registry is None:
            raise Unavailable("the service is still starting", error_type="not_ready")
        record = self.registry.get(patch) if patch is not None else None
        if record is not None and record.state != "ready":
            raise PatchNotReady(f"patch {patch!r} is {record.state}" + (f": {record.error}" if record.error else ""))
        if model is None:
            if record is not None and record.base is not None:
                model = record.base
            elif len(self.bases) == 1:
                model = next(iter(self.bases))
            else:
                raise InvalidRequest(f"say which model: this server serves {', '.join(self.bases) or 'none'}",
                                     error_type="model_required")
        base = self.base(model)
        if record is not None and record.base != base.name:
            raise InvalidRequest(f"patch {patch!r} is for model {record.base!r}, not {base.name!r}",
                                 error_type="patch_model_mismatch")
        task = base.task
        if task == "class":
            if caption is not None:
                raise InvalidRequest(f"model {base.name} is class-conditional: send class_label, not caption")
            if class_label is None:
                raise InvalidRequest(f"model {base.name} needs class_label in [0, {base.config.num_classes})")
            if isinstance(class_label, str):
                class_label = class_id(base, class_label)
            if not 0 <= class_label < base.config.num_classes:
                raise InvalidRequest(f"class_label must be in [0, {base.config.num_classes}), got {class_label}")
        elif task == "text":
            if class_label is not None:
                raise InvalidRequest(f"model {base.name} is text-conditional: send caption, not class_label")
            if caption is None or not caption.strip():
                raise InvalidRequest(f"model {base.name} needs a non-empty caption")
            if len(caption) > s.max_caption_chars:
                raise InvalidRequest(f"caption is {len(caption)} characters, over {s.max_caption_chars}")
        elif class_label is not None or caption is not None:
            raise InvalidRequest(f"model {base.name} is unconditional: send neither class_label nor caption")
        if num_images > s.max_images:
            raise InvalidRequest(f"num_images must be at most {s.max_images} (DMP_MAX_IMAGES)")
        sampler = sampler or base.default_sampler
        # DPM-Solver++ over all 1000 training steps reaches sigma = 0 and returns NaN: one step fewer is fine
        max_steps = min(s.max_steps, TRAIN_TIMESTEPS - (sampler == "dpm"))
        steps = min(base.default_steps, max_steps) if steps is None else steps
        if not 1 <= steps <= max_steps:
            raise InvalidRequest(f"steps must be in [1, {max_steps}] for sampler {sampler}, got {steps}")
        if steps * num_images > s.max_cost:
            raise InvalidRequest(f"steps * num_images = {steps * num_images} is over DMP_MAX_COST={s.max_cost}",
                                 error_type="cost_too_high")
        guidance = base.default_guidance if guidance_scale is None else float(guidance_scale)
        if task == "uncond":
            guidance = 1.0  # nothing to guide towards
        seed = secrets.randbits(31) if seed is None else seed
        return Spec(base.name, patch, class_label, caption, num_images, steps, sampler, guidance, seed,
                    output_format)

    def condition(self, base: ServedBase, spec: Spec) -> torch.Tensor:
        """The model's y for this request: a label, the null class, or the caption's embedding (1, text_dim)."""
        if base.task == "text":
            return self.encode(base, spec.caption)
        return torch.tensor(spec.class_label if base.task == "class" else 0)

    def encode(self, base: ServedBase, caption: str) -> torch.Tensor:
        """A caption's embedding (1, text_dim); one encoder call at a time."""
        with self._encoder_lock:
            return base.text_encoder.encode([caption])

    def check_admitting(self, internal: bool = False) -> None:
        """503 while draining or not ready (warm-up work is internal and may run before ready)."""
        if self.state in ("draining", "stopped"):
            raise Unavailable("the service is draining before shutdown", error_type="draining")
        if self.state != "ready" and not internal:
            raise Unavailable(f"the service is {self.state}", error_type="not_ready")

    def submit(self, spec: Spec, y: torch.Tensor | None = None, internal: bool = False,
               listener: Callable[[Progress], None] | None = None, previews: int = 0) -> Work:
        """Admit a request (bounded by DMP_MAX_QUEUE), pin its patch version, queue it for the batcher.

        `listener` hears every step of this request (on the runner thread); `previews` of those steps, evenly
        spaced, also carry the predicted clean sample.

        Admission comes first, then the expensive part: the condition (`y`, e.g. the caption's embedding) unless
        given, and pinning, which may read the patch back from the store: call it off the event loop.
        The device slot is taken later, by the runner, when the request joins the batch."""
        self.check_admitting(internal)
        with self._lock:
            if self._inflight >= self.settings.max_queue:
                raise Overloaded(f"{self._inflight} requests in flight (DMP_MAX_QUEUE={self.settings.max_queue}); "
                                 "retry later")
            self._inflight += 1
            self.metrics.inflight.set(self._inflight)
        base, pin = self.bases[spec.model], None
        try:
            if y is None:
                y = self.condition(base, spec)
            if spec.patch is not None:
                record = self.registry.get(spec.patch)
                if record.base != base.name:
                    raise InvalidRequest(f"patch {spec.patch!r} is for model {record.base!r}",
                                         error_type="patch_model_mismatch")
                pin = base.patches.acquire(spec.patch, self.registry.fetch) if record.state == "ready" else None
                if pin is None:  # not ready, or deleted between the lookup and the pin
                    raise PatchNotReady(f"patch {spec.patch!r} is {'gone' if record.state == 'ready' else record.state}")
            job = new_job(base.model, y=y, seed=spec.seed, sampler=spec.sampler, steps=spec.steps,
                          guidance_scale=spec.guidance_scale, n=spec.num_images,
                          beta_schedule=base.beta_schedule, clip_sample=base.clip_sample,
                          device=self.settings.torch_device, dtype=self.settings.torch_dtype)
        except BaseException:
            if pin is not None:
                base.patches.release(pin)
            self._done(None)
            raise
        work = Work(spec, job, pin, deadline=time.monotonic() + self.settings.request_timeout, listener=listener,
                    preview_at=preview_steps(spec.steps, previews) if listener else frozenset())
        work.future.add_done_callback(self._done)
        self.batcher.put(work)
        return work

    def _done(self, _future: Future | None) -> None:
        with self._lock:
            self._inflight -= 1
            self.metrics.inflight.set(self._inflight)
            self._lock.notify_all()

    def generate(self, **request) -> tuple[Spec, Result]:
        """Blocking generation for the CLI: the same resolve -> condition -> submit path as HTTP."""
        spec = self.resolve(**request)
        work = self.submit(spec)
        return spec, work.future.result(timeout=self.settings.request_timeout)

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
        self.metrics.ready.set(1 if self.readiness()[0] else 0)
        self.metrics.refresh_device_memory(self.settings.torch_device)
