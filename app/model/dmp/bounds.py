"""How large a patch's values may be, from the base's own activation scale: a finite 1e37 prompt is still absurd
(every image comes out black), so a patch is refused when its values are out of all proportion to the base's.

- prompts: |P| <= PROMPT_FACTOR x the largest |token| the base feeds its first block (patch embedding + position
  embedding of unit-Gaussian latents). Trained patches sit far below (the demo patches under 2 % of the bound).
- gate: the largest logit a row can reach, sum_j<D |W_ij| x |gate input| + |W_iD| x (pt_depth - 1) + |b_i|, at most
  MAX_GATE_LOGIT (softmax is saturated long before; an overflow to inf would make the gates NaN). The gate input's
  scale is the largest |c| (or |t_embed|) of the base over timesteps 0-999 and the null condition.
"""
from __future__ import annotations

import torch

PROMPT_FACTOR = 100.0
MAX_GATE_LOGIT = 1e4
_CACHE = "_dmp_activation_scale"


@torch.no_grad()
def activation_scale(base) -> tuple[float, float]:
    """(token scale, gate-input scale) of `base`, measured once on fixed probe inputs and kept on the model."""
    if hasattr(base, _CACHE):
        return getattr(base, _CACHE)
    cfg, p = base.config, next(base.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(p.device, p.dtype)
    t = torch.tensor([0.0, 250.0, 500.0, 999.0], device=p.device)
    tokens = (base.x_embedder(x) + base.pos_embed).float().abs().max().item()
    t_emb = base.t_embedder(t)
    c = t_emb + base.y_embedder(base.null_y(4, p.device), False)
    scale = (tokens, max(c.float().abs().max().item(), t_emb.float().abs().max().item()))
    setattr(base, _CACHE, scale)
    return scale


def check_magnitudes(tensors: dict[str, torch.Tensor], base) -> str | None:
    """Why the patch's values are out of proportion to `base`, or None when they are within the bounds."""
    tokens, gate_input = activation_scale(base)
    prompts = tensors["prompts"].float().abs().max().item()
    if prompts > PROMPT_FACTOR * tokens:
        return (f"prompts reach |{prompts:.3g}|, over {PROMPT_FACTOR:g} x this base's token scale {tokens:.3g} "
                f"(bound {PROMPT_FACTOR * tokens:.3g})")
    if "gate.weight" in tensors:
        w = tensors["gate.weight"].float().abs()  # (N, D + 1): the last column multiplies the raw depth index
        depth = int(tensors["prompts"].shape[0]) - 1
        logits = (w[:, :-1].sum(1) * gate_input + w[:, -1] * depth + tensors["gate.bias"].float().abs()).max()
        if logits.item() > MAX_GATE_LOGIT:
            return (f"gate logits can reach |{logits.item():.3g}|, over {MAX_GATE_LOGIT:g} (gate input scale "
                    f"{gate_input:.3g} of this base)")
    return None
