"""Our DiT weights as a diffusers DiTTransformer2DModel: the inverse of app.model.loaders.convert_diffusers."""
from __future__ import annotations

from dataclasses import replace

import torch

from app.model.dit import DiT


def to_diffusers_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Original DiT keys -> diffusers keys; diffusers keeps a copy of the t/y embedders in every block."""
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    emb = {"timestep_embedder.linear_1": "t_embedder.mlp.0", "timestep_embedder.linear_2": "t_embedder.mlp.2",
           "class_embedder.embedding_table": "y_embedder.embedding_table"}
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            for dst, src in emb.items():
                if f"{src}.{kind}" in sd:
                    out[f"{b}norm1.emb.{dst}.{kind}"] = sd[f"{src}.{kind}"]
            q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)
            out |= {f"{b}attn1.to_q.{kind}": q, f"{b}attn1.to_k.{kind}": k, f"{b}attn1.to_v.{kind}": v}
            out[f"{b}attn1.to_out.0.{kind}"] = sd[f"blocks.{i}.attn.proj.{kind}"]
            out[f"{b}ff.net.0.proj.{kind}"] = sd[f"blocks.{i}.mlp.fc1.{kind}"]
            out[f"{b}ff.net.2.{kind}"] = sd[f"blocks.{i}.mlp.fc2.{kind}"]
            out[f"{b}norm1.linear.{kind}"] = sd[f"blocks.{i}.adaLN_modulation.1.{kind}"]
    return out


def to_diffusers(model: DiT):
    """A diffusers DiTTransformer2DModel with the same weights (class-conditional bases only)."""
    from diffusers import DiTTransformer2DModel

    cfg = model.config
    if cfg.task != "class":
        raise ValueError("diffusers' DiT is class-conditional only")
    ref = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
        norm_eps=cfg.norm2_eps)
    ref.load_state_dict(to_diffusers_state_dict(model.state_dict(), cfg.depth), strict=False)
    missing = set(ref.state_dict()) - set(to_diffusers_state_dict(model.state_dict(), cfg.depth))
    if {k for k in missing if not k.endswith("pos_embed.pos_embed")}:
        raise ValueError(f"diffusers model has weights we did not set: {sorted(missing)[:4]}")
    param = next(model.parameters())
    return ref.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)


def diffusers_math(model: DiT) -> DiT:
    """The same weights under diffusers' timestep frequencies and MLP LayerNorm eps, so outputs match it."""
    twin = DiT(replace(model.config, freq_shift=1, norm2_eps=1e-5))
    twin.load_state_dict(model.state_dict())
    param = next(model.parameters())
    return twin.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)
