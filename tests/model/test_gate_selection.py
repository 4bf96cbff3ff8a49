"""One gate selection for trainer and server (docs/design.md §2): at k = N and k = N - 1, in every selection mode,
the trainer's DMP module and the serving pool compute the same gates and draw the same images."""
import json

import pytest
import torch

from app.model.dmp import PatchError, PatchPool, new_patch_for, patch_from_bytes, patch_metadata_for, patch_to_bytes
from app.model.dmp.gate import select
from app.model.dmp.module import SELECTIONS
from app.model.sampling import denoise_step, eager_step, new_job
from tests.model.test_dmp import randomize_patch

N = 16  # the tiny base's tokens
TOP_KS = {"k=N": 1.0, "k=N (0.995 rounds up)": 0.995, "k=N-1": (N - 1) / N}


def trained_patch(base, selection, top_k, seed=7):
    return randomize_patch(new_patch_for(base, top_k=top_k, selection=selection, noisy_gating=False), seed=seed)


@pytest.mark.parametrize("top_k", TOP_KS.values(), ids=TOP_KS.keys())
@pytest.mark.parametrize("selection", SELECTIONS)
def test_trainer_module_and_pool_compute_the_same_gates(tiny_class, selection, top_k):
    patch = trained_patch(tiny_class, selection, top_k)
    pool = PatchPool(32, N, 3, slots=2)
    slot = pool.install(patch)
    g = torch.Generator().manual_seed(3)
    c, t_emb = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    served = pool.batch(torch.full((5,), slot)).prepare(c, t_emb).gates[:, :, 0]  # first pair: (L, B, N)
    for training in (True, False):  # the trainer's forward (noise off) and its evaluation
        patch.train(training)
        torch.testing.assert_close(patch.gates(c, t_emb), served, atol=1e-6, rtol=1e-6)
    kept = (served > 0).sum(-1)
    assert (kept == patch.k).all()
    if selection == "hard":
        assert set(served.unique().tolist()) <= {0.0, 1.0}  # at k = N: every weight 1
    else:
        torch.testing.assert_close(served.sum(-1), torch.ones(3, 5))


@pytest.mark.parametrize("top_k", [1.0, (N - 1) / N], ids=["k=N", "k=N-1"])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_trainer_model_and_server_pool_draw_the_same_images(tiny_class, selection, top_k):
    patch = trained_patch(tiny_class, selection, top_k).eval()
    served = patch_from_bytes(patch_to_bytes(patch, **patch_metadata_for(tiny_class, "tiny")), base=tiny_class)
    pool = PatchPool(32, N, 3, slots=2)
    slot = pool.install(served)
    kw = dict(y=torch.tensor([3]), seed=11, sampler="ddim", steps=6, guidance_scale=2.0)
    trainer_job, server_job = new_job(tiny_class, patch=patch, **kw), new_job(tiny_class, slot=slot, **kw)
    base_job = new_job(tiny_class, **kw)
    while not trainer_job.done:
        denoise_step(tiny_class, [trainer_job])
        denoise_step(tiny_class, [server_job], step=eager_step(tiny_class, pool))
        denoise_step(tiny_class, [base_job])
    # The random tiny base grows latents to ~100: fp32 sums in another order differ by ~3e-7 of that scale after six
    # guided steps, so the bound is relative to the largest latent, not per element (a 0.3 entry failed 1e-5 on Intel).
    scale = trainer_job.latents.abs().max()
    torch.testing.assert_close(server_job.latents, trainer_job.latents, atol=2e-6 * scale.item(), rtol=0)
    assert (server_job.latents - base_job.latents).abs().max() > 1e-2 * scale  # the patch does something


def test_hard_keeps_a_prompt_whose_softmax_underflows():
    logits = torch.tensor([[[0.0, 200.0, 1.0, 2.0]]])  # exp(-198) is 0 in fp32
    assert select(logits, 2, True).tolist() == [[[0.0, 1.0, 0.0, 1.0]]]
    assert select(logits, torch.tensor([2]), torch.tensor([True])).tolist() == [[[0.0, 1.0, 0.0, 1.0]]]
    assert select(logits, 4, True).tolist() == [[[1.0, 1.0, 1.0, 1.0]]]


def test_hard_at_k_n_trains_the_gate_straight_through(tiny_class):
    patch = trained_patch(tiny_class, "hard", 1.0).train()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.tensor([1, 2])
    out, gating = tiny_class(x, t, y, patch=patch, return_gating=True)
    assert torch.equal(gating.gates.detach(), torch.ones_like(gating.gates))
    out.square().mean().backward()
    assert patch.gate.weight.grad.abs().sum() > 0


def _with_meta(data: bytes, **changes) -> bytes:
    from safetensors.torch import load, save

    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = {k: v for k, v in header["__metadata__"].items() if k not in changes or changes[k] is not None}
    meta |= {k: v for k, v in changes.items() if v is not None}
    return save(load(data), metadata=meta)


def test_upload_refuses_a_hard_all_prompts_patch_trained_as_a_softmax(tiny_class):
    """Files from before gate_version 2 trained hard top-k at k = N as a softmax; no server computes that."""
    meta = patch_metadata_for(tiny_class, "tiny")
    old = _with_meta(patch_to_bytes(trained_patch(tiny_class, "hard", 0.995), **meta), gate_version=None)
    with pytest.raises(PatchError, match="selection=hard with top_k=0.995 keeps all 16 prompts.*'softmax'"):
        patch_from_bytes(old, base=tiny_class)
    assert patch_from_bytes(_with_meta(old, selection="softmax"), base=tiny_class).selection == "softmax"
    assert patch_from_bytes(patch_to_bytes(trained_patch(tiny_class, "hard", 1.0), **meta)).selection == "hard"
    k_n_minus_1 = _with_meta(patch_to_bytes(trained_patch(tiny_class, "hard", 15 / 16), **meta), gate_version=None)
    assert patch_from_bytes(k_n_minus_1).k == 15  # was always served as trained
    with pytest.raises(PatchError, match="gate_version '3'"):
        patch_from_bytes(_with_meta(old, gate_version="3"))


def test_compiled_step_serves_every_selection_mode_as_trained(tiny_class):
    """The compiled forward reads the same pool selection: one mixed batch of all four modes at k = N and N - 1."""
    from app.engine.graphs import GraphedForward

    model = tiny_class.requires_grad_(False)
    patches = [trained_patch(model, sel, k, seed=i).eval()
               for i, (sel, k) in enumerate((s, k) for s in SELECTIONS for k in (1.0, (N - 1) / N))]
    pool = PatchPool(32, N, 3, slots=len(patches) + 1)
    slots = torch.tensor([pool.install(p) for p in patches])
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([5.0, 250.0, 600.0, 999.0])
    y = torch.tensor([0, 3, 7, 10])
    fwd = GraphedForward(model, pool, buckets=(4,), cfg=False, compile=True)
    compiled = fwd(x, t, y, patch=pool.batch(slots))
    assert fwd.fallbacks == 0  # the compiled graph ran, not the eager forward
    with torch.no_grad():
        for i, patch in enumerate(patches):
            trained = model(x[i:i + 1], t[i:i + 1], y[i:i + 1], patch=patch.train())  # noise off: the trainer's
            torch.testing.assert_close(compiled[i:i + 1], trained, atol=1e-4, rtol=1e-4)


def test_top_k_by_comparisons_equals_the_stable_sort():
    """The serving pool's sort-free top-k (ranks by comparisons) keeps exactly what the stable argsort keeps,
    ties to the lower index, with k per row."""
    from app.model.dmp import gate

    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(6, 8, 64, generator=g) * 4).round() / 4  # many ties
    k = torch.randint(1, 65, (8,), generator=g)
    by_rank = gate.top_k_mask(logits, k)
    before, gate.RANK_MAX_ELEMENTS = gate.RANK_MAX_ELEMENTS, 0  # force the sort
    try:
        by_sort = gate.top_k_mask(logits, k)
    finally:
        gate.RANK_MAX_ELEMENTS = before
    assert torch.equal(by_rank, by_sort)
    assert torch.equal(by_rank.sum(-1), k.expand(6, 8))
