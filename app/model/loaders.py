"""Base checkpoint loaders (original .pt, safetensors, diffusers folders) and the base fingerprint."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.model.dit import HEADS_BY_WIDTH, DiT, DiTConfig


class CheckpointError(ValueError):
    """A base checkpoint could not be understood."""


#################################################################################
#                                  Fingerprint                                  #
#################################################################################

def fingerprint(model: DiT, refresh: bool = False) -> str:
    """sha256 over (name, dtype, shape, bytes) of every base tensor in sorted order, plus config fields
    that change the math without changing a tensor (timestep frequencies, LayerNorm eps). Cached."""
    cached = getattr(model, "_fingerprint", None)
    if cached and not refresh:
        return cached
    h = hashlib.sha256()
    h.update(f"freq_shift={model.config.freq_shift};norm2_eps={model.config.norm2_eps};".encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bf16: hash the raw 16-bit words
            t = t.view(torch.int16)
        h.update(memoryview(t.cpu().contiguous().numpy()).cast("B"))
    model._fingerprint = h.hexdigest()
    return model._fingerprint


#################################################################################
#                                 Config inference                              #
#################################################################################

def infer_config(sd: dict[str, torch.Tensor], num_heads: int | None = None, **overrides) -> DiTConfig:
    """Depth, width, patch, channels, classes, input size from original-layout tensors."""
    try:
        proj = sd["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        num_tokens = sd["pos_embed"].shape[1]
        out_dim = sd["final_layer.linear.weight"].shape[0]  # p*p*C_out
    except KeyError as e:
        raise CheckpointError(f"not a DiT state dict: missing {e.args[0]!r}") from None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = int(round(num_tokens ** 0.5))
    if grid * grid != num_tokens:
        raise CheckpointError(f"pos_embed has {num_tokens} tokens, not a square grid")
    out_channels = out_dim // (patch * patch)
    if num_heads is None:
        if hidden not in HEADS_BY_WIDTH:
            raise CheckpointError(f"hidden size {hidden} is not a standard DiT width; pass num_heads")
        num_heads = HEADS_BY_WIDTH[hidden]
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    if "y_embedder.embedding_table.weight" in sd:
        num_classes, text_dim = sd["y_embedder.embedding_table.weight"].shape[0] - 1, 0
    elif "y_embedder.null_embedding" in sd:
        num_classes, text_dim = 0, sd["y_embedder.null_embedding"].shape[1]
    else:
        raise CheckpointError("no y_embedder tensors: cannot tell the conditioning")
    cfg = DiTConfig(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
                    num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, num_classes=num_classes,
                    learn_sigma=out_channels == 2 * in_ch, text_dim=text_dim,
                    block_embedders="blocks.1.t_embedder.mlp.0.weight" in sd)
    return replace(cfg, **overrides)


def build_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None, **overrides) -> DiT:
    cfg = infer_config(sd, num_heads=num_heads, **overrides)
    with torch.device("meta"):  # no random init of weights about to be replaced: XL/2 loads in half the memory
        model = DiT(cfg)
    try:  # the loaded tensors become the parameters (fp32, as a freshly built model would be)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                              strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not match the inferred DiT: {e}") from None
    return model.eval()


#################################################################################
#                              diffusers conversion                             #
#################################################################################

def convert_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers DiTTransformer2DModel keys -> original DiT keys. Equal per-block embedder copies become the one
    shared embedder; differing ones (a fine-tune) are kept per block as blocks.{i}.t_embedder / y_embedder."""
    out: dict[str, torch.Tensor] = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    emb_names = {f"timestep_embedder.linear_1.{kind}": f"t_embedder.mlp.0.{kind}" for kind in ("weight", "bias")}
    emb_names |= {f"timestep_embedder.linear_2.{kind}": f"t_embedder.mlp.2.{kind}" for kind in ("weight", "bias")}
    emb_names["class_embedder.embedding_table.weight"] = "y_embedder.embedding_table.weight"
    copies = {src: [sd[f"transformer_blocks.{i}.norm1.emb.{src}"] for i in range(depth)]
              for src in emb_names if f"transformer_blocks.0.norm1.emb.{src}" in sd}
    per_block = any(not torch.equal(t, ts[0]) for ts in copies.values() for t in ts[1:])
    for src, ts in copies.items():
        out[emb_names[src]] = ts[0]  # block 0's copy: also the final layer's conditioning, as in diffusers
        if per_block:
            out |= {f"blocks.{i}.{emb_names[src]}": ts[i] for i in range(1, depth)}
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd[b + f"attn1.to_{x}.weight"] for x in "qkv"])
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([sd[b + f"attn1.to_{x}.bias"] for x in "qkv"])
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[b + f"attn1.to_out.0.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[b + f"ff.net.0.proj.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[b + f"ff.net.2.{kind}"]
            out[f"blocks.{i}.adaLN_modulation.1.{kind}"] = sd[b + f"norm1.linear.{kind}"]
    return out


def load_diffusers_folder(folder: Path, num_heads: int | None = None) -> DiT:
    cfg_path = folder / "config.json"
    weights = [folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
    weights = [w for w in weights if w.exists()]
    if not cfg_path.exists() or not weights:
        raise CheckpointError(f"{folder} is not a diffusers model folder (config.json + diffusion_pytorch_model.*)")
    dcfg = json.loads(cfg_path.read_text())
    sd = load_file(weights[0]) if weights[0].suffix == ".safetensors" else \
        torch.load(weights[0], map_location="cpu", weights_only=True)
    try:
        converted = convert_diffusers(sd)
    except (KeyError, ValueError) as e:  # ValueError: max() of no blocks
        raise CheckpointError(f"{folder}: not a DiT transformer (missing {e})") from None
    if "y_embedder.embedding_table.weight" not in converted:
        raise CheckpointError("diffusers folder has no class embedder; only class-conditional DiT is supported")
    heads = num_heads or dcfg.get("num_attention_heads")
    sample = dcfg.get("sample_size", 32)
    grid = sample // converted["x_embedder.proj.weight"].shape[2]
    from app.model.dit import get_2d_sincos_pos_embed

    converted["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(
        converted["x_embedder.proj.weight"].shape[0], grid)).float().unsqueeze(0)
    # diffusers keeps its own timestep frequencies and MLP-side LayerNorm eps: record both so outputs match it.
    return build_from_state_dict(converted, num_heads=heads, freq_shift=1, norm2_eps=dcfg.get("norm_eps", 1e-5))


#################################################################################
#                                     Entry                                     #
#################################################################################

class Inert:
    """Stands in for a class a checkpoint's pickle names (an OmegaConf config, argparse.Namespace): it keeps the
    arguments and state it is given and runs nothing, so the tensors beside it load under weights_only."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # e.g. a defaultdict factory
        return Inert(*args)


def read_torch_file(path) -> object:
    """torch.load with weights_only=True; classes other than tensors (training configs saved next to the weights)
    become `Inert` stand-ins instead of refusing the whole file. Nothing in the file is ever executed."""
    try:
        # the classes the file's pickle names, read without running it; none for a plain state dict
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stubs: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
            (type(name.rsplit(".", 1)[-1], (Inert,), {"__module__": "inert"}), name) for name in names]
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a weights-only torch file: {e}") from None


def _unwrap(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError("checkpoint is not a state dict (plain, or under 'ema' / 'model')")


def read_base_metadata(path) -> dict[str, str]:
    """safetensors string metadata of a base file ({} for other formats)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_base(path, num_heads: int | None = None) -> DiT:
    """Load a base DiT in eval mode from .pt, .safetensors, a diffusers transformer or DiTPipeline folder; size
    inferred from tensors."""
    path = Path(path)
    if path.is_dir() and (path / "model_index.json").exists():  # a whole DiTPipeline folder: its transformer
        path = path / "transformer"
    if path.is_dir():
        model = load_diffusers_folder(path, num_heads=num_heads)
    elif path.suffix == ".safetensors":
        meta = read_base_metadata(path)
        overrides = json.loads(meta["dit_config"]) if "dit_config" in meta else {}
        sd = load_file(str(path))
        if overrides:
            model = DiT(DiTConfig(**overrides))
            model.load_state_dict(sd, strict=True)
            model.eval()
        else:
            model = build_from_state_dict(sd, num_heads=num_heads)
        model.meta = meta
    elif path.suffix in (".pt", ".pth", ".bin"):
        model = build_from_state_dict(_unwrap(read_torch_file(path)), num_heads=num_heads)
    elif not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    else:
        raise CheckpointError(f"unknown checkpoint type {path.suffix!r}: use .pt, .safetensors or a diffusers folder")
    if not hasattr(model, "meta"):
        model.meta = {}
    model.requires_grad_(False)
    fingerprint(model)
    return model


def save_base(model: DiT, path, **metadata) -> Path:
    """Write a base as safetensors with its config (so non-standard widths reload without num_heads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dit_config": json.dumps(model.config.to_dict()), "fingerprint": fingerprint(model, refresh=True)}
    meta |= {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata=meta)
    return path
