"""Fused gate-and-add: the CPU fallback equals the reference math; the Triton kernel equals it on GPU."""
import pytest
import torch

from app.engine.kernels import gate_add, gate_add_reference, triton_available

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_case(B=5, S=4, L=3, N=16, D=40, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(device, dtype)
    gates = torch.randn(B, N, generator=g).softmax(-1).to(device)  # (B, N) fp32, as PooledPatch makes them
    pool = torch.randn(S, L, N, D, generator=g).to(device)
    slots = torch.randint(0, S, (B,), generator=g).to(device)
    return x, gates, pool, slots


def loop_math(x, gates, pool, slots, depth):
    """x[b] + g[b, n] * P[slot_b, depth, n, :], one sample at a time in fp64."""
    rows = [x[b].double() + gates[b, :, None].double() * pool[slots[b], depth].double() for b in range(x.shape[0])]
    return torch.stack(rows)


@pytest.mark.parametrize("depth", [0, 2])
def test_fallback_equals_reference_math_fp32(depth):
    x, gates, pool, slots = random_case()
    out = gate_add(x, gates, pool, slots, depth)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), loop_math(x, gates, pool, slots, depth), rtol=0, atol=1e-6)
    assert torch.equal(out, gate_add_reference(x, gates, pool, slots, depth))


def test_fallback_bf16_within_documented_tolerance():
    x, gates, pool, slots = random_case(dtype=torch.bfloat16)
    out = gate_add(x, gates, pool, slots, 1)
    assert out.dtype == torch.bfloat16
    ref = loop_math(x, gates, pool, slots, 1)
    scale = x.double().abs() + (gates[..., None].double() * pool[slots, 1].double()).abs()
    assert ((out.double() - ref).abs() <= 2 * 2 ** -8 * scale + 1e-6).all()


def test_pooled_state_add_matches_reference_on_cpu():
    from app.model.dmp import PooledState

    x, gates, pool, slots = random_case()
    state = PooledState(gates[None].expand(3, -1, -1), pool, slots)
    assert torch.equal(state.add(x, 2), gate_add_reference(x, gates, pool, slots, 2))
    assert not triton_available(x)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 16, 40), (4, 256, 1152), (1, 64, 2048)])
def test_triton_kernel_matches_fallback(dtype, shape):
    B, N, D = shape
    for seed in range(2):  # fresh inputs each time
        x, gates, pool, slots = random_case(B=B, N=N, D=D, S=5, L=4, dtype=dtype, device="cuda", seed=seed)
        assert triton_available(x)
        out = gate_add(x, gates, pool, slots, 3)
        ref = loop_math(x.cpu(), gates.cpu(), pool.cpu(), slots.cpu(), 3).cuda()
        assert out.dtype == dtype and torch.isfinite(out).all()
        eps = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
        scale = x.double().abs() + (gates[..., None].double() * pool[slots, 3].double()).abs()
        assert ((out.double() - ref).abs() <= eps * scale + 1e-6).all()
        fallback = gate_add_reference(x, gates, pool, slots, 3)  # rounds g, P and g*P first: a few ulps off
        assert ((out.double() - fallback.double()).abs() <= 4 * eps * scale + 1e-6).all()


@gpu
@pytest.mark.gpu
def test_triton_kernel_non_contiguous_input():
    x, gates, pool, slots = random_case(B=4, N=16, D=64, device="cuda")
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
    assert not xt.is_contiguous()
    torch.testing.assert_close(gate_add(xt, gates, pool, slots, 1), gate_add_reference(x, gates, pool, slots, 1))


INTERPRET_CHECK = """
import torch, triton
from app.engine import kernels as K
# the interpreter casts by truncation (the GPU rounds to nearest): one unit in the last place, not half
for dtype, eps in ((torch.float32, 1e-6), (torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)):
    for B, N, D in ((3, 16, 40), (2, 8, 1100)):
        g = torch.Generator().manual_seed(B * D)
        x = torch.randn(B, N, D, generator=g).to(dtype)
        gates = torch.randn(B, N, generator=g).softmax(-1)
        pool = torch.randn(5, 4, N, D, generator=g)
        slots = torch.randint(0, 5, (B,), generator=g)
        out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
        block = min(1024, triton.next_power_of_2(D))
        K._gate_add_kernel[(B * N, triton.cdiv(D, block))](x, gates, pool, slots, out, N, D, 3, 4, BLOCK_D=block)
        ref = x.double() + gates[..., None].double() * pool[slots, 3].double()
        scale = x.double().abs() + (gates[..., None].double() * pool[slots, 3].double()).abs()
        assert torch.isfinite(out).all(), (dtype, B, N, D)
        assert ((out.double() - ref).abs() <= eps * scale + 1e-6).all(), (dtype, B, N, D)
print("ok")
"""


def test_triton_kernel_in_interpreter_mode_on_cpu():
    """The Triton kernel itself (not the fallback), run by Triton's CPU interpreter in a subprocess."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRET_CHECK], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
