"""Which running requests one batched step advances: the fairness rule of the batcher, as a pure function."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Running(Protocol):
    images: int  # rows it needs (before CFG doubling)
    admitted_at: float
    job: object  # its sampling Job: `index` is the steps it has done


def share(works: Sequence[Running], max_batch: int) -> list[Running]:
    """Least steps done first (then oldest), while their images fit in `max_batch` (always at least one). A new
    request starts ahead of long-running ones and keeps its rows until it has caught up with them, so its latency
    is its own steps, whatever was admitted before it."""
    chosen, room = [], max_batch
    for w in sorted(works, key=lambda w: (w.job.index, w.admitted_at)):
        if w.images <= room or not chosen:
            chosen.append(w)
            room -= w.images
    return chosen
