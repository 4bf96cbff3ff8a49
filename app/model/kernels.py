"""Fused residual add, DMP prompt add, LayerNorm and adaLN modulate (Triton on CUDA, plain torch elsewhere).

Each DiT block starts its two branches the same way: add to the residual stream x (before the attention branch:
the previous block's gated MLP output and the DMP prompts sum_k g[b, k, n] * P[slot_bk, depth, n, :] (a row's up
to K scaled patches, added one after another in k order); before the MLP
branch: the gated attention output), then LayerNorm and modulate: h = LN(x) * (1 + scale[b]) + shift[b]; the
final layer's norm takes the last block's MLP output the same way. In plain torch that is up to nine passes over
(B, N, D) plus a gathered copy of the prompts; the kernel reads x, the added tensor and the pool rows once and
writes x and h once, with fp32 arithmetic whatever the storage dtype. The kernel has no backward: it runs
on CUDA tensors in inference (no autograd, not under torch.compile, which fuses the same math itself); training
and CPU run the plain-torch reference, which is the same code as before the fusion, op for op.

Tolerance (tests/model/test_kernels.py, scripts/gpu_checks.py): the kernel rounds each output once, so x is
within 2**-8 (bf16) / 2**-11 (fp16) / 1e-6 (fp32) of |x| + |a*y| + |g*P| of the exact value, and h within the
same relative bound of |h| plus the error x carries into it; the bf16/fp16 reference also rounds every
intermediate (a*y, g*P, LN(x), the product with 1 + scale), so the two agree within a few ulps, not bitwise.
TRITON_INTERPRET=1 runs the kernel on CPU tensors through Triton's interpreter (how CI tests it without a GPU).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: the kernel runs on CPU tensors
MAX_FUSED_WIDTH = 8192  # one program holds a whole row of x; wider rows take the reference path
_fused_enabled = True


@dataclass(frozen=True)
class PromptAdd:
    """DMP's prompt injection before block `depth`: x + gates[b, n] * prompts[depth, n, :] for one patch, or
    x + sum_k gates[b, k, n] * prompts[slots[b, k], depth, n, :] for a pool's per-row (slot, scale) pairs (the
    scales already folded into the gates), the pairs added in k order, so trailing unused pairs (zero gates on the
    zero slot) change no bit."""

    gates: torch.Tensor  # (B, N) one patch, or (B, K, N) with `slots`
    prompts: torch.Tensor  # (S, L, N, D) pool with `slots`, or (L, N, D) one patch for every row
    slots: torch.Tensor | None  # (B, K) or None
    depth: int

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.slots is None:
            return x + self.gates.unsqueeze(-1).to(x.dtype) * self.prompts[self.depth][None].to(x.dtype)
        for k in range(self.slots.shape[1]):
            p = self.prompts[self.slots[:, k], self.depth]  # (B, N, D)
            x = x + self.gates[:, k].unsqueeze(-1).to(x.dtype) * p.to(x.dtype)
        return x  # (B, N, D)


def set_fused(enabled: bool) -> None:
    """Turn the Triton path on or off for this process (DMP_FUSED_KERNELS; benchmarks compare both)."""
    global _fused_enabled
    _fused_enabled = enabled


@contextlib.contextmanager
def fused(enabled: bool):
    """Run a block with the Triton path on or off, restoring the previous setting."""
    before = _fused_enabled
    set_fused(enabled)
    try:
        yield
    finally:
        set_fused(before)


def active(device) -> bool:
    """Whether inference on this device runs the Triton kernel (the gauge; use_triton adds per-call conditions)."""
    return _fused_enabled and triton is not None and (torch.device(device).type == "cuda" or INTERPRET)


def use_triton(x: torch.Tensor) -> bool:
    """The kernel serves CUDA inference (or the interpreter); autograd and torch.compile take the reference."""
    return (active(x.device) and 0 < x.shape[-1] <= MAX_FUSED_WIDTH and x.numel() > 0
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def add_norm_modulate_reference(x, shift, scale, eps, residual=None, residual_gate=None,
                                prompt: PromptAdd | None = None):
    """Plain torch: x += residual_gate * residual; x = prompt(x); h = LN(x) * (1 + scale) + shift -> (x, h)."""
    if residual is not None:
        x = x + residual_gate.unsqueeze(1) * residual
    if prompt is not None:
        x = prompt.reference(x)
    h = F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return x, h  # (B, N, D) each


if triton is not None:
    @triton.jit
    def _add_norm_modulate_kernel(x_ptr, res_ptr, rgate_ptr, g_ptr, p_ptr, slot_ptr, shift_ptr, scale_ptr,
                                  x_out_ptr, h_out_ptr, N, D, eps, rgate_stride, shift_stride, scale_stride,
                                  p_slot_stride, p_depth_offset,
                                  HAS_RES: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_SLOTS: tl.constexpr,
                                  PAIRS: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)  # one (b, n) token per program; the whole row of D values at once
        b = row // N
        n = row % N
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        offs = row.to(tl.int64) * D + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            a = tl.load(rgate_ptr + b * rgate_stride + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = x + a * y
        if HAS_PROMPT:
            for k in tl.static_range(PAIRS):  # gates (B, PAIRS, N), slots (B, PAIRS): pair by pair, in order
                g = tl.load(g_ptr + (b * PAIRS + k) * N + n).to(tl.float32)
                if HAS_SLOTS:
                    slot = tl.load(slot_ptr + b * PAIRS + k).to(tl.int64)
                else:
                    slot = 0
                p = tl.load(p_ptr + slot * p_slot_stride + p_depth_offset + n * D + cols, mask=mask, other=0.0)
                x = x + g * p.to(tl.float32)
        if HAS_RES or HAS_PROMPT:
            x_stored = x.to(x_out_ptr.dtype.element_ty)
            tl.store(x_out_ptr + offs, x_stored, mask=mask)
            x = x_stored.to(tl.float32)  # normalise what the residual stream now holds
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        shift = tl.load(shift_ptr + b * shift_stride + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * scale_stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = xc * rstd * (1.0 + scale) + shift
        tl.store(h_out_ptr + offs, h.to(h_out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (B, D) modulation vector with unit stride along D (adaLN chunks are strided views: no copy)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def add_norm_modulate(x, shift, scale, eps, residual=None, residual_gate=None, prompt: PromptAdd | None = None):
    """x (B, N, D) plus the gated residual and/or DMP prompts, then LayerNorm + modulate -> (x, h).

    shift, scale, residual_gate: (B, D); residual: (B, N, D). Triton on CUDA inference, plain torch otherwise.
    """
    if not use_triton(x):
        return add_norm_modulate_reference(x, shift, scale, eps, residual, residual_gate, prompt)
    B, N, D = x.shape
    x = x.contiguous()
    h = torch.empty_like(x)
    adds = residual is not None or prompt is not None
    x_out = torch.empty_like(x) if adds else x
    shift, scale = _rows(shift), _rows(scale)
    res = residual.contiguous() if residual is not None else x
    rgate = _rows(residual_gate) if residual is not None else shift
    if prompt is not None:
        pool, gates = prompt.prompts.contiguous(), prompt.gates.contiguous()
        slots = prompt.slots.contiguous() if prompt.slots is not None else gates
        slot_stride = pool.stride(0) if prompt.slots is not None else 0  # 0: one patch for every row
        depth_offset = prompt.depth * pool.stride(-3)
        pairs = prompt.slots.shape[1] if prompt.slots is not None else 1
    else:
        pool = gates = slots = x
        slot_stride = depth_offset = 0
        pairs = 1
    block_d = triton.next_power_of_2(D)
    _add_norm_modulate_kernel[(B * N,)](
        x, res, rgate, gates, pool, slots, shift, scale, x_out, h, N, D, eps,
        rgate.stride(0), shift.stride(0), scale.stride(0), slot_stride, depth_offset,
        HAS_RES=residual is not None, HAS_PROMPT=prompt is not None, HAS_SLOTS=slot_stride > 0,
        PAIRS=pairs, BLOCK_D=block_d, num_warps=min(max(block_d // 256, 1), 8))
    return x_out, h


@torch.no_grad()
def self_check(device, width: int = 40, dtype=torch.float32) -> str | None:
    """Run the kernel once on small inputs of the served width and dtype against the reference; if it fails or
    disagrees, turn the Triton path off for this process and say why: a GPU or Triton build the kernel does not
    support must not stop a server."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 4, width, generator=g).to(device, dtype) for _ in range(2))
    shift, scale, gate = (0.5 * torch.randn(3, 2, width, generator=g)).to(device, dtype).unbind(0)
    prompt = PromptAdd(torch.rand(2, 2, 4, generator=g).to(device), torch.randn(3, 2, 4, width, generator=g).to(device),
                       torch.tensor([[2, 1], [0, 2]], device=device), 1)  # two (slot, scale) pairs per row
    if not use_triton(x):
        return None
    kw: dict[str, Any] = dict(residual=y, residual_gate=gate, prompt=prompt)
    try:
        got = add_norm_modulate(x, shift, scale, 1e-6, **kw)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)  # a launch error surfaces here
    except Exception as e:  # compile or launch failure, of whatever type Triton raises
        set_fused(False)
        return f"fused Triton kernel failed ({type(e).__name__}: {str(e)[:200]}); using plain torch ops"
    want = add_norm_modulate_reference(x, shift, scale, 1e-6, **kw)
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16/fp16: the two round at different points (module doc)
    if not all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in zip(got, want, strict=True)):
        set_fused(False)
        return "fused Triton kernel disagrees with the torch reference; using plain torch ops"
    return None
