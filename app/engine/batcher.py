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

from app.core.errors import ClientGone, DeadlineExceeded, ServiceError, Unavailable
from app.core.metrics import Metrics
from app.engine.bases import ServedBase
from app.engine.work import Progress, Result, Work
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

    # ------------------------------------------------------------------ runner thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self._has_work():
                    self.cond.wait()
                if self.stopping:
                    break
                name = self._next_base()
                self._join_waiting(name)
            self._step(name)
        self._fail_all(Unavailable("the service is shutting down", error_type="shutting_down"))

    def _has_work(self) -> bool:
        return any(self.waiting[n] or self.running[n] for n in self.bases)

    def _next_base(self) -> str:
        """Round robin over bases that have work, so one busy base cannot starve another."""
        names = list(self.bases)
        for i in range(len(names)):
            name = names[(self._turn + i) % len(names)]
            if self.waiting[name] or self.running[name]:
                self._turn = (self._turn + i + 1) % len(names)
                return name
        raise RuntimeError("no work")  # unreachable: _has_work was checked under the same lock

    def _join_waiting(self, name: str) -> None:
        """Move waiting requests into the running set, oldest first (caller holds the lock); each step then
        advances the share of them that fits one batch (`_share`).

        A request's patch version is seated in a device slot as it joins (a swap-in if it is not resident). When
        every slot is read by running requests, it waits; younger requests may still join patches that are resident,
        except the one whose slot frees soonest (the victim), so the waiting one gets a slot within one request's
        run: requests queue, never fail, and a cold patch is not starved by hot ones."""
        queue, running, patches = self.waiting[name], self.running[name], self.bases[name].patches
        blocked, victim = False, None
        for work in list(queue):
            if not self._dropped(work):
                if work.pin is not None:
                    slot = patches.seat(work.pin, evict=not blocked, avoid=victim)
                    if slot is None:
                        if not blocked:
                            blocked, victim = True, patches.victim()
                        continue
                    work.job.slot, work.seated = slot, True
                running.append(work)
            queue.remove(work)
            self.metrics.queue_depth.dec()

    def _dropped(self, work: Work) -> bool:
        """Finish work whose deadline passed or whose client left; True if it was dropped. The deadline is checked
        first: a handler that gives up at the deadline also cancels the work, and that is a deadline cut."""
        if time.monotonic() > work.deadline:
            self.metrics.dropped.labels("deadline").inc()
            self._finish(work, error=DeadlineExceeded("the request ran past DMP_REQUEST_TIMEOUT"))
            return True
        if work.cancelled.is_set() or work.future.cancelled():
            self.metrics.dropped.labels("disconnected").inc()
            self._finish(work, error=ClientGone("the client went away"))
            return True
        return False

    def _share(self, works: list[Work]) -> list[Work]:
        """The running requests this step advances: least steps done first (then oldest), while their images fit
        in DMP_MAX_BATCH (always at least one). A new request starts ahead of long-running ones and keeps its rows
        until it has caught up with them, so its latency is its own steps, whatever was admitted before it."""
        chosen, room = [], self.max_batch
        for w in sorted(works, key=lambda w: (w.job.index, w.admitted_at)):
            if w.images <= room or not chosen:
                chosen.append(w)
                room -= w.images
        return chosen

    def _step(self, name: str) -> None:
        base = self.bases[name]
        running = [w for w in self.running[name] if not self._dropped(w)]
        self.running[name] = running
        if not running:
            return
        works = self._share(running)
        now = time.perf_counter()
        for w in works:
            w.started_at = w.started_at or now
        images = sum(w.images for w in works)
        self.metrics.batch_size.labels(name).observe(images)
        self.metrics.batch_occupancy.labels(name).observe(images / self.max_batch)
        for w in works:
            w.job.keep_x0 = w.job.index + 1 in w.preview_at
        try:
            denoise_step(base.model, [w.job for w in works], step=self.steps[name])
        except Exception as e:  # a crash in one step fails that batch, never the runner
            log.exception("denoising step failed for base %s", name)
            self.running[name] = [w for w in running if w not in works]
            for w in works:
                self._finish(w, error=e)
            return
        self.running[name] = [w for w in running if not w.job.done]
        for w in works:
            if w.listener is not None:
                self._report(w)
            if w.job.done:
                self._decode(base, w)

    @staticmethod
    def _report(work: Work) -> None:
        """Tell a streaming request that a step is done (and hand it the x0 it asked for); never fails the batch."""
        job = work.job
        x0, job.x0 = (job.x0 if job.keep_x0 else None), None
        try:
            work.listener(Progress(job.index, len(job.t_list), x0))
        except Exception:
            log.exception("progress listener failed")

    def _decode(self, base: ServedBase, work: Work) -> None:
        sampled = time.perf_counter()
        try:
            images = to_uint8(base.vae.decode(work.job.latents))  # (n, H, W, C)
        except Exception as e:
            log.exception("decode failed for base %s", base.name)
            self._finish(work, error=e)
            return
        done = time.perf_counter()
        timings = {"queue_ms": 1000 * (work.started_at - work.admitted_at),
                   "sample_ms": 1000 * (sampled - work.started_at), "decode_ms": 1000 * (done - sampled)}
        version = work.pin.version if work.pin else None
        self._finish(work, result=Result(images, version, timings))

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
            for q in self.waiting.values():
                self.metrics.queue_depth.dec(len(q))
                q.clear()
            for name in self.running:
                self.running[name] = []
        for w in pending:
            self._finish(w, error=error)
