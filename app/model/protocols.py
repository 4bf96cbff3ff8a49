"""The interfaces the model layer's seams take: a patch, a VAE, a text encoder, a scheduler."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from app.model.dmp.module import Gating
    from app.model.kernels import PromptAdd


class PatchRows(Protocol):
    """One forward's prepared patch: what block `depth` adds to its input (None: nothing), and the gating values
    a training DMP module returns for its balancing losses (None for a served pool)."""

    gating: Gating | None

    def at(self, depth: int) -> PromptAdd | None: ...


class Patch(Protocol):
    """What DiT.forward takes as `patch`: a DMP module (one patch for every row) or a PooledPatch (a slot per row)."""

    def prepare(self, c: torch.Tensor, t_emb: torch.Tensor, noise: torch.Tensor | None = None) -> PatchRows: ...


class TrainingPatch(Protocol):
    """A trainer's DMP module: also takes the timestep permutation of its gate's input (B,)."""

    def prepare(self, c: torch.Tensor, t_emb: torch.Tensor, noise: torch.Tensor | None = None,
                t_perm: torch.Tensor | None = None) -> PatchRows: ...


class VAE(Protocol):
    """Images in [-1, 1] (B, C, H, W) <-> the DiT's latents; `kind` is "pixel" (identity) or "sd"."""

    kind: str
    channels: int  # latent channels
    downscale: int  # pixels per latent cell along each side

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class TextEncoder(Protocol):
    """Captions -> (B, dim) pooled embeddings, the condition of a text model."""

    name: str
    dim: int

    def encode(self, captions: list[str]) -> torch.Tensor: ...


class Scheduler(Protocol):
    """The part of a diffusers scheduler sampling uses (DDPM, DDIM, DPM-Solver++)."""

    timesteps: torch.Tensor
    init_noise_sigma: float
    alphas_cumprod: torch.Tensor

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor: ...

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor): ...
