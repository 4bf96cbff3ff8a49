"""The one reading of "auto" for devices and dtypes, shared by the service settings, the trainer and bench/."""
from __future__ import annotations

import re
from pathlib import Path

import torch


def pick_device(name: str = "auto") -> str:
    """`auto`: CUDA when available, else CPU; any other name as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, fp32 elsewhere; any other name is a torch dtype (`float32`, `bfloat16`, ...)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def native_bf16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX); without it torch emulates bf16, several times slower
    than fp32 (bench/README.md). Unknown (no /proc/cpuinfo) counts as native: nothing to warn about."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None
