"""Step-level batcher: one runner thread owns the device and advances every running job of a base together.

Each loop iteration picks a base (round robin), lets waiting requests of that base join its running set at
this step boundary, shares the step's DMP_MAX_BATCH images between the running requests (least progress first),
runs one `denoise_step` for them (each job carries its own timestep, sampler and patch slot), then decodes and
answers the jobs that finished. Sharing rows at every step is what keeps a small request's latency independent of
big ones admitted before it: a 5-step request behind two 1000-step x 8-image ones takes 5 steps, not 1000.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from app.core.errors import ClientGone, ServiceError, Unavailable
from app.core.metrics import Metrics
from app.engine.bases import ServedBase
from app.engine.share import share
from app.engine.work import Progress, Result, Work, past_deadline
from app.model.sampling import denoise_step, eager_step
from app.model.vae import to_uint8

log = logging.getLogger("dmp.batcher")


class Batcher:
    """Waiting queues per base, the running batch per base, and the runner thread."""

    def __init__(self, bases: dict[str, ServedBase], max_batch: int, dtype, metrics: Metrics):
        self.bases, self.max_batch, self.metrics = bases, max_batch, metrics
        # each base's step: its bucketed graphs, or the eager forward; both read patches from the pool's slots
        self.steps = {name: b.forward.step if b.forward is not None else
                      eager_step(b.model, b.patches.pool, dtype=dtype) for name, b in bases.items()}
        self.waiting: dict[str, deque[Work]] = {name: deque() for name in bases}
        self.running: dict[str, list[Work]] = {name: [] for name in bases}  # runner thread only
        self.calls: deque[tuple[Callable, Future]] = deque()  # other device work (gate maps), between steps
        self.cond = threading.Condition()
        self.stopping = False
        self._turn = 0
        self.thread = threading.Thread(target=self._loop, name="dmp-runner", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def put(self, work: Work) -> None:
        with self.cond:
            work.ahead = len(self.waiting[work.spec.model])
            self.waiting[work.spec.model].append(work)
            self.metrics.queue_depth.inc()
            self.cond.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the runner thread, which owns the device, between two steps; its outcome in the future."""
        future: Future = Future()
        with self.cond:
            if self.stopping:
                raise Unavailable("the service is shutting down", error_type="shutting_down")
            self.calls.append((fn, future))
            self.cond.notify()
        return future

    # ------------------------------------------------------------------ runner thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self._has_work():
                    self.cond.wait()
                if self.stopping:
                    break
                # at most one call per step: queued gate maps cannot starve generation, nor the reverse
                call = self.calls.popleft() if self.calls else None
                name = self._next_base()
                if name is not None:
                    self._join_waiting(name)
            if call is not None:
                self._run_call(*call)
            if name is not None:
                self._step(name)
        self._fail_all(Unavailable("the service is shutting down", error_type="shutting_down"))

    def _has_work(self) -> bool:
        return bool(self.calls) or any(self.waiting[n] or self.running[n] for n in self.bases)

    @staticmethod
    def _run_call(fn: Callable, future: Future) -> None:
        if not future.set_running_or_notify_cancel():  # its caller gave up while it waited
            return
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)

    def _next_base(self) -> str | None:
        """Round robin over bases that have work, so one busy base cannot starve another."""
        names = list(self.bases)
        for i in range(len(names)):
            name = names[(self._turn + i) % len(names)]
            if self.waiting[name] or self.running[name]:
                self._turn = (self._turn + i + 1) % len(names)
                return name
        return None

    def _join_waiting(self, name: str) -> None:
        """Move waiting requests into the running set, oldest first, as far as the base's slots seat their patch
        versions (PatchSlots.seat_waiting; the rest keep waiting); caller holds the lock."""
        queue = self.waiting[name]
        live, kept = [w for w in queue if not self._dropped(w)], []
        for work, mix in zip(live, self.bases[name].patches.seat_waiting([w.pin for w in live]), strict=True):
            if mix is None:
                kept.append(work)
            else:
                work.running_job.mix, work.seated = mix, work.pin is not None
                self.running[name].append(work)
        self.metrics.queue_depth.dec(len(queue) - len(kept))
        queue.clear()
        queue.extend(kept)

    def _dropped(self, work: Work) -> bool:
        """Finish work whose deadline passed or whose client left; True if it was dropped. The deadline is checked
        first: a handler that gives up at the deadline also cancels the work, and that is a deadline cut."""
        if time.monotonic() > work.deadline:
            self.metrics.dropped.labels("deadline").inc()
            self._finish(work, error=past_deadline())
            return True
        if work.cancelled.is_set() or work.future.cancelled():
            self.metrics.dropped.labels("disconnected").inc()
            self._finish(work, error=ClientGone("the client went away"))
            return True
        return False

    def _step(self, name: str) -> None:
        base = self.bases[name]
        running = [w for w in self.running[name] if not self._dropped(w)]
        self.running[name] = running
        if not running:
            return
        works = share(running, self.max_batch)
        now = time.perf_counter()
        for w in works:
            w.started_at = w.started_at or now
        images = sum(w.images for w in works)
        self.metrics.batch_size.labels(name).observe(images)
        self.metrics.batch_occupancy.labels(name).observe(images / self.max_batch)
        previews = frozenset(w.running_job for w in works if w.running_job.index + 1 in w.preview_at)
        try:
            x0s = denoise_step(base.model, [w.running_job for w in works], step=self.steps[name], previews=previews)
        except Exception as e:  # a crash in one step fails that batch, never the runner
            log.exception("denoising step failed for base %s", name)
            self.running[name] = [w for w in running if w not in works]
            for w in works:
                self._finish(w, error=e)
            return
        self.running[name] = [w for w in running if not w.running_job.done]
        for w in works:
            job = w.running_job
            if w.follow:
                w.report(Progress(job.index, len(job.t_list), self._preview(base, x0s.get(job))))
            if job.done:
                self._decode(base, w)

    @staticmethod
    def _preview(base: ServedBase, x0) -> torch.Tensor | None:
        """A preview decoded here, where the device is owned; a failed decode costs the preview, not the request."""
        if x0 is None:
            return None
        try:
            return to_uint8(base.vae.decode(x0))  # (n, H, W, C)
        except Exception:
            log.exception("preview decode failed for base %s", base.name)
            return None

    def _decode(self, base: ServedBase, work: Work) -> None:
        sampled = time.perf_counter()
        try:
            images = to_uint8(base.vae.decode(work.running_job.latents))  # (n, H, W, C)
        except Exception as e:
            log.exception("decode failed for base %s", base.name)
            self._finish(work, error=e)
            return
        done, started = time.perf_counter(), work.started_at
        assert started is not None, "set when the work joined its first step"
        timings = {"queue_ms": 1000 * (started - work.admitted_at),
                   "sample_ms": 1000 * (sampled - started), "decode_ms": 1000 * (done - sampled)}
        versions = tuple(v.version for v in work.pin.versions) if work.pin else None
        self._finish(work, result=Result(images, versions, timings))

    def _finish(self, work: Work, result: Result | None = None, error: BaseException | None = None) -> None:
        if work.pin is not None:
            self.bases[work.spec.model].patches.release(work.pin, seated=work.seated)
            work.pin, work.seated = None, False
        if work.future.done():
            return
        try:
            if error is not None:
                work.future.set_exception(error)
            else:
                work.future.set_result(result)
        except Exception:  # the waiter cancelled the future in between: nobody to answer
            pass

    def _fail_all(self, error: ServiceError) -> None:
        with self.cond:
            pending = [w for q in self.waiting.values() for w in q] + [w for r in self.running.values() for w in r]
            calls, self.calls = list(self.calls), deque()
            for q in self.waiting.values():
                self.metrics.queue_depth.dec(len(q))
                q.clear()
            for name in self.running:
                self.running[name] = []
        for w in pending:
            self._finish(w, error=error)
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
