"""The DMP gate: logits from [g_in; depth] for every block at once, then soft or hard top-k selection."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def num_kept(top_k: float, num_tokens: int) -> int:
    """Prompts kept per row by hard top-k selection (all of them for soft selection, top_k=1)."""
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
    l = torch.arange(depth, device=g_in.device, dtype=g_in.dtype)
    return base[None] + l[:, None, None] * depth_weight[None]  # (L, B, N)


def hard_weights(gates: torch.Tensor) -> torch.Tensor:
    """Weight 1 on every kept prompt (the paper's hard selection); gradients pass straight through to the softmax."""
    return (gates > 0).to(gates.dtype) + (gates - gates.detach())  # forward: exactly 1


def keep_top_k(logits: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Softmax over the k largest logits of each row, zeros elsewhere; k may differ per row (..., B)."""
    n = logits.shape[-1]
    if isinstance(k, int) and k >= n:
        return logits.softmax(dim=-1)
    order = logits.argsort(dim=-1, descending=True, stable=True)  # ties keep the lower token index
    k = torch.as_tensor(k, device=logits.device)
    in_top = (torch.arange(n, device=logits.device) < (k[..., None] if k.dim() else k)).expand(logits.shape)
    kept = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(-1, order, in_top)  # exactly k
    return logits.masked_fill(~kept, float("-inf")).softmax(dim=-1)
