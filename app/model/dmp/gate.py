"""The DMP gate: logits from [g_in; depth] for every block at once, then the one top-k selection that the trainer's
module, the serving pool (eager and compiled) and the gate maps all call."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def num_kept(top_k: float, num_tokens: int) -> int:
    """Prompts kept per row by top-k selection (all of them at top_k=1)."""
    return max(1, min(num_tokens, int(round(top_k * num_tokens))))


def gate_logits(g_in: torch.Tensor, weight: torch.Tensor, depth_weight: torch.Tensor, bias: torch.Tensor,
                depth: int) -> torch.Tensor:
    """W[:, :D] g_in + W[:, D] * l + b for every block l < depth in one matmul -> (depth, B, N).

    One patch: weight (N, D), depth_weight and bias (N,). A pool batch: each row its own, (B, N, D) and (B, N).
    """
    if weight.dim() == 2:
        base = F.linear(g_in, weight, bias)  # (B, N)
    else:
        base = torch.einsum("bd,bnd->bn", g_in, weight) + bias  # (B, N)
    layer = torch.arange(depth, device=g_in.device, dtype=g_in.dtype)
    return base[None] + layer[:, None, None] * depth_weight[None]  # (L, B, N)


RANK_MAX_ELEMENTS = 1 << 23  # above this many (..., N, N) comparisons the sort is cheaper in memory


def top_k_mask(logits: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """True on the k largest logits of each row (ties keep the lower index); k an int or per row (B,)."""
    n = logits.shape[-1]
    k = torch.as_tensor(k, device=logits.device)
    k = k[..., None] if k.dim() else k
    if logits.numel() * n <= RANK_MAX_ELEMENTS:
        # each logit's place in the stable descending order, by comparisons: the serving pool's few rows per step
        # fuse into one kernel under torch.compile, where a sort is an opaque call (~3 us a row on one CPU core)
        a, b = logits[..., :, None], logits[..., None, :]  # (..., N, 1) this logit, (..., 1, N) the others
        j = torch.arange(n, device=logits.device)
        earlier = j[None, :] < j[:, None]  # (N, N): other index j before this one i
        rank = ((b > a) | ((b == a) & earlier)).sum(-1)  # (..., N)
        return rank < k
    order = logits.argsort(dim=-1, descending=True, stable=True)
    in_top = (torch.arange(n, device=logits.device) < k).expand(logits.shape)
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(-1, order, in_top)  # exactly k


def keep_top_k(logits: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Softmax over the k largest logits of each row, zeros elsewhere; k may differ per row (..., B)."""
    return select(logits, k, False)


def select(logits: torch.Tensor, k: torch.Tensor | int, hard: torch.Tensor | bool) -> torch.Tensor:
    """Gate weights (L, B, N) from logits: the softmax over each row's k largest (zeros elsewhere), or with `hard`
    weight exactly 1 on every kept prompt (the paper's hard selection) whose gradient is the softmax's (straight
    through). Hard at k = N therefore weights every prompt 1. `k` and `hard` are scalars or per row (B,)."""
    every = isinstance(k, int) and k >= logits.shape[-1]
    kept = None if every else top_k_mask(logits, k)
    soft = logits.softmax(dim=-1) if kept is None else logits.masked_fill(~kept, float("-inf")).softmax(dim=-1)
    if hard is False:
        return soft
    # the kept set, not soft > 0: a kept prompt whose softmax underflows to 0 still weighs 1
    ones = (torch.ones_like(soft) if kept is None else kept.to(soft.dtype)) + (soft - soft.detach())  # 0 or 1
    if hard is True:
        return ones
    return torch.where(hard[None, :, None], ones, soft)
