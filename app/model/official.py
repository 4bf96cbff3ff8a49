"""Import a checkpoint of the official DMP code (sangminwoo/DMP `train.py`) as our base file + patch file.

Its checkpoint is `{"model", "ema", "opt", "config"}`: each of model/ema a facebookresearch/DiT state dict plus
`prompt_embeddings (pt_depth, N, D)`, `gate.weight (N, D+1)`, `gate.bias (N,)`, `w_noise (D, N)`; `config` is its
Hydra (OmegaConf) config, read here without running any of its code. Its "add" mode with the linear gate on
c = t_emb + y_emb and k = int(topk * N) kept prompts is exactly docs/design.md §2: the patch reproduces its forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from app.model.describe import labels_from
from app.model.dmp import DMP, patch_metadata_for, save_patch
from app.model.loaders import CheckpointError, Inert, build_from_state_dict, read_torch_file, save_base

PATCH_KEYS = ("prompt_embeddings", "gate.weight", "gate.bias", "w_noise")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers around the saved model
SCHEDULES = {"linear": "linear", "cosine": "cosine", "squaredcos_cap_v2": "cosine"}  # its names -> ours


def plain(obj):
    """An OmegaConf config read as `Inert` stand-ins -> plain dicts and values."""
    if isinstance(obj, Inert) and isinstance(obj.state, dict):
        if "_content" in obj.state:
            return plain(obj.state["_content"])
        if "_val" in obj.state:
            return plain(obj.state["_val"])
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return None if isinstance(obj, Inert) else obj


def _get(cfg: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return default
        cfg = cfg[part]
    return cfg


@dataclass
class Imported:
    base_path: Path
    patch_path: Path
    weights: str  # which state dict was imported: ema | model
    notes: list[str]  # assumptions made where the checkpoint did not say


def split_checkpoint(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(DiT base tensors, DMP tensors); refuses gates other than the linear one."""
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    other_gate = sorted(k for k in sd if k.startswith("gate.") and k not in PATCH_KEYS)
    if other_gate:
        raise CheckpointError(f"the checkpoint has a non-linear gate ({', '.join(other_gate[:3])}): only the "
                              "linear gate (gate_type=linear) converts to a DMP patch")
    if "prompt_embeddings" not in sd:
        raise CheckpointError("no prompt_embeddings in the checkpoint: not a DMP patch (a full fine-tune, FT?)")
    patch = {k: sd[k] for k in PATCH_KEYS if k in sd}
    base = {k: v for k, v in sd.items() if k not in PATCH_KEYS and not k.startswith("prompt_proj.")}
    return base, patch


def import_dmp(ckpt, base_out, patch_out, *, name: str | None = None, domain: str = "", weights: str | None = None,
               vae: str | None = None, labels: str | None = None, beta_schedule: str | None = None,
               num_heads: int | None = None) -> Imported:
    """Write our base file and patch file from an official DMP training checkpoint."""
    obj = read_torch_file(ckpt)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{ckpt} is not a DMP training checkpoint (a dict with 'model' / 'ema')")
    weights = weights or ("ema" if "ema" in obj else "model")
    if weights not in ("ema", "model") or not isinstance(obj.get(weights), dict):
        raise CheckpointError(f"{ckpt} has no {weights!r} state dict (keys: {sorted(obj)})")
    cfg, notes = plain(obj.get("config")) or {}, []
    if not cfg:
        notes.append("no readable config in the checkpoint: assumed vp.type=add, topk=1.0 (the official defaults)")
    mode = _get(cfg, "models.vp.type", _get(cfg, "general.type", "add"))
    if mode != "add":
        raise CheckpointError(f"vp.type={mode!r}: only the 'add' mode converts (prepend adds tokens to the sequence, "
                              "which a patch of docs/design.md §2 cannot express)")
    gate_type = _get(cfg, "models.vp.gate_type", _get(cfg, "general.gate_type", "linear"))
    if gate_type not in ("linear", "PT"):
        raise CheckpointError(f"gate_type={gate_type!r}: only the linear gate (or PT, no gate) converts")
    base_sd, patch_sd = split_checkpoint(obj[weights])
    if _get(cfg, "data.is_uncond") or _get(cfg, "models.vp.uncond"):
        # unconditional runs always feed y = 0: keep that row as our single (null) row
        base_sd["y_embedder.embedding_table.weight"] = base_sd["y_embedder.embedding_table.weight"][:1]
    base = build_from_state_dict(base_sd, num_heads=num_heads)
    cfg_base = base.config
    prompts = patch_sd["prompt_embeddings"]  # (pt_depth, N, D)
    L, N, D = prompts.shape
    if N != cfg_base.num_tokens or D != cfg_base.hidden_size or L > cfg_base.depth:
        raise CheckpointError(f"prompt_embeddings {tuple(prompts.shape)} do not fit the DiT ({cfg_base.depth} blocks, "
                              f"{cfg_base.num_tokens} tokens, width {cfg_base.hidden_size})")
    topk = float(_get(cfg, "models.vp.topk", _get(cfg, "general.topk", 1.0)))
    kept = int(topk * N)  # the official code truncates
    if kept < 1:
        raise CheckpointError(f"topk={topk} keeps no prompt of {N}")
    method = "dmp" if "gate.weight" in patch_sd else "pt"
    patch = DMP(D, N, L, gate_input="c", top_k=kept / N, method=method)
    with torch.no_grad():
        patch.prompts.copy_(prompts)
        if method == "dmp":
            patch.gate.weight.copy_(patch_sd["gate.weight"])
            patch.gate.bias.copy_(patch_sd["gate.bias"])
            if "w_noise" in patch_sd:
                patch.w_noise.copy_(patch_sd["w_noise"])
    name = name or Path(base_out).stem
    domain = domain or str(_get(cfg, "data.name", "") or name)
    schedule = beta_schedule or SCHEDULES.get(_get(cfg, "general.schedule_name"))
    if schedule is None:
        schedule = "cosine"
        notes.append("no known schedule in the checkpoint: assumed cosine (the official default schedule_name)")
    vae = vae or f"stabilityai/sd-vae-ft-{_get(cfg, 'general.vae', 'ema')}"
    meta: dict[str, str | list[str]] = {
            "name": name, "domain": domain, "vae": vae, "beta_schedule": schedule, "clip_sample": "false",
            "default_sampler": "ddpm", "default_steps": "250",
            "default_guidance": str(_get(cfg, "eval.cfg_scale", 1.5)),
            "imported_from": "sangminwoo/DMP", "imported_weights": weights}
    if labels:
        meta["labels"] = labels_from(labels, Path.cwd())
    base_path = save_base(base, base_out, **meta)
    patch_path = save_patch(patch, patch_out, **patch_metadata_for(base, name, domain),
                            imported_from="sangminwoo/DMP", imported_weights=weights,
                            train_config={"official_config": cfg} if cfg else {})
    return Imported(Path(base_path), Path(patch_path), weights, notes)
