"""The readings of "auto", and the warning for bf16 on a CPU that only emulates it."""
from __future__ import annotations

import logging

import pytest

import app.engine.bases as bases
from app.core.config import Settings
from app.core.devices import native_bf16_cpu
from app.core.metrics import Metrics

AVX2_ONLY = "flags\t\t: fpu sse sse2 avx avx2 fma bmi2\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert not native_bf16_cpu(AVX2_ONLY)
    assert not native_bf16_cpu(AVX2_ONLY.replace("avx2", "avx2 avx512f avx512bw avx512_vnni"))  # no bf16 dot
    assert native_bf16_cpu(AVX2_ONLY.replace("avx2", "avx2 avx512_bf16"))
    assert native_bf16_cpu(AVX2_ONLY.replace("avx2", "avx2 amx_tile amx_bf16"))


@pytest.mark.parametrize("dtype,native,warned", [("bfloat16", False, True), ("bfloat16", True, False),
                                                 ("float32", False, False)])
def test_compiled_bf16_on_an_emulating_cpu_is_warned_at_load(class_only_dirs, monkeypatch, caplog, dtype, native,
                                                             warned):
    monkeypatch.setattr(bases, "native_bf16_cpu", lambda: native)
    settings = Settings(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"], device="cpu",
                        dtype=dtype, cpu_compile=True)
    with caplog.at_level(logging.WARNING, logger=bases.log.name):
        loaded, _ = bases.load_bases(settings, Metrics())
    assert next(iter(loaded.values())).forward is not None  # the compiled path: weights in the serving dtype
    assert any("emulates it" in r.getMessage() for r in caplog.records) == warned
