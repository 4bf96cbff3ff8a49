"""Tiny random latent bases in every layout a user brings (docs/design.md §4b), for the layout and trainer tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus", "2": "crane"}


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """The SD AutoencoderKL architecture at toy width (2 levels: 2x downscale), random weights."""
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                         sample_size=16).eval()


def tiny_transformer(seed: int = 0, classes: int = 3, sample: int = 8, layers: int = 2) -> DiTTransformer2DModel:
    """A class-conditional diffusers DiT on 4-channel latents with random (non-identity) weights."""
    torch.manual_seed(seed)
    dm = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                               num_layers=layers, sample_size=sample, patch_size=2, num_embeds_ada_norm=classes)
    sd = {k: torch.randn_like(v) * 0.1 for k, v in dm.state_dict().items()}
    for k in list(sd):  # diffusers keeps one embedder copy per block; a real checkpoint has them equal
        if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
            sd[k] = sd["transformer_blocks.0." + k.split(".", 2)[2]]
    dm.load_state_dict(sd)
    return dm.eval()


def tie_embedders(dm: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Every block's copy of the timestep/label embedder set to block 0's, as in a real (converted) checkpoint."""
    first = dict(dm.transformer_blocks[0].norm1.emb.named_parameters())
    with torch.no_grad():
        for block in dm.transformer_blocks[1:]:
            for name, p in block.norm1.emb.named_parameters():
                p.copy_(first[name])
    return dm


def write_pipeline(folder: Path, transformer, vae, id2label: dict | None = ID2LABEL, **scheduler) -> Path:
    """A DiTPipeline folder as the Hub holds facebook/DiT-XL-2-256: save_pretrained, plus id2label in
    model_index.json (diffusers does not write it; the Hub file has it)."""
    sched = DDIMScheduler(**({"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                              "clip_sample": False} | scheduler))
    DiTPipeline(transformer, vae, sched).save_pretrained(folder)
    if id2label is not None:
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(index | {"id2label": id2label}, indent=2))
    return folder
