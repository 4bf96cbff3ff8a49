"""Sampled images of one arm (a base, a patch on it, an FT model), cached on disk by file hashes, sampler, guidance,
count and seed, so every scorer and every rerun reads the same pixels instead of sampling again."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from app.trainer.evaluate import EVAL_SAMPLING, sample_images

GATES = ("learned", "uniform")  # uniform: the patch's gate weights zeroed, every prompt weighs 1/N (its PT part)


def file_key(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def is_patch(path) -> bool:
    from app.model.dmp import read_header

    data = Path(path).read_bytes()
    return (read_header(data).get("__metadata__") or {}).get("format") == "dmp-patch"


def load_arm(base_path, path, gate: str = "learned"):
    """(model, patch) for one arm: a patch rides on the base; anything else is a full model (FT)."""
    from app.model import load_base, load_patch

    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if path is None:
        return load_base(base_path).eval(), None
    if not is_patch(path):
        return load_base(path).eval(), None
    model = load_base(base_path).eval()
    patch = load_patch(path, base=model).eval()
    if gate == "uniform":
        if patch.method != "dmp":
            raise ValueError(f"{path} has no gate to make uniform")
        with torch.no_grad():  # zero logits: softmax 1/N on every prompt, the same prompts
            patch.gate.weight.zero_()
            patch.gate.bias.zero_()
    return model, patch


def balanced_conditions(model, n: int) -> torch.Tensor:
    """n class labels cycling 0..C-1 (equal counts per class), or the null class of an unconditional model."""
    if model.config.task == "class":
        return torch.arange(n) % model.config.num_classes
    if model.config.task == "uncond":
        return torch.zeros(n, dtype=torch.long)
    raise ValueError("text models are scored with `compare` on their captions, not here")


def arm_images(base_path, path, *, n: int, seed: int, guidance: float, cache, gate: str = "learned",
               sampler: str = EVAL_SAMPLING["sampler"], steps: int = EVAL_SAMPLING["steps"],
               conditions: torch.Tensor | None = None, progress: bool = False,
               cached_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, C, H, W) in [-1, 1], the labels they were asked for); sampled once, then read from `cache`
    (cached_only: FileNotFoundError instead of sampling)."""
    cond_key = "" if conditions is None else hashlib.sha256(conditions.numpy().tobytes()).hexdigest()[:8]
    key = (f"{file_key(path or base_path)}-{file_key(base_path)}-{gate}-{sampler}{steps}-g{guidance}-n{n}-s{seed}"
           f"{cond_key}")
    f = Path(cache) / f"{key}.npz"
    if f.exists():
        d = np.load(f)
        return torch.from_numpy(d["images"]).float(), torch.from_numpy(d["labels"])
    if cached_only:
        raise FileNotFoundError(f"no cached samples {f.name}")
    model, patch = load_arm(base_path, path, gate)
    y = conditions if conditions is not None else balanced_conditions(model, n)
    images = sample_images(model, y, patch=patch, sampler=sampler, steps=steps, guidance_scale=guidance, seed=seed,
                           chunk=500, progress=progress)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp.npz")
    np.savez(tmp, images=images.half().numpy(), labels=y.numpy())  # fp16: 3 decimal digits, far below uint8's
    tmp.replace(f)
    return images.half().float(), y
