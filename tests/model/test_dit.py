"""DiT architecture: equality with diffusers and with original-layout checkpoints, config inference."""
import json

import pytest
import torch
from layouts import tiny_transformer
from safetensors.torch import save_file

from app.model import CheckpointError, DiT_models, fingerprint, load_base
from app.model.dit import TimestepEmbedder
from app.model.loaders import infer_config


def diffusers_dit(seed=0, layers=2, classes=10, sample=16):
    return tiny_transformer(seed, classes=classes, sample=sample, layers=layers)


def test_matches_diffusers_dit_fp32(tmp_path):
    dm = diffusers_dit()
    dm.save_pretrained(tmp_path)
    ours = load_base(tmp_path)
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor([1.0, 400.0, 999.0]), torch.tensor([0, 5, 10])
    with torch.no_grad():
        ref = dm(x, timestep=t, class_labels=y).sample
        out = ours(x, t, y)
    assert ours.config.freq_shift == 1 and ours.config.norm2_eps == 1e-5
    assert ref.abs().max() > 0.5  # a non-trivial output, so equality means something
    assert (ref - out).abs().max().item() <= 1e-5


def fine_tuned_diffusers_dit(layers=3):
    """A diffusers DiT whose per-block timestep/label embedder copies differ, each block's differently."""
    dm = diffusers_dit(layers=layers)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in dm.transformer_blocks[1:]:
            for p in block.norm1.emb.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return dm


def test_differing_embedder_copies_match_diffusers_fp32(tmp_path):
    dm = fine_tuned_diffusers_dit()
    dm.save_pretrained(tmp_path)
    ours = load_base(tmp_path)
    assert ours.config.block_embedders
    x, t, y = torch.randn(4, 4, 16, 16), torch.tensor([1.0, 400.0, 999.0, 50.0]), torch.tensor([0, 5, 9, 10])
    with torch.no_grad():
        ref = dm(x, timestep=t, class_labels=y).sample
        out = ours(x, t, y)
        shared = diffusers_dit(layers=3)(x, timestep=t, class_labels=y).sample  # block 0's copy everywhere
    assert (ref - shared).abs().max() > 1e-2  # the copies matter, so equality below means each is used
    assert (ref - out).abs().max().item() <= 1e-5


def test_equal_embedder_copies_load_as_one_shared_embedder(tmp_path):
    diffusers_dit().save_pretrained(tmp_path)
    ours = load_base(tmp_path)
    assert not ours.config.block_embedders and not hasattr(ours.blocks[1], "t_embedder")


def test_fingerprint_covers_each_blocks_embedder_copy(tmp_path):
    dm = fine_tuned_diffusers_dit()
    dm.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        dm.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight[3, 0] += 1e-3
    dm.save_pretrained(tmp_path / "b")
    diffusers_dit(layers=3).save_pretrained(tmp_path / "tied")
    prints = {fingerprint(load_base(tmp_path / name)) for name in ("a", "b", "tied")}
    assert len(prints) == 3


def test_per_block_embedder_base_survives_save_base(tmp_path):
    from app.model.loaders import save_base

    fine_tuned_diffusers_dit().save_pretrained(tmp_path / "d")
    ours = load_base(tmp_path / "d")
    again = load_base(save_base(ours, tmp_path / "b.safetensors"))
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(again(x, t, y), ours(x, t, y))
    assert again.config.block_embedders and fingerprint(again) == fingerprint(ours)


def test_per_block_embedder_base_trains_and_serves_a_patch(tmp_path):
    """The gate reads block 0's c; a trained patch draws the same through the serving pool."""
    from app.model.dmp import PatchPool, new_patch_for

    fine_tuned_diffusers_dit().save_pretrained(tmp_path)
    base = load_base(tmp_path)
    patch = new_patch_for(base, top_k=0.5).train()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 4])
    out, gating = base(x, t, y, patch=patch, return_gating=True)
    out.square().mean().backward()
    assert patch.prompts.grad.abs().sum() > 0 and gating.gates.shape == (3, 2, 64)
    with torch.no_grad():
        for p in patch.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    patch.eval()
    pool = PatchPool(64, 64, 3, slots=2)
    slot = pool.install(patch)
    with torch.no_grad():
        torch.testing.assert_close(base(x, t, y, patch=pool.batch(torch.full((2,), slot))),
                                   base(x, t, y, patch=patch), atol=1e-5, rtol=1e-5)


def test_timestep_frequency_variants_differ():
    t = torch.tensor([10.0, 500.0])
    a = TimestepEmbedder.timestep_embedding(t, 256, freq_shift=0)
    b = TimestepEmbedder.timestep_embedding(t, 256, freq_shift=1)
    assert (a - b).abs().max() > 0.1


@pytest.mark.parametrize("wrap", ["plain", "ema", "model"])
def test_original_pt_layout_loads_strict_and_matches(tmp_path, tiny_class, wrap):
    sd = tiny_class.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(sd if wrap == "plain" else {wrap: sd, "opt": {"lr": 1e-4}}, path)
    loaded = load_base(path, num_heads=4)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), tiny_class(x, t, y))
    assert loaded.config == tiny_class.config
    assert fingerprint(loaded) == fingerprint(tiny_class)


def test_plain_safetensors_without_metadata(tmp_path, tiny_class):
    save_file({k: v.contiguous() for k, v in tiny_class.state_dict().items()}, tmp_path / "b.safetensors")
    loaded = load_base(tmp_path / "b.safetensors", num_heads=4)
    assert loaded.config == tiny_class.config


def test_nonstandard_width_needs_heads(tmp_path, tiny_class):
    torch.save(tiny_class.state_dict(), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="num_heads"):
        load_base(tmp_path / "c.pt")


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, capfd):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):  # print was an inert stand-in, never called
        load_base(tmp_path / "evil.pt")
    assert "pwned" not in capfd.readouterr().out


def test_standard_sizes_infer_heads():
    sd = DiT_models["DiT-S/8"](input_size=16, num_classes=7).state_dict()
    cfg = infer_config(sd)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.num_classes, cfg.input_size) == \
        (384, 12, 6, 8, 7, 16)


def test_size_factories_cover_the_table():
    assert {f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)} <= set(DiT_models)


def test_text_model_conditions_on_embedding(tiny_text):
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 100.0])
    emb = torch.randn(2, 16)
    with torch.no_grad():
        a = tiny_text(x, t, emb)
        b = tiny_text(x, t, tiny_text.null_y(2, "cpu"))
    assert a.shape == (2, 8, 8, 8) and (a - b).abs().max() > 1e-4
    assert tiny_text.config.task == "text"


def test_original_key_names(tiny_class):
    keys = set(tiny_class.state_dict())
    for k in ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight", "pos_embed",
              "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "blocks.0.adaLN_modulation.1.weight",
              "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"]:
        assert k in keys


def test_base_safetensors_roundtrip_keeps_config_and_metadata(tmp_path, tiny_text):
    from app.model import save_base

    save_base(tiny_text, tmp_path / "m.safetensors", name="m", labels=["a", "b"])
    loaded = load_base(tmp_path / "m.safetensors")
    assert loaded.config == tiny_text.config and loaded.meta["name"] == "m"
    assert json.loads(loaded.meta["labels"]) == ["a", "b"]
    assert fingerprint(loaded) == fingerprint(tiny_text)


def test_saved_pipeline_has_no_labels_until_a_sidecar_or_id2label_adds_them(tmp_path):
    from layouts import ID2LABEL, tiny_vae, write_pipeline

    from app.model.describe import describe

    folder = write_pipeline(tmp_path / "mine", fine_tuned_diffusers_dit(), tiny_vae(), id2label=None)
    assert describe(folder).labels == []  # DiTPipeline.save_pretrained writes no id2label
    (tmp_path / "mine.json").write_text(json.dumps({"labels": [f"class {i}" for i in range(10)]}))
    assert describe(folder).labels[3] == "class 3"
    (tmp_path / "mine.json").unlink()
    write_pipeline(folder, fine_tuned_diffusers_dit(), tiny_vae(), id2label=ID2LABEL)
    assert describe(folder).labels[1] == "goldfish, Carassius auratus"
    assert load_base(folder).config.block_embedders


def test_unlabelled_base_needs_class_folders_named_by_number(tmp_path):
    from types import SimpleNamespace

    from app.trainer.data import DataError
    from app.trainer.train import unlabelled_base_classes

    for name in ("0", "7"):
        (tmp_path / name).mkdir()
    assert unlabelled_base_classes(SimpleNamespace(name="mine"), str(tmp_path), 10)[7] == "7"
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match=r"base mine has no labels.*0-9, not cat.*mine.json"):
        unlabelled_base_classes(SimpleNamespace(name="mine"), str(tmp_path), 10)
