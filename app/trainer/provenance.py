"""What a trained file records about how it was made: the sizes of the model really trained, no machine paths."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from app.model import DiTConfig


def portable_dataset(name: str) -> str:
    """'folder:/home/me/data/thick' -> 'folder:thick': the data root's own name, not where it lay on this machine."""
    if name.startswith("folder:"):
        return "folder:" + Path(name.removeprefix("folder:")).resolve().name
    return name


def recorded_config(cfg, model: DiTConfig, image_size: int, beta_schedule: str, text_encoder: str) -> dict:
    """The run's config with the trained model's real sizes (a patch's base, not the pretraining defaults) and file
    names instead of paths."""
    out = asdict(cfg) | {
        "image_size": image_size, "hidden_size": model.hidden_size, "depth": model.depth,
        "num_heads": model.num_heads, "patch_size": model.patch_size, "learn_sigma": model.learn_sigma,
        "class_dropout_prob": model.class_dropout_prob, "beta_schedule": beta_schedule, "text_encoder": text_encoder,
        "dataset": portable_dataset(cfg.dataset), "out": Path(cfg.out).name,
    }
    if cfg.base:
        out["base"] = Path(cfg.base).name
    return out
