"""CPU kernels for inference at the demo DiTs' shapes, built on first use: self-attention (csrc/qkv_attention.cpp)
and, in compiled steps, the MLP's tanh GELU (csrc/gelu_tanh.cpp). One extension, one switch
(DMP_CPU_ATTENTION_KERNEL), one build: the GELU is too small a thing for a build of its own.

torch's CPU flash kernel spends most of a call on per-tile overhead at 64 tokens and head dim 16 (the demo bases):
one call at 16 rows took ~470 us where this kernel takes ~250 (python -m bench.attention; bench/README.md). On a
CPU with AVX512_BF16, bf16 inputs take VDPBF16PS products with the probabilities rounded to bf16, as torch's flash
kernel rounds them (a Zen 4, 16 rows: 283 -> 206 us, the same worst error as flash). The
kernel has no backward, so only inference uses it (grad off; training and anything that needs gradients keep
SDPA), and only where it was measured to pay: CPU, fp32 or bf16, tokens a multiple of its tile and at most
MAX_TOKENS, head dims a multiple of the vector width (8 floats with AVX2, 16 with AVX-512: DiT-XL/2's 72 is one only
with AVX2, and at 256 px its 256 tokens keep SDPA either way). The GELU op replaces
the kernel Inductor writes for x * sigmoid(2z) (Sleef's expf and a reciprocal) by ATen's exp_u20 and one division.

It is compiled with torch's own C++ extension builder (ninja + the system C++ compiler, which torch.compile on CPU
needs anyway) into torch's extension cache, once per machine and CPU capability (~10 s); if that fails, or the
CPU has neither AVX2 nor AVX-512, SDPA (and Inductor's GELU) are used and `status()` says why. Inductor calls the
ops through the dispatcher from its C++ wrapper, without the GIL (tests/model/test_cpu_attention.py checks the
generated code).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("qkv_attention.cpp", "gelu_tanh.cpp")]
MAX_TOKENS = 128  # faster than flash up to here; at 256 tokens slower in bf16 (python -m bench.attention)
# torch's own dispatch level -> the flags that make ATen's Vectorized<float> use it
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}

_enabled = True
_loaded: bool | None = None  # None: not tried yet
_why_not = "not built yet"
_multiples = (0, 0)  # tokens and head dims the kernel takes are multiples of these (read from the op)
_bf16_dot = False  # bf16 inputs take VDPBF16PS products (this build on this CPU; read from the op)


def set_enabled(enabled: bool) -> None:
    """Use the kernel where it applies (DMP_CPU_ATTENTION_KERNEL), or SDPA everywhere."""
    global _enabled
    _enabled = enabled


def load() -> bool:
    """Build (first time on this machine) and register the op; False, with the reason in status(), if it cannot."""
    global _loaded, _why_not, _multiples, _bf16_dot
    if _loaded is not None:
        return _loaded
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in CAPABILITY_FLAGS:
        _loaded, _why_not = False, f"CPU capability {capability}: no AVX2 or AVX-512"
        return False
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found" on every CPU-only machine, and
    try:  # through torch's own handler, which would break a JSON log (DMP_LOG_FORMAT=json)
        from torch.utils import cpp_extension
    finally:
        cpp_log.setLevel(level)
    if shutil.which("ninja") is None:  # the `ninja` wheel's binary, when the venv's bin is not on PATH
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    log.info("CPU attention kernel: loading (the first time on this machine it is compiled, ~10 s)")
    try:
        cpp_extension.load(name=f"dmp_qkv_attention_{capability.lower()}", sources=[str(p) for p in SOURCES],
                           extra_cflags=["-O3", *CAPABILITY_FLAGS[capability]], is_python_module=False)
    except Exception as exc:  # no compiler or ninja, or a failed build: SDPA keeps working
        _loaded, _why_not = False, f"build failed: {str(exc).strip().splitlines()[-1]}"
        log.warning("CPU attention kernel unavailable, using SDPA (%s)", _why_not)
        return False
    torch.library.register_fake("dmp::qkv_attention")(_fake)
    torch.library.register_fake("dmp::gelu_tanh")(torch.empty_like)
    tokens, head_dim = torch.ops.dmp.qkv_attention_multiples()
    _multiples, _loaded, _why_not = (tokens, head_dim), True, ""
    _bf16_dot = bool(torch.ops.dmp.qkv_attention_bf16_dot())
    return True


def _fake(qkv: torch.Tensor) -> torch.Tensor:
    B, N, _, H, Dh = qkv.shape
    return qkv.new_empty(B, N, H * Dh)


def status() -> str:
    """'on' (and how it multiplies bf16), or why attention on CPU runs SDPA."""
    if not _enabled:
        return "off (DMP_CPU_ATTENTION_KERNEL=false)"
    if not _loaded:
        return _why_not
    return "on (bf16 products: AVX512_BF16)" if _bf16_dot else "on (fp32 products)"


def applies(x: torch.Tensor, num_heads: int) -> bool:
    """Whether attention over x (B, N, D) runs the kernel: inference on CPU at a shape it takes, once built (the
    first eager call builds it; a compiled graph includes it only if it was built before tracing)."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if _enabled and _loaded is None and not torch.compiler.is_compiling():
        load()
    return applies_to(x.shape[1], x.shape[2], num_heads)


def applies_to(tokens: int, width: int, num_heads: int) -> bool:
    """Whether inference attention at this shape runs the kernel (enabled and built)."""
    head_dim = width // num_heads
    return (_enabled and bool(_loaded) and tokens <= MAX_TOKENS and tokens % _multiples[0] == 0
            and head_dim % _multiples[1] == 0)


def gelu_applies(x: torch.Tensor) -> bool:
    """Whether a compiled step's GELU over x runs the op: CPU inference, fp32 or bf16, once built (the engine builds it
    before tracing; a trace never builds it)."""
    return (_enabled and bool(_loaded) and x.device.type == "cpu" and not torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.bfloat16))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, exp_u20 inside (within 20 ulp of fp32's exp)."""
    return torch.ops.dmp.gelu_tanh(x)


def qkv_attention(qkv: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for qkv (B, N, 3, H, Dh); returns (B, N, H * Dh)."""
    return torch.ops.dmp.qkv_attention(qkv)
