"""CPU inference: a DiT's large nn.Linear layers with their weights prepacked once for oneDNN, the eager forward's
counterpart of what Inductor's weight freezing does in a compiled CPU graph.

An eager nn.Linear hands its plain (out, in) weight to the BLAS on every call. At DiT-XL/2's shapes (2 rows of a CFG
pair, 256 tokens) oneDNN's product on a weight reordered once took 0.79-0.88x F.linear's time in the token GEMMs in
fp32 and 0.91-0.93x in bf16, and 0.21-0.37x in the adaLN projections (2 rows), on a Zen 4
(bench/results/2026-12-07-cpu-packed-linear-adhoc.log). At the demo bases' sizes (hidden 64) its per-call cost
outweighs that (0.4-0.9x as fast at 2 rows), so only layers of at least PACK_MIN_WEIGHT weights are packed. Which
product wins also depends on the CPU: on an AVX2-only Zen 3 the token GEMMs packed took 0.91-1.19x their plain time
and the XL/2 fp32 forward with every large layer packed ran at 0.915-0.953x diffusers' speed (bench/README.md, session
33). So each layer shape is timed at load, both ways, at the rows one CFG pair gives it, and packed only where that
clearly pays (`pack_linears(..., measure=True)`, what the engine and bench/xl.py do).
"""
from __future__ import annotations

import logging
import time
from typing import cast

import torch
from torch import nn

from app.model.dit import DiT, DiTBlock
from app.model.loaders import fingerprint

log = logging.getLogger(__name__)

PACK_MIN_WEIGHT = 1 << 17  # in x out: DiT-S/2 (hidden 384) is above it in every layer, the demo bases below in all
PACK_MARGIN = 0.9  # packed only where clearly faster: the token GEMMs read 0.91-1.19 between loads on a Zen 3: plain


class PackedLinear(nn.Module):
    """nn.Linear for CPU inference with the weight in oneDNN's blocked layout: the same product, no reorder per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")  # (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(model: DiT) -> bool:
    """CPU weights in fp32, or in bf16 on a CPU whose oneDNN packs bf16, and a torch built with oneDNN."""
    p = next(model.parameters())
    if p.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    # oneDNN reorders bf16 weights only with AVX512BW/VL/DQ or AVX-NE-CONVERT (an AVX2-only Zen 3 raises)
    return p.dtype == torch.float32 or (p.dtype == torch.bfloat16 and bf16_supported())


def bf16_supported() -> bool:
    """Whether this CPU's oneDNN has bf16 kernels (the check torch's own mkldnn ops make)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packed_over_plain(linear: nn.Linear, rows: int, rounds: int = 5, calls: int = 2) -> float:
    """The prepacked product's time over nn.Linear's for `linear` at `rows` rows, on this CPU, in its dtype: the
    fastest of `rounds` alternating rounds of `calls` calls each, after one warm-up call of each."""
    x = torch.randn(rows, linear.in_features, dtype=linear.weight.dtype)  # (rows, in)
    packed = PackedLinear(linear)
    products = (lambda: linear(x), lambda: packed(x))
    best = [float("inf")] * len(products)
    for product in products:
        product()  # oneDNN's primitive and the allocator's buffers are made on the first call
    for _ in range(rounds):
        for i, product in enumerate(products):
            t0 = time.perf_counter()
            for _ in range(calls):
                product()
            best[i] = min(best[i], (time.perf_counter() - t0) / calls)
    return best[1] / best[0]


@torch.no_grad()
def pack_linears(model: DiT, min_weight: int = PACK_MIN_WEIGHT, measure: bool = False) -> int:
    """Replace the transformer blocks' (attention, MLP, adaLN) and the final layer's nn.Linear layers of at least
    `min_weight` weights by PackedLinear, in place; returns how many. With `measure`, only the layer shapes whose
    packed product was faster here (PACK_MARGIN) at one CFG pair's rows. The model becomes inference-only (the packed
    product has no backward), and its fingerprint is taken first, since the packed weights leave its state_dict."""
    if not can_pack(model):
        raise ValueError("prepacking is for a CPU model in fp32, or in bf16 where oneDNN has bf16 kernels, on a torch "
                         "built with oneDNN")
    fingerprint(model)
    model.requires_grad_(False)
    # the blocks' own embedders (DiTConfig.block_embedders) stay: their forward reads their weight's dtype
    blocks = cast("list[DiTBlock]", list(model.blocks))
    tokens = 2 * model.config.num_tokens  # a CFG pair's token rows; the adaLN projections see one row per image
    parents: list[tuple[nn.Module, int]] = [(m, tokens) for b in blocks for m in (b.attn, b.mlp)]
    parents += [(b.adaLN_modulation, 2) for b in blocks]
    parents += [(model.final_layer, tokens), (model.final_layer.adaLN_modulation, 2)]
    ratios: dict[tuple[int, int, int], float] = {}  # (rows, in, out) -> packed / plain time
    packed = 0
    for parent, rows in parents:
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.in_features * child.out_features < min_weight:
                continue
            shape = (rows, child.in_features, child.out_features)
            if measure and shape not in ratios:
                ratios[shape] = packed_over_plain(child, rows)
            if not measure or ratios[shape] <= PACK_MARGIN:
                setattr(parent, name, PackedLinear(child))
                packed += 1
    if ratios:
        log.info("prepacked linears: packed/plain time by (rows, in, out) %s; %d layers packed",
                 {k: round(v, 3) for k, v in ratios.items()}, packed)
    return packed
