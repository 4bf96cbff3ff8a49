"""Held-out loss per timestep decile with fixed timesteps and noise, and its paired difference patched - base."""
from __future__ import annotations

import math

import torch

from app.trainer.data import DataSet
from app.trainer.diffusion import Diffusion

DECILES = 10


@torch.no_grad()
def decile_losses(model, diffusion: Diffusion, data: DataSet, patch=None, reps: int = 2, seed: int = 1234,
                  batch: int = 500) -> torch.Tensor:
    """Per-sample training loss (DECILES, reps * len(data)) on the test split; decile d draws t in
    [d T/10, (d+1) T/10). Timesteps and noise come from `seed` alone, so two models see the same draws."""
    was = model.training
    model.eval()
    if patch is not None:
        patch.eval()
    gen = torch.Generator().manual_seed(seed)
    width = diffusion.num_timesteps // DECILES
    device = data.x.device
    out = torch.zeros(DECILES, reps * len(data))
    for d in range(DECILES):
        for r in range(reps):
            for i in range(0, len(data), batch):
                idx = torch.arange(i, min(i + batch, len(data)))
                t = (d * width + torch.randint(0, width, (len(idx),), generator=gen)).to(device)
                noise = torch.randn((len(idx), *data.x.shape[1:]), generator=gen).to(device)
                loss = diffusion.losses(model, data.x[idx.to(device)], data.cond(idx.to(device)), t, noise, patch=patch)
                out[d, r * len(data) + i: r * len(data) + i + len(idx)] = loss.float().cpu()
    model.train(was)
    return out


def paired_summary(base: torch.Tensor, patched: torch.Tensor) -> dict:
    """Per-decile means of both and the paired relative difference (patched - base) / base with its SE, in %."""
    diff = patched - base  # (DECILES, S): same images, timesteps and noise
    b = base.mean(1)
    rel = 100 * diff.mean(1) / b
    se = 100 * diff.std(1) / math.sqrt(diff.shape[1]) / b
    return {"base": [round(v, 6) for v in b.tolist()], "patched": [round(v, 6) for v in patched.mean(1).tolist()],
            "rel_diff_pct": [round(v, 3) for v in rel.tolist()], "rel_diff_se_pct": [round(v, 3) for v in se.tolist()],
            "all_rel_diff_pct": round(100 * diff.mean().item() / base.mean().item(), 3),
            "all_rel_diff_se_pct": round(100 * diff.mean(0).std().item() / math.sqrt(diff.shape[1])
                                         / base.mean().item(), 3)}
