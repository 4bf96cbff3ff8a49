"""Which running requests one batched step advances: the batcher's scheduling rule, as a pure function.

Interactive requests come first. Under the `deadline` policy (DMP_SCHEDULER) a small request (at most
SMALL_BATCH_STEPS full batches of work) goes first, fewest steps left first (then oldest): a short request
overtakes long ones, and a running request keeps its rows until it ends, so requests finish one at a time and
their clients' next requests find the batch full, where least-steps-done order advanced every request together
and emptied the batch in groups. A small request that does not fit holds the later small ones back (none of them
overtakes it, which would leave it behind for good). Large requests follow, earliest deadline first, so they
finish one after the other instead of advancing in lockstep until every one of them runs out of time. The `fair`
policy puts every interactive request in the least-steps-done order. Background requests take only the rows left
over, and only while they make the interactive step at most `slowdown` slower by the measured step times.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol, TypeVar

Policy = Literal["deadline", "fair"]
SMALL_BATCH_STEPS = 25  # a request is small when steps x images is at most this many full batches (max_batch rows)


class Running(Protocol):
    @property
    def images(self) -> int: ...  # rows it needs (before CFG doubling)

    @property
    def steps(self) -> int: ...  # steps it runs in all

    @property
    def steps_done(self) -> int: ...

    @property
    def admitted_at(self) -> float: ...

    @property
    def deadline(self) -> float: ...  # monotonic

    @property
    def background(self) -> bool: ...


R = TypeVar("R", bound=Running)


def is_small(work: Running, max_batch: int) -> bool:
    """Work (steps x images) of at most SMALL_BATCH_STEPS full batches: it keeps least-progress-first fairness."""
    return work.steps * work.images <= SMALL_BATCH_STEPS * max_batch


def priority(work: Running, max_batch: int, policy: Policy) -> tuple:
    """The interactive order: small runs first."""
    if policy == "fair":
        return (0, work.steps_done, work.admitted_at)
    if is_small(work, max_batch):
        return (0, work.steps - work.steps_done, work.admitted_at)
    return (1, work.deadline, work.admitted_at)


def _fill(ordered: Sequence[R], room: int, chosen: list[R], holds: Callable[[R], bool] = lambda w: False) -> int:
    """Append works in order while their images fit in `room` (the first always fits an empty batch); once a work
    that `holds` does not fit, no later such work is taken."""
    held = False
    for w in ordered:
        if held and holds(w):
            continue
        if w.images <= room or not chosen:
            chosen.append(w)
            room -= w.images
        elif holds(w):
            held = True
    return room


def share(works: Sequence[R], max_batch: int, policy: Policy = "deadline",
          step_seconds: Callable[[int], float] | None = None, slowdown: float = 0.0,
          alone: float | None = None) -> list[R]:
    """The works one step advances, at most `max_batch` images (always at least one work). `step_seconds(rows)`:
    the measured seconds of a step of that many images; background rows join interactive ones only while it stays
    within (1 + slowdown) x the interactive rows' own step, and run alone only in steps within `alone` (default
    1 + slowdown) x a 1-image step (the first background work always runs; without a measure they fill the batch
    alone, join none)."""
    chosen: list[R] = []
    room = _fill(sorted((w for w in works if not w.background), key=lambda w: priority(w, max_batch, policy)),
                 max_batch, chosen, lambda w: policy == "deadline" and is_small(w, max_batch))
    background = sorted((w for w in works if w.background), key=lambda w: (w.deadline, w.admitted_at))
    if step_seconds is None:  # no measure: background rows fill a batch alone and join no interactive one
        if not chosen:
            _fill(background, max_batch, chosen)
        return chosen
    rows = max_batch - room
    # alone, the step budget is one interactive step's: a 1-image step (on a GPU below its knee that is a full
    # batch; on a CPU, where every row costs, a few rows); with interactive rows, their own step's
    limit = (1 + slowdown) * step_seconds(rows) if chosen else (alone or 1 + slowdown) * step_seconds(1)
    if not chosen and background:
        chosen.append(background[0])
        rows, room, background = background[0].images, max_batch - background[0].images, background[1:]
    for w in background:
        if w.images <= room and step_seconds(rows + w.images) <= limit:
            chosen.append(w)
            rows, room = rows + w.images, room - w.images
    return chosen
