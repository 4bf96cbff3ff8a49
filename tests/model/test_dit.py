"""DiT architecture: equality with diffusers and with original-layout checkpoints, config inference."""
import json

import pytest
import torch
from safetensors.torch import save_file

from app.model import CheckpointError, DiT_models, fingerprint, load_base
from app.model.dit import DiT, TimestepEmbedder
from app.model.loaders import infer_config

from layouts import tiny_transformer


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


def test_diffusers_folder_with_differing_embedder_copies_is_refused(tmp_path):
    dm = diffusers_dit()
    with torch.no_grad():
        dm.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight.add_(1.0)
    dm.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="differs"):
        load_base(tmp_path)


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
