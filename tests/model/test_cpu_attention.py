"""The CPU attention kernel: exact attention within its rounding, taken only for CPU inference at the shapes it
takes, and called from compiled steps through the dispatcher (no Python, no GIL); likewise the GELU op."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.model import cpu_attention
from app.model.dit import GELU_TANH_2C, Attention, DiT, DiTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
built = pytest.mark.skipif(not cpu_attention.load(), reason=f"kernel not built here: {cpu_attention.status()}")


def flash(qkv: torch.Tensor) -> torch.Tensor:
    """torch's own CPU flash kernel on the same (B, N, 3, H, Dh) values -> (B, N, H * Dh)."""
    B, N, _, H, Dh = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * Dh)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(2z) in the caller's precision: F.gelu's 0.5 x (1 + tanh z) cancels to 0 below x ~ -7 even in fp64."""
    return x * torch.sigmoid(GELU_TANH_2C * (x + 0.044715 * x ** 3))


def worst(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest error relative to |want| + 1."""
    return ((got.double() - want).abs() / (want.abs() + 1)).max().item()


def exact(qkv: torch.Tensor) -> torch.Tensor:
    """fp64 SDPA of the same (B, N, 3, H, Dh) values -> (B, N, H * Dh)."""
    B, N, _, H, Dh = qkv.shape
    q, k, v = qkv.double().permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * Dh)


@built
@pytest.mark.parametrize("shape", [(3, 64, 4, 16), (2, 128, 2, 32), (1, 128, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_is_exact_attention_up_to_rounding(shape, dtype):
    B, N, H, Dh = shape
    g = torch.Generator().manual_seed(sum(shape))
    qkv = (torch.randn(B, N, 3, H, Dh, generator=g) * 2).to(dtype)  # peaked softmaxes as well as flat ones
    want = exact(qkv)
    # fp32 products: fp32 within a few ulps, bf16 within its one rounding of the output. bf16 products (AVX512_BF16)
    # round the probabilities to bf16 as torch's flash kernel does: no worse than flash on the same values
    bf16_dot = dtype == torch.bfloat16 and torch.ops.dmp.qkv_attention_bf16_dot()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    for threads in (1, 2):
        torch.set_num_threads(threads)
        got = cpu_attention.qkv_attention(qkv)
        assert got.dtype == dtype and got.shape == (B, N, H * Dh)
        if bf16_dot:
            assert worst(got, want) <= 1.05 * worst(flash(qkv), want) and worst(got, want) <= 2 ** -7
        else:
            assert worst(got, want) <= tol
    torch.set_num_threads(1)


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_op_is_the_tanh_gelu_up_to_rounding(dtype):
    """exp_u20 inside: fp32 within a few 1e-6 relative; bf16 within its one rounding. Odd length: the vector tail;
    large |x|: the exp's clamping still gives x and (-)0."""
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 30.0, -30.0, 1e4, -1e4])
    x = torch.cat([torch.randn(4099, generator=g) * 3, edges]).to(dtype)
    want = tanh_gelu(x.double())
    got = cpu_attention.gelu_tanh(x)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((got.double() - want).abs() <= tol * want.abs() + 1e-30).all()
    assert torch.equal(cpu_attention.gelu_tanh(x[::2]), cpu_attention.gelu_tanh(x[::2].contiguous()))


@built
def test_bf16_products_where_the_cpu_has_them():
    """VDPBF16PS only in the AVX-512 build on a CPU that has AVX512_BF16; status() says which products run."""
    has = "avx512_bf16" in Path("/proc/cpuinfo").read_text() and torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert torch.ops.dmp.qkv_attention_bf16_dot() == has
    assert cpu_attention.status() == ("on (bf16 products: AVX512_BF16)" if has else "on (fp32 products)")


@built
def test_kernel_takes_a_strided_view():
    qkv = torch.randn(2, 64, 4, 4, 16)[:, :, 1:]  # (2, 64, 3, 4, 16), not contiguous
    torch.testing.assert_close(cpu_attention.qkv_attention(qkv).double(), exact(qkv), rtol=1e-5, atol=1e-6)


def counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    kernel = cpu_attention.qkv_attention
    monkeypatch.setattr(cpu_attention, "qkv_attention", lambda qkv: calls.append(1) or kernel(qkv))
    return calls


@built
def test_attention_takes_the_kernel_for_cpu_inference_at_its_shapes_only(monkeypatch):
    calls = counting(monkeypatch)
    torch.manual_seed(0)
    attn = Attention(64, 4)  # head dim 16
    x = torch.randn(2, 64, 64)
    with torch.no_grad():
        fast = attn(x)
        assert len(calls) == 1
        cpu_attention.set_enabled(False)
        try:
            slow = attn(x)
        finally:
            cpu_attention.set_enabled(True)
        assert len(calls) == 1
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
        attn(torch.randn(2, 60, 64))  # 60 tokens: not a multiple of the tile
        Attention(36, 1)(torch.randn(1, 64, 36))  # head dim 36: not a multiple of the vector width (8 or 16 floats)
        Attention(64, 4).half()(x.half())  # no fp16 kernel
        assert len(calls) == 1
    out = attn(x)  # gradients wanted: the kernel has no backward
    out.sum().backward()
    assert len(calls) == 1 and attn.qkv.weight.grad is not None


def run_with_capability(capability: str, code: str) -> list[str]:
    """Lines printed by `code` in a fresh interpreter whose torch dispatches to `capability` (ATEN_CPU_CAPABILITY)."""
    env = os.environ | {"ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@built
@pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text(), reason="CPU without AVX2")
def test_the_avx2_build_is_exact_too():
    """ATEN_CPU_CAPABILITY=avx2 (what torch dispatches to on CPUs without AVX-512): 8 lanes, tiles of 32 tokens."""
    code = ("import torch, torch.nn.functional as F; from app.model import cpu_attention as c; assert c.load();"
            "print(tuple(torch.ops.dmp.qkv_attention_multiples()));"
            "qkv = torch.randn(2, 96, 3, 2, 24, generator=torch.Generator().manual_seed(0)) * 2;"
            "q, k, v = qkv.double().permute(2, 0, 3, 1, 4).unbind(0);"
            "want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 96, 48);"
            "print(((c.qkv_attention(qkv).double() - want).abs() <= 1e-5 * (want.abs() + 1)).all().item());"
            "print(torch.ops.dmp.qkv_attention_bf16_dot(), c.status());"  # bf16: fp32 products, one output rounding
            "qkv = qkv.bfloat16(); q, k, v = qkv.double().permute(2, 0, 3, 1, 4).unbind(0);"
            "want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 96, 48);"
            "print(((c.qkv_attention(qkv).double() - want).abs() <= 2 ** -8 * (want.abs() + 1)).all().item());"
            "x = torch.randn(1001, generator=torch.Generator().manual_seed(1)) * 3;"  # the GELU op's AVX2 build
            "xd = x.double(); want = xd * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (xd + 0.044715 * xd ** 3));"
            "print(((c.gelu_tanh(x).double() - want).abs() <= 1e-5 * want.abs() + 1e-30).all().item())")
    assert run_with_capability("avx2", code) == ["(32, 8)", "True", "False on (fp32 products)", "True", "True"]


def test_without_avx2_attention_falls_back_to_sdpa():
    """ATEN_CPU_CAPABILITY=default: torch dispatches scalar code, the kernel is not built, attention still runs."""
    code = ("import torch; from app.model import cpu_attention as c; from app.model.dit import Attention; "
            "assert not c.load(); print(c.status());"
            "torch.no_grad().__enter__(); print(tuple(Attention(64, 4)(torch.randn(1, 64, 64)).shape))")
    assert run_with_capability("default", code) == ["CPU capability DEFAULT: no AVX2 or AVX-512", "(1, 64, 64)"]


@built
def test_a_compiled_cpu_step_calls_the_kernel_from_cpp_and_matches_eager():
    """The C++ wrapper reaches the op through aoti_torch_call_dispatcher (no Python callback, so no GIL), once per
    block, and the compiled step gives the eager step's images."""
    from torch._inductor.codecache import PyCodeCache

    from app.engine.graphs import GraphedForward
    from app.model.sampling import denoise_step, eager_step, new_job

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                          num_classes=10)).eval()  # 64 tokens, head dim 16: the demo bases' attention shape
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.1)
    fwd = GraphedForward(model, None, buckets=(1,), compile=True)
    before = len(PyCodeCache.modules)
    fwd.capture()
    code = "".join(open(m.__file__).read() for m in PyCodeCache.modules[before:])
    assert code.count('aoti_torch_call_dispatcher("dmp::qkv_attention"') == model.config.depth
    assert code.count('aoti_torch_call_dispatcher("dmp::gelu_tanh"') == model.config.depth  # each block's MLP
    assert "custom_op_wrapper" not in code

    def run(step):
        job = new_job(model, y=3, seed=5, sampler="ddim", steps=4, guidance_scale=4.0, n=1)
        while not job.done:
            denoise_step(model, [job], step=step)
        return job.latents

    torch.testing.assert_close(run(fwd.step), run(eager_step(model, None)), rtol=1e-4, atol=1e-4)
