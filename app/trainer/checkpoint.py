"""Resumable training state in one safetensors file: weights, AdamW moments, RNG states, step (no pickle)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state flattened to named tensors (hyper-parameters come back from the run's config)."""
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for name, value in opt.state.get(p, {}).items():
            out[f"opt.{i}.{name}"] = torch.as_tensor(value).detach().cpu()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if state:
            opt.state[p] = {k: v.to(p.device) if k != "step" else v.float() for k, v in state.items()}


def rng_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state(), "rng.gen": gen.get_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    gen.set_state(tensors["rng.gen"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomic write: temp file then rename, so a crash never leaves a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"trainer_state": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["trainer_state"])
    return load_file(str(path)), meta
