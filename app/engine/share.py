"""Which running requests one batched step advances: the fairness rule of the batcher, as a pure function."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from app.model.sampling import Job


class Running(Protocol):
    @property
    def images(self) -> int: ...  # rows it needs (before CFG doubling)

    @property
    def admitted_at(self) -> float: ...

    @property
    def job(self) -> Job | None: ...  # its sampling Job (set for every running request): `index` is its steps done


R = TypeVar("R", bound=Running)


def _steps_done(w: Running) -> int:
    assert w.job is not None, "a running request has a job"
    return w.job.index


def share(works: Sequence[R], max_batch: int) -> list[R]:
    """Least steps done first (then oldest), while their images fit in `max_batch` (always at least one). A new
    request starts ahead of long-running ones and keeps its rows until it has caught up with them, so its latency
    is its own steps, whatever was admitted before it."""
    chosen: list[R] = []
    room = max_batch
    for w in sorted(works, key=lambda w: (_steps_done(w), w.admitted_at)):
        if w.images <= room or not chosen:
            chosen.append(w)
            room -= w.images
    return chosen
