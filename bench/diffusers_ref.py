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
    with torch.device(next(model.parameters()).device):  # build in place: XL/2 is slow to init on a CPU
        ref = DiTTransformer2DModel(
            num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
            sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
            norm_eps=cfg.norm2_eps)
    sd = to_diffusers_state_dict(model.state_dict(), cfg.depth)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if k != "pos_embed.pos_embed"]:  # diffusers computes pos_embed itself
        raise ValueError(f"key conversion mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    param = next(model.parameters())
    return ref.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)


def diffusers_math(model: DiT) -> DiT:
    """The same weights under diffusers' timestep frequencies and MLP LayerNorm eps, so outputs match it."""
    param = next(model.parameters())
    with torch.device(param.device):
        twin = DiT(replace(model.config, freq_shift=1, norm2_eps=1e-5))
    twin.load_state_dict(model.state_dict())
    return twin.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)


@torch.no_grad()
def diffusers_sample(transformer, scheduler, labels: torch.Tensor, null_class: int, guidance_scale: float,
                     generator: torch.Generator) -> torch.Tensor:
    """DiTPipeline.__call__'s denoising loop (diffusers 0.42.1), verbatim except the null class (theirs is
    hard-coded to ImageNet's 1000) and no VAE: CFG on a doubled batch, the learned sigma dropped, the
    scheduler stepped on the doubled latents. Returns the final latents (B, C, H, W)."""
    from diffusers.utils.torch_utils import randn_tensor

    device, cfg = transformer.device, transformer.config
    batch_size, latent_channels = len(labels), cfg.in_channels
    latents = randn_tensor((batch_size, latent_channels, cfg.sample_size, cfg.sample_size), generator=generator,
                           device=device, dtype=transformer.dtype)
    latent_model_input = torch.cat([latents] * 2) if guidance_scale > 1 else latents
    class_labels = labels.to(device).reshape(-1)
    class_null = torch.tensor([null_class] * batch_size, device=device)
    class_labels_input = torch.cat([class_labels, class_null], 0) if guidance_scale > 1 else class_labels
    for t in scheduler.timesteps:
        if guidance_scale > 1:
            half = latent_model_input[: len(latent_model_input) // 2]
            latent_model_input = torch.cat([half, half], dim=0)
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        timesteps = t[None].to(device).expand(latent_model_input.shape[0])
        noise_pred = transformer(latent_model_input, timestep=timesteps, class_labels=class_labels_input).sample
        if guidance_scale > 1:
            eps, rest = noise_pred[:, :latent_channels], noise_pred[:, latent_channels:]
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
            eps = torch.cat([half_eps, half_eps], dim=0)
            noise_pred = torch.cat([eps, rest], dim=1)
        if cfg.out_channels // 2 == latent_channels:
            model_output, _ = torch.split(noise_pred, latent_channels, dim=1)
        else:
            model_output = noise_pred
        latent_model_input = scheduler.step(model_output, t, latent_model_input).prev_sample
    return latent_model_input.chunk(2, dim=0)[0] if guidance_scale > 1 else latent_model_input
