"""DMP math (docs/design.md §2): zero-init identity, gates, top-k, balancing losses, pool, baselines."""
import pytest
import torch

from app.core.errors import NoFreeSlot
from app.model.dmp import DMP, PatchError, PatchPool, importance_loss, keep_top_k, load_loss, new_patch_for


def inputs(b=3, classes=10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor([5.0, 300.0, 900.0][:b]), torch.arange(b) % classes


def randomize_patch(p: DMP, seed=0, std=0.5) -> DMP:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in p.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * std)
    return p


@pytest.mark.parametrize("gate_input", ["c", "t"])
@pytest.mark.parametrize("pt_depth", [1, 3])
def test_zero_patch_is_bit_identical_fp32(tiny_class, gate_input, pt_depth):
    x, t, y = inputs()
    patch = new_patch_for(tiny_class, pt_depth=pt_depth, gate_input=gate_input).eval()
    with torch.no_grad():
        assert torch.equal(tiny_class(x, t, y, patch=patch), tiny_class(x, t, y))


def test_zero_patch_in_training_mode_with_noise_is_still_identity(tiny_class):
    x, t, y = inputs()
    patch = new_patch_for(tiny_class).train()
    with torch.no_grad():
        assert torch.equal(tiny_class(x, t, y, patch=patch), tiny_class(x, t, y))


def test_random_patch_changes_output(tiny_class):
    x, t, y = inputs()
    patch = randomize_patch(new_patch_for(tiny_class)).eval()
    with torch.no_grad():
        assert (tiny_class(x, t, y, patch=patch) - tiny_class(x, t, y)).abs().max() > 1e-3


def test_gate_rows_sum_to_one_and_depend_on_depth(tiny_class):
    patch = randomize_patch(new_patch_for(tiny_class)).eval()
    c, t_emb = torch.randn(4, 32), torch.randn(4, 32)
    g = patch.gates(c, t_emb)  # (L, B, N)
    assert g.shape == (3, 4, 16)
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 4))
    assert (g[0] - g[2]).abs().max() > 1e-4  # depth is an input of the gate


def test_gate_matches_design_formula(tiny_class):
    """logits = W_g @ concat(g_in, [l]) + b_g, one Linear per block in the reference form."""
    patch = randomize_patch(new_patch_for(tiny_class, gate_input="t")).eval()
    c, t_emb = torch.randn(2, 32), torch.randn(2, 32)
    g = patch.gates(c, t_emb)
    for layer in range(3):
        inp = torch.cat([t_emb, torch.full((2, 1), float(layer))], dim=1)
        ref = torch.softmax(patch.gate(inp), dim=-1)
        torch.testing.assert_close(g[layer], ref)


def test_hard_top_k_keeps_exactly_k(tiny_class):
    patch = randomize_patch(new_patch_for(tiny_class, top_k=0.75)).eval()
    g = patch.gates(torch.randn(5, 32), torch.randn(5, 32))
    assert patch.k == 12
    assert ((g > 0).sum(-1) == 12).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 5))


def test_keep_top_k_per_row_k():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    g = keep_top_k(logits, torch.tensor([1, 3]))
    assert ((g > 0).sum(-1) == torch.tensor([1, 3])).all()
    assert g[0, 0] == 1.0 and g[1, 0] == 0.0


def test_keep_top_k_matches_topk_and_breaks_ties_by_index():
    logits = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))  # (L, B, N)
    k = torch.tensor([1, 4, 8, 16, 5])
    g = keep_top_k(logits, k)
    for b in range(5):
        top = logits[:, b].topk(int(k[b]), dim=-1).indices
        expect = torch.full_like(logits[:, b], float("-inf")).scatter(-1, top, logits[:, b].gather(-1, top))
        torch.testing.assert_close(g[:, b], expect.softmax(-1))
    tied = keep_top_k(torch.zeros(2, 6), 2)  # all equal: exactly k kept, the lowest indices
    assert torch.equal(tied, torch.tensor([[0.5, 0.5, 0, 0, 0, 0]] * 2))


def test_noisy_gating_only_in_training(tiny_class):
    patch = randomize_patch(new_patch_for(tiny_class))
    c = torch.randn(2, 32)
    patch.eval()
    assert torch.equal(patch.gates(c, c), patch.gates(c, c))
    patch.train()
    assert not torch.equal(patch.gates(c, c), patch.gates(c, c))


@pytest.mark.parametrize("top_k", [1.0, 0.5])
def test_load_loss_has_gradient(tiny_class, top_k):
    x, t, y = inputs()
    patch = randomize_patch(new_patch_for(tiny_class, top_k=top_k), std=0.1).train()
    _, gating = tiny_class(x, t, y, patch=patch, return_gating=True)
    loss = load_loss(gating, patch.k)
    loss.backward()
    grad = patch.gate.weight.grad
    assert loss.item() > 0 and grad is not None and grad.abs().sum() > 0


def test_reference_load_loss_has_no_gradient(tiny_class):
    x, t, y = inputs()
    patch = randomize_patch(new_patch_for(tiny_class), std=0.1).train()
    _, gating = tiny_class(x, t, y, patch=patch, return_gating=True)
    loss = load_loss(gating, patch.k, kind="reference")
    assert loss.item() == 0.0 and not loss.requires_grad


def test_importance_loss_is_cv_squared_and_differentiable(tiny_class):
    uniform = torch.full((2, 4, 8), 1 / 8)
    assert importance_loss(uniform).item() == pytest.approx(0.0, abs=1e-6)
    skewed = torch.zeros(1, 2, 4)
    skewed[..., 0] = 1.0
    # per-prompt mass (2, 0, 0, 0): var = 0.75, mean = 0.5 -> cv^2 = 3
    assert importance_loss(skewed).item() == pytest.approx(3.0, rel=1e-5)
    x, t, y = inputs()
    patch = randomize_patch(new_patch_for(tiny_class), std=0.1).train()
    _, gating = tiny_class(x, t, y, patch=patch, return_gating=True)
    importance_loss(gating.gates).backward()
    assert patch.gate.weight.grad.abs().sum() > 0


def test_plain_prompt_tuning_adds_prompts_ungated(tiny_class):
    x, t, y = inputs()
    pt = new_patch_for(tiny_class, method="pt").eval()
    assert not hasattr(pt, "gate")
    with torch.no_grad():
        assert torch.equal(tiny_class(x, t, y, patch=pt), tiny_class(x, t, y))
        pt.prompts.normal_()
    g = pt.gates(torch.randn(2, 32), torch.randn(2, 32))
    assert torch.equal(g, torch.ones_like(g))


def test_invalid_options_are_refused():
    with pytest.raises(PatchError):
        DMP(8, 4, 1, gate_input="x")
    with pytest.raises(PatchError):
        DMP(8, 4, 1, top_k=0.0)


def test_mixed_pool_batch_equals_each_sample_alone(tiny_class):
    x, t, y = inputs(3)
    p1 = randomize_patch(new_patch_for(tiny_class), seed=1).eval()
    p2 = randomize_patch(new_patch_for(tiny_class, pt_depth=2, gate_input="t", top_k=0.5), seed=2).eval()
    p3 = randomize_patch(new_patch_for(tiny_class, method="pt"), seed=3).eval()
    pool = PatchPool(32, 16, 3, slots=5)
    s1, s2, s3 = pool.install(p1), pool.install(p2), pool.install(p3)
    slots = torch.tensor([s1, s2, s3])
    with torch.no_grad():
        mixed = tiny_class(x, t, y, patch=pool.batch(slots))
        for i, p in enumerate([p1, p2, p3]):
            alone = tiny_class(x[i:i + 1], t[i:i + 1], y[i:i + 1], patch=p)
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        base = tiny_class(x, t, y, patch=pool.batch(torch.zeros(3, dtype=torch.long)))
        assert torch.equal(base, tiny_class(x, t, y))


def test_pool_install_free_reuse_keeps_other_slots(tiny_class):
    pool = PatchPool(32, 16, 3, slots=3)
    a = pool.install(randomize_patch(new_patch_for(tiny_class), seed=1))
    b = pool.install(randomize_patch(new_patch_for(tiny_class), seed=2))
    snapshot = pool.prompts[b].clone()
    addr = pool.prompts.data_ptr()
    with pytest.raises(NoFreeSlot, match="no free"):
        pool.install(new_patch_for(tiny_class))
    pool.free(a)
    c = pool.install(randomize_patch(new_patch_for(tiny_class), seed=3))
    assert c == a and torch.equal(pool.prompts[b], snapshot) and pool.prompts.data_ptr() == addr
    assert torch.equal(pool.prompts[0], torch.zeros_like(pool.prompts[0]))
    with pytest.raises(ValueError):
        pool.free(0)


def test_gate_scale_n_makes_a_uniform_gate_equal_pt_and_folds_into_the_file(tiny_class):
    from app.model.dmp import patch_from_bytes, patch_metadata_for, patch_to_bytes

    x, t, y = inputs()
    n = tiny_class.config.num_tokens
    dmp = new_patch_for(tiny_class, gate_scale=float(n)).eval()  # zero gate weights: uniform 1/N
    pt = new_patch_for(tiny_class, method="pt").eval()
    with torch.no_grad():
        dmp.prompts.normal_(generator=torch.Generator().manual_seed(0))
        pt.prompts.copy_(dmp.prompts)
        torch.testing.assert_close(tiny_class(x, t, y, patch=dmp), tiny_class(x, t, y, patch=pt))
        randomize_patch(dmp, seed=4)
        trained = tiny_class(x, t, y, patch=dmp)
    loaded = patch_from_bytes(patch_to_bytes(dmp, **patch_metadata_for(tiny_class, "tiny")), base=tiny_class)
    assert loaded.gate_scale == 1.0  # the file carries plain prompts: the server needs no new field
    pool = PatchPool(32, 16, 3, slots=2)
    slot = pool.install(loaded)
    with torch.no_grad():
        torch.testing.assert_close(tiny_class(x, t, y, patch=loaded), trained)
        torch.testing.assert_close(tiny_class(x, t, y, patch=pool.batch(torch.full((3,), slot))), trained,
                                   atol=1e-5, rtol=1e-5)


def test_hard_selection_weights_kept_prompts_one_and_survives_the_file(tiny_class):
    from app.model.dmp import patch_from_bytes, patch_metadata_for, patch_to_bytes

    x, t, y = inputs()
    hard = randomize_patch(new_patch_for(tiny_class, top_k=0.25, selection="hard"), seed=5).eval()
    g = hard.gates(torch.randn(4, 32), torch.randn(4, 32))
    assert ((g == 1).sum(-1) == hard.k).all() and ((g == 0).sum(-1) == 16 - hard.k).all()
    soft = randomize_patch(new_patch_for(tiny_class, top_k=0.25), seed=5).eval()
    assert not torch.equal(soft.gates(torch.randn(4, 32), torch.randn(4, 32)), g)  # the official renormalised one
    hard.train()  # the straight-through estimator lets the task loss reach the gate
    tiny_class(x, t, y, patch=hard).square().mean().backward()
    assert hard.gate.weight.grad.abs().sum() > 0
    loaded = patch_from_bytes(patch_to_bytes(hard.eval(), **patch_metadata_for(tiny_class, "tiny")), base=tiny_class)
    assert loaded.selection == "hard"
    pool = PatchPool(32, 16, 3, slots=2)
    slot = pool.install(loaded)
    with torch.no_grad():
        torch.testing.assert_close(tiny_class(x, t, y, patch=pool.batch(torch.full((3,), slot))),
                                   tiny_class(x, t, y, patch=hard), atol=1e-5, rtol=1e-5)
    with pytest.raises(PatchError):
        DMP(8, 4, 1, selection="ones")
