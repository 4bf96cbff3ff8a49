"""Completion-time estimates for admission: measured step times per base and batch size, and a replay of the
batcher's own schedule (round robin over bases, `share` at every step, deadline cuts, decodes) on a copy of what
is admitted."""
from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from app.engine.share import share

SMOOTHING = 0.05  # weight of a new measurement in the moving averages: ~20 steps, steadier than one slow step
MAX_ROUNDS = 20_000  # a replay longer than this is cut: what it did not finish counts as late
MIN_STRETCH, MAX_STRETCH = 0.5, 4.0  # how far finished requests may move the replay's time scale


class StepCosts:
    """Seconds per batched step by images in the batch, and decode seconds per image, for each base, and how much
    longer than replayed admitted requests took; moving averages written by the runner thread and read by
    admission."""

    def __init__(self) -> None:
        self._steps: dict[str, dict[int, float]] = {}
        self._decode: dict[str, float] = {}
        self._stretch = 1.0
        self._lock = threading.Lock()

    def observe_step(self, base: str, images: int, seconds: float) -> None:
        with self._lock:
            table = self._steps.setdefault(base, {})
            old = table.get(images)
            table[images] = seconds if old is None else old + SMOOTHING * (seconds - old)

    def observe_decode(self, base: str, images: int, seconds: float) -> None:
        per = seconds / max(1, images)
        with self._lock:
            old = self._decode.get(base)
            self._decode[base] = per if old is None else old + SMOOTHING * (per - old)

    def observe_finish(self, predicted: float, actual: float) -> None:
        """A request the replay gave `predicted` seconds to finish took `actual` (or was cut after it): whatever
        the measured step times miss shows in the ratio."""
        if predicted <= 0:
            return
        ratio = min(MAX_STRETCH, max(MIN_STRETCH, actual / predicted))
        with self._lock:
            self._stretch += SMOOTHING * (ratio - self._stretch)

    def stretch(self) -> float:
        """Finished over replayed time to finish, moving average (1 before any) of ratios within [MIN, MAX_STRETCH]."""
        with self._lock:
            return self._stretch

    def measured(self, base: str) -> bool:
        return bool(self._steps.get(base))

    def step(self, base: str, images: int) -> float:
        """Seconds of one step of `images` rows: measured, else linear between the nearest measured sizes, else
        proportional to the nearest one (more rows cost more; 0 before any step of the base ran)."""
        with self._lock:
            table = dict(self._steps.get(base, {}))
        if not table:
            return 0.0
        if images in table:
            return table[images]
        below = max((n for n in table if n < images), default=None)
        above = min((n for n in table if n > images), default=None)
        if below is not None and above is not None:
            return table[below] + (table[above] - table[below]) * (images - below) / (above - below)
        near = below if below is not None else above
        assert near is not None, "the table is not empty"
        return table[near] * images / near

    def decode(self, base: str, images: int) -> float:
        return self._decode.get(base, 0.0) * images

    def dearest(self, base: str, images: int) -> float:
        """The most `step` charges for any step of 1 to `images` rows (interpolation stays between its ends,
        proportional extrapolation grows with the rows)."""
        with self._lock:
            measured = list(self._steps.get(base, {}).values())
        return max(measured + [self.step(base, images)]) if measured else 0.0


@dataclass(eq=False)
class Planned:
    """A request as the replay sees it (`share`'s Running)."""

    base: str
    images: int
    steps: int
    steps_done: int
    admitted_at: float
    deadline: float
    background: bool = False


def finish_times(plans: Sequence[Planned], costs: StepCosts, max_batch: int, slowdown: float, now: float,
                 alone: float | None = None) -> Mapping[Planned, float]:
    """When each interactive plan is done (monotonic), replaying the batcher under the deadline policy (the one that
    admits by this replay) from `now`; math.inf for a plan cut at its deadline. The replay ends when no interactive
    plan is left (background plans only shape the steps)."""
    left = {p: p.steps_done for p in plans}  # plan -> steps done so far in the replay
    finish: dict[Planned, float] = {}
    clock, rounds = now, 0
    while any(not p.background for p in left) and rounds < MAX_ROUNDS:
        rounds += 1
        by_base: dict[str, list[Planned]] = {}
        for p in left:
            by_base.setdefault(p.base, []).append(p)
        # per base: the works its steps advance and what such a step costs. Fewest steps left first keeps the chosen
        # works ahead of the rest (and the same rows for background ones) until one of them finishes, so the replay
        # jumps to that step; round robin gives every base one step per round
        steps: dict[str, tuple[list[Planned], float]] = {}
        for base, ps in by_base.items():
            picked = [v.plan for v in share([_View(p, left[p]) for p in ps], max_batch, "deadline",
                                            partial(costs.step, base), slowdown, alone)]
            steps[base] = picked, costs.step(base, sum(p.images for p in picked))
        per_round = sum(cost for _, cost in steps.values())
        jump = min(p.steps - left[p] for ps, _ in steps.values() for p in ps)
        cut = min((p.deadline for p in left), default=math.inf)
        if per_round > 0 and cut > clock:
            jump = max(1, min(jump, math.ceil((cut - clock) / per_round)))
        clock += jump * per_round
        for base, (ps, _) in steps.items():
            for p in ps:
                left[p] += jump
                if left[p] >= p.steps:
                    clock += costs.decode(base, p.images)
                    finish[p] = clock
                    del left[p]
        for p in [p for p in left if p.deadline <= clock]:  # the runner drops what ran out of time
            del left[p]
    return {p: finish.get(p, math.inf) for p in plans if not p.background}


def latest_finish(plans: Sequence[Planned], costs: StepCosts, max_batch: int, now: float) -> float:
    """A time no interactive plan's `finish_times` falls after, in a few sums instead of a replay (math.inf when the
    replay could run into MAX_ROUNDS).

    A replay round (one step per base, `jump` times) costs at most jump x the sum of each base's dearest step, and
    takes at least jump image-steps off what is left (every step advances at least one row). So everything is done
    within (image-steps left) x that sum, plus every decode."""
    left = sum(p.images * max(0, p.steps - p.steps_done) for p in plans)
    if left > MAX_ROUNDS // 2:
        return math.inf
    widest: dict[str, int] = {}
    for p in plans:
        widest[p.base] = max(widest.get(p.base, max_batch), p.images)
    per_image_step = sum(costs.dearest(base, rows) for base, rows in widest.items())
    return now + left * per_image_step + sum(costs.decode(p.base, p.images) for p in plans)


@dataclass(eq=False)
class _View:
    """A plan with the replay's progress, as `share` reads it."""

    plan: Planned
    steps_done: int

    @property
    def images(self) -> int:
        return self.plan.images

    @property
    def steps(self) -> int:
        return self.plan.steps

    @property
    def admitted_at(self) -> float:
        return self.plan.admitted_at

    @property
    def deadline(self) -> float:
        return self.plan.deadline

    @property
    def background(self) -> bool:
        return self.plan.background
