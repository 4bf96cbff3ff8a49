"""DMP's balancing losses (paper appendix C): importance and load, both as CV^2 over prompts."""
from __future__ import annotations

import torch

from app.model.dmp.module import Gating


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation along the last dim, averaged over the rest."""
    x = x.float()
    return (x.var(dim=-1, unbiased=False) / (x.mean(dim=-1) ** 2 + eps)).mean()


def importance_loss(gates: torch.Tensor) -> torch.Tensor:
    """CV^2 of each prompt's gate mass summed over the batch; gates (L, B, N)."""
    return cv_squared(gates.sum(dim=1))


def load_loss(gating: Gating, k: int, kind: str = "smooth", temperature: float = 0.1) -> torch.Tensor:
    """How unevenly prompts are used, differentiably; `gating` is a training forward's, `k` the prompts kept.

    smooth: for hard top-k with noise, Shazeer's probability that prompt n stays in the top k when its noise
    is redrawn; for soft selection, a sigmoid surrogate of "gate weight above the uniform 1/N", counted per
    prompt over the batch. reference: the original code's count of gates < 0, always zero (no gradient).
    """
    gates = gating.gates  # (L, B, N)
    n = gates.shape[-1]
    if kind == "reference":
        return cv_squared((gates < 0).float().sum(dim=1))
    if kind != "smooth":
        raise ValueError(f"unknown load loss {kind!r}")
    if k < n and gating.noise_std is not None and gating.clean_logits is not None:  # set together
        clean, noisy, std = gating.clean_logits, gating.logits, gating.noise_std[None]
        top = noisy.topk(k + 1, dim=-1).values  # (L, B, k+1)
        in_thr, out_thr = top[..., k:k + 1], top[..., k - 1:k]
        is_in = noisy > in_thr
        normal = torch.distributions.Normal(0.0, 1.0)
        prob = torch.where(is_in, normal.cdf((clean - in_thr) / std), normal.cdf((clean - out_thr) / std))
        return cv_squared(prob.sum(dim=1))
    used = torch.sigmoid((gates * n - 1.0) / temperature)  # ~1 where the weight exceeds 1/N
    return cv_squared(used.sum(dim=1))
