"""Step-level batcher: one runner thread owns the device and advances every running job of a base together.

Each loop iteration picks a base (round robin), lets waiting requests of that base join its running set at
this step boundary, shares the step's DMP_MAX_BATCH images between the running requests (`share`: small requests
fewest steps left first, large ones earliest deadline first, background rows only where interactive ones leave
room), runs one `denoise_step` for them (each job carries its own timestep, sampler and patch slot), times it, then
decodes the jobs that finished (a background job's decode waits while interactive work is queued or running, so
it never stands between an interactive request and its next step); their answers go out as the next forward starts,
or at once when none follows, so the event loop's work for them overlaps a forward that holds no GIL (compiled CPU
graphs, CUDA) rather than the runner's Python between forwards. After an interactive request is
answered, background work waits `grace` seconds more (anticipation, as in the anticipatory disk scheduler): its
response is written and the same client's next request arrives without a background step holding the GIL or the
device in between. Sharing rows at every step is
what keeps a small request's latency independent of big ones admitted before it: a 5-step request behind two
1000-step x 8-image ones takes 5 steps, not 1000. `admit` replays that schedule with the measured step times
(app/engine/eta.py) to refuse, under the deadline policy, a request that could not finish before its deadline or
would make an admitted one miss its own.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

import torch

from app.core.errors import ClientGone, Overloaded, ServiceError, Unavailable
from app.core.metrics import Metrics
from app.engine.affinity import bind_runner
from app.engine.bases import ServedBase
from app.engine.eta import Planned, StepCosts, finish_times, latest_finish
from app.engine.share import Policy, share
from app.engine.work import Progress, Result, Work, past_deadline
from app.model.sampling import denoise_step, eager_step
from app.model.vae import to_uint8

log = logging.getLogger("dmp.batcher")
HEADROOM = 0.9  # admit only what the replay finishes within this share of its time left (estimates drift with load)


class Batcher:
    """Waiting queues per base, the running batch per base, and the runner thread."""

    def __init__(self, bases: dict[str, ServedBase], max_batch: int, dtype, metrics: Metrics,
                 policy: Policy = "deadline", slowdown: float = 0.0, alone: float = 1.0, grace: float = 0.0,
                 bind: int = 0, threads: int = 0):
        self.bases, self.max_batch, self.metrics = bases, max_batch, metrics
        self.bind = bind  # DMP_CPU_BIND: cores of the runner's own (its torch threads); 0 = no binding
        self.threads = threads  # DMP_TORCH_THREADS; 0 = torch's default
        # DMP_SCHEDULER, DMP_BACKGROUND_SLOWDOWN, DMP_BACKGROUND_STEP, DMP_BACKGROUND_GRACE
        self.policy, self.slowdown, self.alone, self.grace = policy, slowdown, alone, grace
        self.answered_at = -math.inf  # monotonic time the last interactive request was answered
        self.costs = StepCosts()
        self.admitted: set[Work] = set()  # admitted by `admit`, not yet `put` (encoding, pinning)
        self._admit_lock = threading.Lock()  # one admission replay at a time, so two cannot both take the last room
        # each base's step: its bucketed graphs, or the eager forward; both read patches from the pool's slots
        self.steps = {name: b.forward.step if b.forward is not None else
                      eager_step(b.model, b.patches.pool, dtype=dtype) for name, b in bases.items()}
        self.waiting: dict[str, deque[Work]] = {name: deque() for name in bases}
        self.running: dict[str, list[Work]] = {name: [] for name in bases}  # runner thread only
        # finished background works (with their patch versions; slots already freed), decoded once no interactive
        # work is left; runner thread only
        self.undecoded: deque[tuple[Work, tuple[str, ...] | None]] = deque()
        self.calls: deque[tuple[Callable, Future]] = deque()  # other device work (gate maps), between steps
        # answers and step reports, handed to the readers when the next forward starts (or when no step follows):
        # a compiled forward holds no GIL, so the HTTP work they wake runs beside it rather than against the
        # runner's Python between forwards (docs/design.md §5); runner thread only
        self.outbox: list[Callable[[], None]] = []
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

    def admit(self, work: Work) -> None:
        """Count `work` as admitted from now on; under the deadline policy first refuse it (429 deadline_unreachable,
        Retry-After the estimated wait) when the replayed schedule finishes it after its deadline, or finishes an
        admitted request late that was on time without it. Background work is never refused here."""
        with self._admit_lock:
            if self.policy == "deadline" and not work.background:
                self._check_reachable(work)
            with self.cond:
                self.admitted.add(work)

    def withdraw(self, work: Work) -> None:
        """An admitted work that will not be `put` (its condition or patch failed)."""
        with self.cond:
            self.admitted.discard(work)

    def _check_reachable(self, work: Work) -> None:
        now = time.monotonic()
        with self.cond:
            pending = [*self.admitted] + [w for q in self.waiting.values() for w in q] + \
                      [w for r in self.running.values() for w in r]
        plans = [_plan(w) for w in pending if w.steps_done < w.steps]
        if not any(not p.background for p in plans):
            return  # nothing interactive ahead: it runs alone, the best it can get
        new = _plan(work)

        def limit(p: Planned) -> float:  # the deadline less a margin for the estimate's error
            return now + HEADROOM * (p.deadline - now)

        # the replay costs ~1 ms of Python (GIL held) at a 24-deep queue; when even its bound finishes every
        # interactive request in time, the replay could only admit
        # the replay's time scale set by how long admitted requests took against theirs
        stretch = self.costs.stretch()
        latest = now + stretch * (latest_finish([*plans, new], self.costs, self.max_batch, now) - now)
        if all(latest <= limit(p) for p in (*plans, new) if not p.background):
            return
        replay = (self.costs, self.max_batch, self.slowdown, now)
        without, with_new = finish_times(plans, *replay, self.alone), finish_times([*plans, new], *replay, self.alone)
        work.replayed = (now, with_new[new] - now)
        without, with_new = ({p: now + stretch * (t - now) for p, t in times.items()} for times in (without, with_new))

        late = [p for p in without if without[p] <= limit(p) < with_new[p]]
        if with_new[new] <= limit(new) and not late:
            return
        drained = max((t for t in without.values() if math.isfinite(t)), default=new.deadline) - now
        if with_new[new] > limit(new):
            finish = with_new[new] - now
            why = (f"it would finish in about {finish:.1f} s, too close to or after its deadline "
                   f"({new.deadline - now:.1f} s)" if math.isfinite(finish) else
                   f"it would not finish before its deadline ({new.deadline - now:.1f} s)")
            wait = with_new[new] - limit(new) if math.isfinite(finish) else drained
        else:
            why = f"it would make {len(late)} admitted request(s) miss their deadline"
            wait = max(without[p] for p in late) - now
        raise Overloaded(f"{why} behind the {len(plans)} request(s) admitted before it; retry later",
                         error_type="deadline_unreachable", headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def put(self, work: Work) -> None:
        with self.cond:
            self.admitted.discard(work)
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
        if self.threads:
            # OpenMP keeps the thread count per thread: a new thread runs a compiled step's oneDNN GEMMs on every
            # core until its first eager parallel op adopts torch's setting
            # (bench/results/2026-12-07-cpu-runner-threads-epyc-s30-adhoc.log)
            torch.set_num_threads(self.threads)
        cores = bind_runner(self.bind) if self.bind else None
        if cores:
            log.info("runner (thread %d) bound to cores %s, the server's other threads to %s",
                     threading.get_native_id(), *cores)
        elif self.bind:
            log.warning("DMP_CPU_BIND: %d torch thread(s) leave no core for the rest; not bound", self.bind)
        while True:
            with self.cond:
                while not self.stopping and not self._has_work():
                    self._hand_over()
                    self.cond.wait()
                if self.stopping:
                    break
                hold = self._grace_left()
                if hold > 0:  # only background work is left, and an interactive request was just answered
                    self._hand_over()
                    self.cond.wait(hold)
                    continue
                began = time.perf_counter()  # a step's cost is its whole turn of the loop, less decodes and calls
                # at most one call per step: queued gate maps cannot starve generation, nor the reverse
                call = self.calls.popleft() if self.calls else None
                name = self._next_base()
                if name is not None:
                    self._join_waiting(name)
                parked = self.undecoded.popleft() if self.undecoded and not self._interactive() else None
            if call is not None or parked is not None or name is None:
                self._hand_over()  # the outbox waits for a forward only
            if call is not None:
                called = time.perf_counter()
                self._run_call(*call)
                began += time.perf_counter() - called
            if parked is not None:
                began += self._decode(self.bases[parked[0].spec.model], *parked)
            if name is not None:
                images, decoding = self._step(name)
                if images:
                    self.costs.observe_step(name, images, time.perf_counter() - began - decoding)
        self._hand_over()
        self._fail_all(Unavailable("the service is shutting down", error_type="shutting_down"))

    def _has_work(self) -> bool:
        return bool(self.calls or self.undecoded) or any(self.waiting[n] or self.running[n] for n in self.bases)

    def _grace_left(self) -> float:
        """Seconds background work still waits after the last interactive answer; 0 when anything else is to do
        (caller holds the lock)."""
        if self.calls or self._interactive():
            return 0.0
        return self.grace - (time.monotonic() - self.answered_at)

    def _interactive(self) -> bool:
        """Whether an interactive request is waiting or running (caller holds the lock)."""
        return any(not w.background for works in (*self.waiting.values(), *self.running.values()) for w in works)

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
        """Move waiting requests into the running set, interactive then background, oldest first, as far as the
        base's slots seat their patch versions (PatchSlots.seat_waiting; the rest keep waiting); caller holds the
        lock."""
        queue = self.waiting[name]
        # interactive first: background work waiting for a slot never holds up an interactive request
        live, kept = sorted((w for w in queue if not self._dropped(w)), key=lambda w: w.background), []
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
            self._observe_finish(work)
            self.metrics.dropped.labels("deadline").inc()
            self._finish(work, error=past_deadline())
            return True
        if work.cancelled.is_set() or work.future.cancelled():
            self.metrics.dropped.labels("disconnected").inc()
            self._finish(work, error=ClientGone("the client went away"))
            return True
        return False

    def _step(self, name: str) -> tuple[int, float]:
        """One batched step of base `name`: (images stepped, seconds spent decoding finished jobs)."""
        base = self.bases[name]
        running = [w for w in self.running[name] if not self._dropped(w)]
        self.running[name] = running
        if not running:
            return 0, 0.0
        works = share(running, self.max_batch, self.policy, lambda n: self.costs.step(name, n), self.slowdown,
                      self.alone)
        now = time.perf_counter()
        for w in works:
            w.started_at = w.started_at or now
        images = sum(w.images for w in works)
        self.metrics.batch_size.labels(name).observe(images)
        self.metrics.batch_occupancy.labels(name).observe(images / self.max_batch)
        previews = frozenset(w.running_job for w in works if w.running_job.index + 1 in w.preview_at)
        step = self.steps[name]

        def forward(batch):  # the batch is planned: what the last turn parked goes out as the forward starts
            self._hand_over()
            return step(batch)

        try:
            x0s = denoise_step(base.model, [w.running_job for w in works], step=forward, previews=previews)
        except Exception as e:  # a crash in one step fails that batch, never the runner
            log.exception("denoising step failed for base %s", name)
            self.running[name] = [w for w in running if w not in works]
            for w in works:
                self._finish(w, error=e)
            return 0, 0.0
        self.running[name] = [w for w in running if not w.running_job.done]
        park = False
        if any(w.background and w.running_job.done for w in works):
            with self.cond:
                park = self._interactive()
        decoding = 0.0
        for w in works:
            job = w.running_job
            if w.follow:
                self.outbox.append(partial(w.report, Progress(job.index, len(job.t_list),
                                                              self._preview(base, x0s.get(job)))))
            if job.done and w.background and park:  # its decode would delay the interactive request's next step
                self.undecoded.append((w, _versions(w)))
                self._release(w)  # its slots may be what the interactive request waits for
            elif job.done:
                decoding += self._decode(base, w, _versions(w))
        return images, decoding

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

    def _decode(self, base: ServedBase, work: Work, versions: tuple[str, ...] | None) -> float:
        """Decode and answer a finished job (`versions`: of the patches it ran with); the seconds it took."""
        sampled = time.perf_counter()
        try:
            images = to_uint8(base.vae.decode(work.running_job.latents))  # (n, H, W, C)
        except Exception as e:
            log.exception("decode failed for base %s", base.name)
            self._finish(work, error=e)
            return time.perf_counter() - sampled
        done, started = time.perf_counter(), work.started_at
        self.costs.observe_decode(base.name, work.images, done - sampled)
        self._observe_finish(work)
        assert started is not None, "set when the work joined its first step"
        timings = {"queue_ms": 1000 * (started - work.admitted_at),
                   "sample_ms": 1000 * (sampled - started), "decode_ms": 1000 * (done - sampled)}
        self._finish(work, result=Result(images, versions, timings))
        return time.perf_counter() - sampled

    def _observe_finish(self, work: Work) -> None:
        """Finished (or cut) now: how long it took against what its admission replay said."""
        if work.replayed is not None and math.isfinite(work.replayed[1]):
            admitted, predicted = work.replayed
            self.costs.observe_finish(predicted, time.monotonic() - admitted)

    def _release(self, work: Work) -> None:
        """Unpin its patch versions (and free their slots for other requests)."""
        if work.pin is not None:
            self.bases[work.spec.model].patches.release(work.pin, seated=work.seated)
            work.pin, work.seated = None, False

    def _hand_over(self) -> None:
        """Wake the readers of everything parked in the outbox, in order (runner thread)."""
        parked, self.outbox = self.outbox, []
        for wake in parked:
            wake()

    def _finish(self, work: Work, result: Result | None = None, error: BaseException | None = None) -> None:
        """Release a work's patches now; its result goes out with the outbox, an error at once (after whatever
        the outbox holds, so a stream's reports precede its error)."""
        self._release(work)
        if not work.background:
            self.answered_at = time.monotonic()
        if result is not None:
            self.outbox.append(partial(self._answer, work, result, None))
        else:
            self._hand_over()
            self._answer(work, None, error)

    @staticmethod
    def _answer(work: Work, result: Result | None, error: BaseException | None) -> None:
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
            pending += [w for w, _ in self.undecoded]
            self.undecoded.clear()
            self.admitted.clear()
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


def _versions(work: Work) -> tuple[str, ...] | None:
    """The versions of the patches a work runs with (None for the bare base)."""
    return tuple(v.version for v in work.pin.versions) if work.pin else None


def _plan(work: Work) -> Planned:
    return Planned(work.spec.model, work.images, work.steps, work.steps_done, work.admitted_at, work.deadline,
                   work.background)
