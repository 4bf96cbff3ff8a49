"""Fused add + LayerNorm + modulate: the torch reference is the block's math; the Triton kernel matches it
(on GPU, and on CPU through Triton's interpreter)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from app.model.kernels import PromptAdd, add_norm_modulate, add_norm_modulate_reference, fused, use_triton

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def random_case(B=5, S=4, L=3, N=16, D=40, dtype=torch.float32, device="cpu", seed=0, slots=True):
    """x, residual (B, N, D); a (B, 6D) adaLN output whose strided chunks are shift, scale, gate; prompts."""
    g = torch.Generator().manual_seed(seed)
    x, res = (torch.randn(B, N, D, generator=g).to(device, dtype) for _ in range(2))
    shift, scale, gate = (torch.randn(B, 6 * D, generator=g) * 0.5).to(device, dtype).chunk(6, dim=1)[:3]
    gates = torch.randn(B, N, generator=g).softmax(-1).to(device)  # (B, N) fp32, as the patch makes them
    if slots:  # two (slot, scale) pairs per row, the second at a negative scale (scales fold into the gates)
        pair_gates = torch.stack([gates, -0.5 * torch.randn(B, N, generator=g).softmax(-1).to(device)], 1)
        prompts = PromptAdd(pair_gates, torch.randn(S, L, N, D, generator=g).to(device),
                            torch.randint(0, S, (B, 2), generator=g).to(device), 2)  # (B, 2, N), (B, 2)
    else:
        prompts = PromptAdd(gates, torch.randn(L, N, D, generator=g).to(device, dtype), None, 1)
    return x, res, shift, scale, gate, prompts


def exact(x, shift, scale, eps, residual=None, residual_gate=None, prompt=None):
    """The same math in fp64, one sample at a time -> x, h and their error scales: one rounding of x is
    relative to |x| + |a*y| + |g*P|; h inherits that error times rstd * |1 + scale|, plus its own rounding."""
    xs, hs, mx, mh = [], [], [], []
    for b in range(x.shape[0]):
        xb = x[b].double()
        mag = xb.abs()
        if residual is not None:
            add = residual_gate[b].double() * residual[b].double()
            xb, mag = xb + add, mag + add.abs()
        if prompt is not None and prompt.slots is None:
            add = prompt.gates[b, :, None].double() * prompt.prompts[prompt.depth].double()
            xb, mag = xb + add, mag + add.abs()
        elif prompt is not None:
            for k in range(prompt.slots.shape[1]):
                add = prompt.gates[b, k, :, None].double() * prompt.prompts[prompt.slots[b, k], prompt.depth].double()
                xb, mag = xb + add, mag + add.abs()
        rstd = (xb.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
        hb = F.layer_norm(xb, xb.shape[-1:], eps=eps) * (1 + scale[b].double()) + shift[b].double()
        xs.append(xb)
        hs.append(hb)
        mx.append(mag)
        mh.append(hb.abs() + mag * rstd * (1 + scale[b].double()).abs())
    return torch.stack(xs), torch.stack(hs), torch.stack(mx), torch.stack(mh)


VARIANTS = {"norm only": {}, "prompts": {"prompt": True}, "residual": {"residual": True},
            "both": {"residual": True, "prompt": True}}


def variant_args(case, name):
    x, res, shift, scale, gate, prompts = case
    v = VARIANTS[name]
    return dict(residual=res if v.get("residual") else None, residual_gate=gate if v.get("residual") else None,
                prompt=prompts if v.get("prompt") else None)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("slots", [True, False])
def test_cpu_path_is_the_reference_and_equals_exact_math(name, slots):
    case = random_case(slots=slots)
    x, _, shift, scale, *_ = case
    kw = variant_args(case, name)
    assert not use_triton(x)
    out_x, out_h = add_norm_modulate(x, shift, scale, 1e-6, **kw)
    ref_x, ref_h = add_norm_modulate_reference(x, shift, scale, 1e-6, **kw)
    assert torch.equal(out_x, ref_x) and torch.equal(out_h, ref_h)
    ex_x, ex_h, _, _ = exact(x, shift, scale, 1e-6, **kw)
    torch.testing.assert_close(out_x.double(), ex_x, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_h.double(), ex_h, rtol=0, atol=1e-4)


def unfused_forward(model, x, t, y, patch):
    """DiT's forward as written before the fusion: prompt add, then each block's two residual branches in turn."""
    def modulate(v, shift, scale):
        return v * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    x = model.x_embedder(x) + model.pos_embed
    t_emb = model.t_embedder(t)
    c = t_emb + model.y_embedder(y, False)
    state = patch.prepare(c, t_emb)
    for depth, block in enumerate(model.blocks):
        slots = getattr(state, "slots", None)  # a pooled batch (B, K) pairs, or one patch module for every row
        if slots is None:
            x = x + state.gates[depth].unsqueeze(-1) * state.prompts[depth][None]
        for k in range(0 if slots is None else slots.shape[1]):
            x = x + state.gates[depth][:, k].unsqueeze(-1) * state.prompts[slots[:, k], depth]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    return model.unpatchify(model.final_layer.linear(modulate(model.final_layer.norm_final(x), shift, scale)))


def small_patched_model():
    """A random DiT-S/4 on 8x8 latents, 4 rows of inputs, and its patches: mixed pool slots and one module."""
    from app.model.dit import DiT_models
    from app.model.dmp import PatchPool
    from bench.engine import random_patch, randomize_

    model = randomize_(DiT_models["DiT-S/4"](input_size=8, num_classes=10))
    cfg = model.config
    pool = PatchPool(cfg.hidden_size, cfg.num_tokens, cfg.depth, 3)
    s1, s2 = pool.install(random_patch(model, 1)), pool.install(random_patch(model, 2))
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([5., 500., 999., 0.]), torch.tensor([1, 10, 3, 2])
    return model, (x, t, y), (pool.batch(torch.tensor([s1, 0, s2, s1])), random_patch(model, 3).eval())


def test_cpu_forward_is_the_unfused_dit_math_op_for_op():
    """Fusing the block entries and deferring each MLP branch left the CPU forward bitwise what it was."""
    model, (x, t, y), patches = small_patched_model()
    with torch.no_grad():
        for patch in patches:
            assert torch.equal(model(x, t, y, patch=patch), unfused_forward(model, x, t, y, patch))


def test_triton_path_only_for_cuda_inference():
    x = torch.zeros(1, 2, 8)
    assert not use_triton(x)  # CPU without the interpreter
    if torch.cuda.is_available():
        xc = x.cuda()
        with torch.no_grad():
            assert use_triton(xc)
            with fused(False):
                assert not use_triton(xc)
            assert use_triton(xc)
        assert not use_triton(xc)  # autograd on: the kernel has no backward


def test_self_check_is_quiet_where_the_kernel_does_not_run():
    from app.model import kernels

    assert kernels.self_check("cpu") is None and not kernels.active("cpu")


def test_self_check_turns_a_failing_kernel_off(monkeypatch):
    """A kernel that cannot launch (here: Triton without a GPU or its interpreter) is caught and switched off."""
    pytest.importorskip("triton")
    from app.model import kernels

    monkeypatch.setattr(kernels, "use_triton", lambda x: kernels._fused_enabled)
    with fused(True):
        problem = kernels.self_check("cpu")
        assert problem and problem.startswith("fused Triton kernel failed")
        assert not kernels.use_triton(torch.zeros(1, 1, 8))  # the process now runs plain torch
        x, _, shift, scale, *_ = random_case()
        assert torch.equal(add_norm_modulate(x, shift, scale, 1e-6)[1],
                           add_norm_modulate_reference(x, shift, scale, 1e-6)[1])


def test_self_check_turns_a_wrong_kernel_off(monkeypatch):
    from app.model import kernels

    monkeypatch.setattr(kernels, "use_triton", lambda x: kernels._fused_enabled)
    monkeypatch.setattr(kernels, "add_norm_modulate", lambda x, *a, **k: (x, torch.zeros_like(x)))
    with fused(True):
        assert kernels.self_check("cpu").startswith("fused Triton kernel disagrees with the torch reference")
        assert not kernels._fused_enabled


def within(out, ex, eps, scale):
    return bool(((out.double() - ex).abs() <= eps * scale + 1e-6).all())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 16, 40), (4, 256, 1152), (1, 64, 2048)])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_kernel_matches_exact_math(dtype, shape, name):
    B, N, D = shape
    eps = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    for seed, slots in ((0, True), (1, False)):  # fresh inputs each time
        case = random_case(B=B, N=N, D=D, S=5, L=4, dtype=dtype, device="cuda", seed=seed, slots=slots)
        x, _, shift, scale, *_ = case
        kw = variant_args(case, name)
        with torch.no_grad():
            out_x, out_h = add_norm_modulate(x, shift, scale, 1e-6, **kw)
        ex_x, ex_h, mag_x, mag_h = exact(x, shift, scale, 1e-6, **kw)
        assert out_x.dtype == out_h.dtype == dtype and torch.isfinite(out_h).all()
        assert within(out_x, ex_x, eps, mag_x)
        assert within(out_h, ex_h, 2 * eps, mag_h)


INTERPRET_CHECK = """
import torch
from app.model import kernels as K
from tests.model.test_kernels import VARIANTS, exact, random_case, variant_args, within
assert K.INTERPRET
# the interpreter casts by truncation (the GPU rounds to nearest): one unit in the last place, not half
for dtype, eps in ((torch.float32, 1e-6), (torch.bfloat16, 2 ** -7)):
    for B, N, D in ((3, 16, 40), (2, 8, 1100)):
        for name in VARIANTS:
            for slots in (True, False):
                case = random_case(B=B, N=N, D=D, S=5, L=4, dtype=dtype, seed=B * D, slots=slots)
                x, _, shift, scale, *_ = case
                kw = variant_args(case, name)
                with torch.no_grad():
                    assert K.use_triton(x)
                    out_x, out_h = K.add_norm_modulate(x, shift, scale, 1e-6, **kw)
                ex_x, ex_h, mag_x, mag_h = exact(x, shift, scale, 1e-6, **kw)
                assert (out_x is x) == (kw["residual"] is None and kw["prompt"] is None)
                assert torch.isfinite(out_h).all(), (dtype, B, N, D, name)
                assert within(out_x, ex_x, eps, mag_x), (dtype, B, N, D, name, slots)
                assert within(out_h, ex_h, 2 * eps, mag_h), (dtype, B, N, D, name, slots)

# the start-up check passes and leaves the kernel on
assert K.self_check("cpu") is None and K.self_check("cpu", 1100, torch.bfloat16) is None and K.active("cpu")

# a whole patched DiT forward, mixed slots and one shared patch: kernel path vs the reference path, fp32
from tests.model.test_kernels import small_patched_model
model, (x, t, y), patches = small_patched_model()
with torch.no_grad():
    for patch in patches + (None,):
        with K.fused(True):
            a = model(x, t, y, patch=patch)
        with K.fused(False):
            b = model(x, t, y, patch=patch)
        assert not torch.equal(a, b)  # the two paths really ran (different rounding)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
print("ok")
"""


def test_triton_kernel_in_interpreter_mode_on_cpu():
    """The Triton kernel itself (not the reference), run by Triton's CPU interpreter in a subprocess."""
    pytest.importorskip("triton")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRET_CHECK], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
