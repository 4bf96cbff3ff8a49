"""What the engine runs: a validated generation request and its in-flight state."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.engine.slots import Version
from app.model.sampling import Job


@dataclass(frozen=True)
class Spec:
    """A fully resolved request: every default filled in, so it also keys the result cache."""

    model: str
    patch: str | None
    class_label: int | None
    caption: str | None
    num_images: int
    steps: int
    sampler: str
    guidance_scale: float
    seed: int
    output_format: str


@dataclass
class Result:
    """Decoded images (n, H, W, C) uint8 and where the time went."""

    images: torch.Tensor
    patch_version: str | None
    timings: dict[str, float]


@dataclass(frozen=True)
class Progress:
    """One denoising step of a streaming request, reported from the runner thread."""

    step: int  # steps done
    of: int
    x0: torch.Tensor | None  # (n, C, H, W) the predicted clean sample at a preview step, else None


@dataclass
class Work:
    """One admitted request: its sampling job, its pinned patch version, its deadline and its reply future."""

    spec: Spec
    job: Job
    pin: Version | None
    deadline: float
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    admitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    ahead: int = 0  # requests waiting before this one when it was admitted
    listener: Callable[[Progress], None] | None = None  # streaming requests only; must be quick (runner thread)
    preview_at: frozenset[int] = frozenset()  # steps after which the listener gets the x0 prediction
    seated: bool = False  # its pin holds a device slot (set by the runner when it joins the batch)

    @property
    def images(self) -> int:
        return self.spec.num_images

    def cancel(self) -> None:
        """The client went away (or gave up): the runner drops this work at the next step boundary."""
        self.cancelled.set()


def preview_steps(steps: int, count: int) -> frozenset[int]:
    """`count` steps spread evenly over a run, before the last one (fewer when the run is short)."""
    return frozenset(round(steps * i / (count + 1)) for i in range(1, count + 1)) - {0, steps}
