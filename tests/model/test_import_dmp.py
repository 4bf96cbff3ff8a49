"""`python -m app import-dmp`: official sangminwoo/DMP checkpoints (random weights in its exact layout, its OmegaConf
config pickled beside them) become our base + patch whose patched forward equals an independent re-implementation
of the official forward."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from app.__main__ import main
from app.model import load_base, load_patch
from app.model.loaders import CheckpointError
from app.model.official import import_dmp

D, HEADS, DEPTH, P, C, GRID = 384, 6, 4, 2, 4, 4  # DiT-S width (6 heads), 4 blocks, 8x8 latents -> 16 tokens
N = GRID * GRID


def official_state_dict(seed: int, rows: int, pt_depth: int, gate: str = "linear") -> dict[str, torch.Tensor]:
    """Every tensor the official DiT + DMP module saves, random (adaLN not zero, so every block matters)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"x_embedder.proj.weight": (D, C, P, P), "x_embedder.proj.bias": (D,), "pos_embed": (1, N, D),
              "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,), "t_embedder.mlp.2.weight": (D, D),
              "t_embedder.mlp.2.bias": (D,), "y_embedder.embedding_table.weight": (rows, D),
              "final_layer.linear.weight": (P * P * 2 * C, D), "final_layer.linear.bias": (P * P * 2 * C,),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
              "prompt_embeddings": (pt_depth, N, D)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes |= {b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D),
                   b + "attn.proj.bias": (D,), b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                   b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
                   b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,)}
    if gate == "linear":
        shapes |= {"gate.weight": (N, D + 1), "gate.bias": (N,), "w_noise": (D, N)}
    elif gate == "attention":
        shapes |= {"gate.w_q.weight": (D, D), "gate.w_k.weight": (D, D), "gate.w_v.weight": (D, D)}
    sd = {k: torch.randn(s, generator=g) / math.sqrt(s[-1]) for k, s in shapes.items()}
    sd["prompt_embeddings"] *= 5  # large enough to change the output visibly
    if "gate.weight" in sd:
        sd["gate.weight"] *= 3  # uneven gates, but not so peaked that dropping half the prompts changes nothing
    return sd


def official_config(**over):
    cfg = {"general": {"schedule_name": "cosine", "vae": "ema", "image_size": 64, "type": "add"},
           "models": {"name": "DiT-S/2", "vp": {"num_tokens": N, "topk": 1.0, "type": "add", "uncond": False,
                                                 "init_type": "zero", "gate_type": "linear", "pt_depth": 3}},
           "data": {"name": "ImageNet", "num_classes": 5, "is_uncond": False}, "eval": {"cfg_scale": 1.5}}
    for dotted, value in over.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return OmegaConf.create(cfg)


def save_official(path, ema, model, config):
    opt_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(N, D)}},
                 "param_groups": [{"lr": 1e-4}]}
    torch.save({"model": model, "ema": ema, "opt": opt_state, "config": config}, path)


def reference_forward(sd, x, t, y, topk: float):
    """The official DiT.forward in vp_type='add' / gate_type='linear', eval mode, written out in plain torch."""
    B = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]

    def ln_mod(v, shift, scale):
        return F.layer_norm(v, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    prompts = sd["prompt_embeddings"]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        if i < prompts.shape[0]:
            logits = F.linear(torch.cat([c, torch.full((B, 1), float(i))], dim=-1), sd["gate.weight"], sd["gate.bias"])
            k = int(topk * N)
            top_v, top_i = logits.topk(min(k + 1, N), dim=1)
            gates = torch.zeros_like(logits).scatter(1, top_i[:, :k], F.softmax(top_v[:, :k], dim=-1))
            h = h + prompts[i][None] * gates[..., None]
        mod = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"]).chunk(6, 1)
        a = ln_mod(h, mod[0], mod[1])
        qkv = F.linear(a, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k_, v = qkv.reshape(B, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        att = ((q @ k_.transpose(-2, -1)) * (D // HEADS) ** -0.5).softmax(dim=-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(B, N, D), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = h + mod[2][:, None] * att
        m = ln_mod(h, mod[3], mod[4])
        m = F.linear(F.gelu(F.linear(m, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        h = h + mod[5][:, None] * m
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(ln_mod(h, shift, scale), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    out = out.reshape(B, GRID, GRID, P, P, 2 * C)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, 2 * C, GRID * P, GRID * P)


def inputs(classes: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, C, GRID * P, GRID * P, generator=g)
    t = torch.tensor([0, 1, 50, 400, 999, 700])
    y = torch.randint(0, classes, (6,), generator=g) if classes else torch.zeros(6, dtype=torch.long)
    return x, t, y


def ours(base_path, patch_path, x, t, y):
    base = load_base(base_path)
    patch = load_patch(patch_path, base=base)
    with torch.no_grad():
        return base(x, t, y, patch=patch), base(x, t, y)


@pytest.mark.parametrize("topk", [1.0, 0.5])
def test_imported_patch_reproduces_the_official_forward(tmp_path, topk):
    ema, model = official_state_dict(0, rows=6, pt_depth=3), official_state_dict(1, rows=6, pt_depth=3)
    save_official(tmp_path / "0050000.pt", ema, model, official_config(**{"models.vp.topk": topk}))
    done = import_dmp(tmp_path / "0050000.pt", tmp_path / "b.safetensors", tmp_path / "p.safetensors", name="inet")
    assert done.weights == "ema" and done.notes == []
    x, t, y = inputs(5)
    patched, plain = ours(done.base_path, done.patch_path, x, t, y)
    expected = reference_forward(ema, x, t, y, topk)
    err = (patched - expected).abs().max().item()
    print(f"import-dmp topk={topk}: max |ours - official| = {err:.2e} (output scale {expected.abs().max():.2f})")
    assert err < 1e-4
    assert (plain - expected).abs().max() > 1e-2  # the patch is what makes them equal
    other_k = reference_forward(ema, x, t, y, 1.5 - topk)  # and top-k selection is part of it
    assert (patched - other_k).abs().max() > 1e-2
    meta = load_base(done.base_path).meta
    assert (meta["beta_schedule"], meta["vae"], meta["name"]) == ("cosine", "stabilityai/sd-vae-ft-ema", "inet")
    assert load_patch(done.patch_path).metadata["domain"] == "ImageNet"


def test_weights_model_and_uncond_ffhq_layout(tmp_path):
    ema, model = official_state_dict(2, rows=1, pt_depth=4), official_state_dict(3, rows=1, pt_depth=4)
    cfg = official_config(**{"data.name": "FFHQ", "data.num_classes": 1, "data.is_uncond": True,
                             "models.vp.uncond": True})
    save_official(tmp_path / "c.pt", ema, model, cfg)
    code = main(["import-dmp", str(tmp_path / "c.pt"), "--base-out", str(tmp_path / "b.safetensors"),
                 "--patch-out", str(tmp_path / "p.safetensors"), "--weights", "model", "--vae", "/some/vae"])
    assert code == 0
    x, t, y = inputs(0)
    patched, _ = ours(tmp_path / "b.safetensors", tmp_path / "p.safetensors", x, t, y)
    assert load_base(tmp_path / "b.safetensors").config.task == "uncond"
    assert (patched - reference_forward(model, x, t, y, 1.0)).abs().max() < 1e-4


def test_without_config_the_defaults_are_said(tmp_path):
    torch.save({"ema": official_state_dict(4, rows=6, pt_depth=2)}, tmp_path / "bare.pt")
    done = import_dmp(tmp_path / "bare.pt", tmp_path / "b.safetensors", tmp_path / "p.safetensors")
    assert len(done.notes) == 2 and "vp.type=add" in done.notes[0]


@pytest.mark.parametrize("case, message", [
    ("prepend", "only the 'add' mode"),
    ("attention-gate", "non-linear gate"),
    ("no-prompts", "not a DMP patch"),
])
def test_what_cannot_be_converted_is_refused(tmp_path, case, message, capsys):
    sd = official_state_dict(6, rows=6, pt_depth=2, gate="attention" if case == "attention-gate" else "linear")
    if case == "no-prompts":
        del sd["prompt_embeddings"], sd["gate.weight"], sd["gate.bias"], sd["w_noise"]
    cfg = official_config(**({"models.vp.type": "prepend"} if case == "prepend" else {}))
    save_official(tmp_path / "c.pt", sd, sd, cfg)
    with pytest.raises(CheckpointError, match=message):
        import_dmp(tmp_path / "c.pt", tmp_path / "b.safetensors", tmp_path / "p.safetensors")
    assert main(["import-dmp", str(tmp_path / "c.pt"), "--base-out", str(tmp_path / "b.safetensors"),
                 "--patch-out", str(tmp_path / "p.safetensors")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "b.safetensors").exists()
