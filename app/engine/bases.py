"""The bases a process serves: DiT + VAE + text encoder + defaults from the file's metadata, one patch pool each."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from app.core.config import Settings
from app.core.metrics import Metrics
from app.model import CheckpointError, PatchPool, fingerprint, load_base
from app.model.dit import DiT
from app.model.kernels import self_check, set_fused
from app.model.sampling import SAMPLERS
from app.model.text import load_text_encoder
from app.model.vae import PixelVAE, SDVAE
from app.engine.graphs import GraphedForward, buckets_up_to
from app.engine.slots import PatchSlots

log = logging.getLogger("dmp.bases")
BASE_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass
class ServedBase:
    """One base model and everything needed to sample from it."""

    name: str
    model: DiT
    vae: object
    text_encoder: object | None
    meta: dict
    patches: PatchSlots  # the engine's side of this base's patches: pins, host cache, device slots
    forward: GraphedForward | None = None  # bucketed CUDA graphs / compiled CPU steps; None = eager model

    @property
    def config(self):
        return self.model.config

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.model)

    @property
    def labels(self) -> list[str]:
        try:
            labels = json.loads(self.meta.get("labels", "[]"))
        except json.JSONDecodeError:
            return []
        return [str(x) for x in labels] if isinstance(labels, list) else []

    @property
    def default_sampler(self) -> str:
        s = self.meta.get("default_sampler", "ddim")
        return s if s in SAMPLERS else "ddim"

    @property
    def default_steps(self) -> int:
        return _number(self.meta.get("default_steps"), int, 50)

    @property
    def default_guidance(self) -> float:
        return _number(self.meta.get("default_guidance"), float, 1.0)

    @property
    def beta_schedule(self) -> str:
        return "cosine" if self.meta.get("beta_schedule") == "cosine" else "linear"

    @property
    def clip_sample(self) -> bool:
        default = "true" if self.vae.kind == "pixel" else "false"
        return self.meta.get("clip_sample", default).lower() == "true"

    @property
    def image_size(self) -> int:
        scale = 1 if self.vae.kind == "pixel" else 8
        return self.config.input_size * scale

    def describe(self) -> dict:
        cfg = self.config
        return {"name": self.name, "task": self.task, "num_classes": cfg.num_classes, "image_size": self.image_size,
                "hidden_size": cfg.hidden_size, "depth": cfg.depth, "num_tokens": cfg.num_tokens,
                "in_channels": cfg.in_channels, "patch_size": cfg.patch_size, "text_dim": cfg.text_dim,
                "fingerprint": self.fingerprint, "vae": self.vae.kind,
                "text_encoder": self.meta.get("text_encoder", "") or None, "labels": self.labels,
                "default_sampler": self.default_sampler, "default_steps": self.default_steps,
                "default_guidance": self.default_guidance}


def _number(text, kind, default):
    try:
        return kind(text)
    except (TypeError, ValueError):
        return default


def _vae(spec: str, channels: int, device: str):
    if not spec or spec == "pixel":
        return PixelVAE(channels)
    return SDVAE.from_pretrained(spec).to(device)


def load_bases(settings: Settings, metrics: Metrics) -> dict[str, ServedBase]:
    """Every base in DMP_MODEL_DIR, on the configured device; text encoders shared between bases."""
    device = settings.torch_device
    set_fused(settings.fused_kernels)
    root = Path(settings.model_dir)
    paths = sorted(p for p in root.glob("*") if p.suffix in BASE_SUFFIXES or (p.is_dir() and
                                                                               (p / "config.json").exists()))
    encoders: dict[str, object] = {}
    bases: dict[str, ServedBase] = {}
    for path in paths:
        try:
            model = load_base(path)
        except CheckpointError as e:  # e.g. a trainer's resume checkpoint next to the bases
            log.warning("not serving %s: %s", path, e)
            continue
        meta = dict(getattr(model, "meta", {}) or {})
        name = meta.get("name") or path.stem
        if name in bases:
            raise ValueError(f"two bases named {name!r} in {root}")
        graphed = settings.cuda_graphs if device == "cuda" else settings.cpu_compile
        # graphs capture a plain forward, so the weights themselves take the serving dtype (bf16 by default)
        model = model.to(device=device, dtype=settings.torch_dtype if graphed else torch.float32)
        encoder = None
        if model.config.task == "text":
            spec = meta.get("text_encoder") or "minilm"
            if spec not in encoders:
                encoders[spec] = load_text_encoder(spec, device=device)
            encoder = encoders[spec]
            if encoder.dim != model.config.text_dim:
                raise ValueError(f"base {name}: text encoder {spec} gives {encoder.dim}-d, model wants "
                                 f"{model.config.text_dim}")
        pool = PatchPool(model.config.hidden_size, model.config.num_tokens, model.config.depth,
                         slots=settings.patch_slots, device=device, dtype=torch.float32)
        bases[name] = ServedBase(name, model, _vae(meta.get("vae", "pixel"), model.config.in_channels, device),
                                 encoder, meta, PatchSlots(name, pool, settings.patch_host_bytes, metrics, device),
                                 GraphedForward(model, pool, buckets=buckets_up_to(settings.max_batch),
                                                compile=device == "cpu" or settings.cuda_compile)
                                 if graphed else None)
        log.info("serving base %s (%s, %s) from %s", name, model.config.task, fingerprint(model)[:12], path)
    for width, dtype in {(b.model.config.hidden_size, next(b.model.parameters()).dtype) for b in bases.values()}:
        if problem := self_check(device, width, dtype):  # at the served shapes, before any graph captures it
            log.warning(problem)
    return bases
