"""Prepacked CPU linears (app/model/cpu_linear.py): the same forward, the same fingerprint, only where they pay."""
from __future__ import annotations

import copy

import pytest
import torch

from app.core.config import Settings
from app.core.metrics import Metrics
from app.engine.bases import load_bases
from app.model import cpu_linear
from app.model.cpu_linear import PackedLinear, can_pack, pack_linears
from app.model.dit import DiT, DiTConfig
from app.model.loaders import fingerprint, save_base
from app.model.sampling import denoise_step, eager_step, new_job


def small_dit(hidden: int, depth: int = 2, num_heads: int = 6) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=hidden, depth=depth,
                          num_heads=num_heads, num_classes=10)).eval()
    for p in model.parameters():  # DiT's init zeroes the adaLN and final layers: that would hide a wrong product
        p.data.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not cpu_linear.bf16_supported(), reason="this CPU's oneDNN has no bf16 kernels (AVX2 only)"))])
def test_packed_forward_equals_the_plain_one_and_keeps_the_fingerprint(dtype):
    plain = small_dit(384).to(dtype)
    before = fingerprint(plain)
    packed = copy.deepcopy(plain)
    assert pack_linears(packed) == 2 * 5 + 1  # per block qkv, proj, fc1, fc2, adaLN; the final adaLN (384 x 768)
    assert isinstance(packed.blocks[0].attn.qkv, PackedLinear)
    assert isinstance(packed.final_layer.linear, torch.nn.Linear)  # 384 x 16: below PACK_MIN_WEIGHT
    x, t, y = torch.randn(4, 4, 8, 8, dtype=dtype), torch.tensor([1.0, 250, 500, 999]), torch.tensor([1, 2, 10, 3])
    with torch.no_grad():
        want, got = plain(x, t, y).float(), packed(x, t, y).float()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]  # bf16: oneDNN may sum in another order
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert fingerprint(packed) == before  # taken before the packed weights left the state_dict


def test_bf16_stays_plain_where_onednn_has_no_bf16_kernels(monkeypatch):
    monkeypatch.setattr(cpu_linear, "bf16_supported", lambda: False)  # an AVX2-only CPU, e.g. a Zen 3
    assert can_pack(small_dit(384))
    model = small_dit(384).to(torch.bfloat16)
    assert not can_pack(model)
    with pytest.raises(ValueError, match="bf16"):  # not oneDNN's RuntimeError from inside the reorder
        pack_linears(model)


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_measured_packing_packs_only_the_shapes_that_paid(monkeypatch, ratio):
    timed: list[tuple[int, int, int]] = []

    def packed_over_plain(linear, rows):
        timed.append((rows, linear.in_features, linear.out_features))
        return ratio

    monkeypatch.setattr(cpu_linear, "packed_over_plain", packed_over_plain)
    model = small_dit(384)
    assert pack_linears(model, measure=True) == (11 if ratio < cpu_linear.PACK_MARGIN else 0)
    # each shape timed once, at a CFG pair's rows: 2 x 16 tokens for attention and MLP, one row per image for adaLN
    assert sorted(timed) == [(2, 384, 768), (2, 384, 2304), (32, 384, 384), (32, 384, 1152), (32, 384, 1536),
                             (32, 1536, 384)]
    assert isinstance(model.blocks[1].mlp.fc2, PackedLinear) == (ratio < 1)


def test_measured_packing_keeps_the_forward():
    plain = small_dit(384)
    packed = copy.deepcopy(plain)
    assert 0 <= pack_linears(packed, measure=True) <= 11  # what pays depends on the CPU
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 999]), torch.tensor([1, 10])
    with torch.no_grad():
        torch.testing.assert_close(packed(x, t, y), plain(x, t, y), rtol=1e-5, atol=1e-5)
    assert cpu_linear.packed_over_plain(torch.nn.Linear(384, 1536), 32) > 0


def test_demo_sized_layers_stay_plain():
    assert pack_linears(small_dit(64, num_heads=4)) == 0  # hidden 64: oneDNN's per-call cost outweighs the reorder


def test_an_eager_fp32_cpu_base_is_served_with_packed_linears_and_steps_as_before(tmp_path, monkeypatch):
    model = small_dit(384)
    save_base(model, tmp_path / "models" / "wide.safetensors", vae="pixel")
    (tmp_path / "patches").mkdir()
    timed: list[int] = []  # the engine measures at load; here packing pays everywhere
    monkeypatch.setattr(cpu_linear, "packed_over_plain", lambda linear, rows: timed.append(rows) or 0.5)
    base = load_bases(Settings(model_dir=tmp_path / "models", patch_dir=tmp_path / "patches", device="cpu"),
                      Metrics(), "wide")[0]["wide"]
    assert timed and base.forward is None and isinstance(base.model.blocks[1].mlp.fc2, PackedLinear)
    assert base.fingerprint == fingerprint(model)  # patches made for the base still match it

    def latents(m: DiT) -> torch.Tensor:
        job = new_job(m, y=3, seed=7, sampler="ddim", steps=3, guidance_scale=2.0)
        step = eager_step(m, base.patches.pool) if m is base.model else None
        while not job.done:
            denoise_step(m, [job], step=step)
        return job.latents

    # oneDNN sums in another order than MKL: fp32 ulps, grown over three steps of a random-weight model
    torch.testing.assert_close(latents(base.model), latents(model), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype,compiled", [("bfloat16", False), ("float32", True)])
def test_an_eager_bf16_or_a_compiled_base_keeps_its_linears(tmp_path, dtype, compiled):
    save_base(small_dit(384), tmp_path / "models" / "wide.safetensors", vae="pixel")
    (tmp_path / "patches").mkdir()
    base = load_bases(Settings(model_dir=tmp_path / "models", patch_dir=tmp_path / "patches", device="cpu",
                               dtype=dtype, cpu_compile=compiled), Metrics(), "wide")[0]["wide"]
    # eager bf16 runs under autocast, which does not reach the oneDNN op; a compiled graph's freezing packs its own
    assert (base.forward is not None) == compiled
    assert isinstance(base.model.blocks[0].attn.qkv, torch.nn.Linear)
