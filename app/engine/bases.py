"""The bases a process serves: DiT + VAE + text encoder + defaults from its description, one patch pool each."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from app.core.config import Settings
from app.core.devices import native_bf16_cpu
from app.core.metrics import Metrics
from app.engine.graphs import GraphedForward, buckets_up_to
from app.engine.slots import PatchSlots
from app.model import PatchPool, cpu_attention, fingerprint, load_base
from app.model.cpu_linear import can_pack, pack_linears
from app.model.describe import BaseDescription, DescriptionError, describe, is_base_entry, label_index, resolve_vae
from app.model.dit import DiT
from app.model.kernels import self_check, set_fused
from app.model.protocols import VAE, TextEncoder
from app.model.sampling import clips_x0
from app.model.text import load_text_encoder
from app.model.vae import SDVAE, PixelVAE

log = logging.getLogger("dmp.bases")


@dataclass
class ServedBase:
    """One base model and everything needed to sample from it."""

    name: str
    model: DiT
    vae: VAE
    text_encoder: TextEncoder | None
    desc: BaseDescription
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
        return self.desc.labels

    @cached_property
    def label_ids(self) -> dict[str, int]:
        return label_index(self.desc.labels)

    @property
    def default_sampler(self) -> str:
        return self.desc.default_sampler

    @property
    def default_steps(self) -> int:
        return self.desc.default_steps

    @property
    def default_guidance(self) -> float:
        """What a request without guidance_scale gets: 1.0 (no CFG) for an unconditional base, as it is served."""
        return 1.0 if self.task == "uncond" else self.desc.default_guidance

    @property
    def beta_schedule(self) -> str:
        return self.desc.beta_schedule

    @property
    def clip_sample(self) -> bool:
        return clips_x0(self.vae.kind) if self.desc.clip_sample is None else self.desc.clip_sample

    @property
    def image_size(self) -> int:
        """Pixels per side of a generated image (latent size times the VAE's downscale)."""
        return self.config.input_size * self.vae.downscale

    def describe(self) -> dict:
        cfg = self.config
        return {"name": self.name, "task": self.task, "num_classes": cfg.num_classes, "image_size": self.image_size,
                "hidden_size": cfg.hidden_size, "depth": cfg.depth, "num_tokens": cfg.num_tokens,
                "in_channels": cfg.in_channels, "patch_size": cfg.patch_size, "text_dim": cfg.text_dim,
                "fingerprint": self.fingerprint, "vae": self.vae.kind, "layout": self.desc.layout,
                "text_encoder": self.desc.text_encoder or None, "labels": self.labels,
                "default_sampler": self.default_sampler, "default_steps": self.default_steps,
                "default_guidance": self.default_guidance}


class BaseLoader:
    """Loads each base of DMP_MODEL_DIR on its own: a broken one is reported in `skipped`, never stops the rest.
    VAEs and text encoders are shared between bases that name the same one."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics, self.device = settings, metrics, settings.torch_device
        self.vaes: dict[tuple, VAE] = {}
        self.encoders: dict[str, TextEncoder] = {}
        self.bases: dict[str, ServedBase] = {}
        self.skipped: dict[str, str] = {}  # entry name -> why it is not served

    def load_all(self, only: str | None = None) -> None:
        """Every base entry of DMP_MODEL_DIR, or only the one named `only`."""
        root = Path(self.settings.model_dir)
        for path in sorted(p for p in root.glob("*") if is_base_entry(p)):
            try:
                if only is not None and describe(path).name != only:
                    continue
                base = self.load(path)
            except Exception as e:  # any broken file (corrupt, truncated, mismatched) is reported and skipped
                self.skipped[path.name] = str(e)
                if only is None:  # looking for one base, the others' problems are not this run's
                    log.warning("not serving %s: %s", path, e)
                continue
            self.bases[base.name] = base
            log.info("serving base %s (%s, %s, vae %s) from %s", base.name, base.task, base.fingerprint[:12],
                     base.vae.kind, path)

    def load(self, path: Path) -> ServedBase:
        desc = describe(path)
        if desc.name in self.bases:
            raise DescriptionError(f"another base is already named {desc.name!r}")
        model = load_base(desc.checkpoint, num_heads=desc.num_heads)
        vae = self.vae(resolve_vae(desc, model.config.in_channels), model.config.in_channels, desc.latent_scale)
        encoder = self.text_encoder(desc, model) if model.config.task == "text" else None
        if desc.labels and model.config.task == "class" and len(desc.labels) != model.config.num_classes:
            raise DescriptionError(f"{len(desc.labels)} labels for a model of {model.config.num_classes} classes")
        s = self.settings
        graphed = s.cuda_graphs if self.device == "cuda" else s.cpu_compile
        # graphs capture a plain forward, so the weights themselves take the serving dtype (bf16 by default)
        model = model.to(device=self.device, dtype=s.torch_dtype if graphed else torch.float32)
        # eager fp32 on CPU (no autocast): large GEMMs with prepacked weights; a compiled graph prepacks its own
        if self.device == "cpu" and not graphed and s.torch_dtype == torch.float32 and can_pack(model):
            pack_linears(model, measure=True)
        pool = PatchPool(model.config.hidden_size, model.config.num_tokens, model.config.depth,
                         slots=s.patch_slots, device=self.device, dtype=torch.float32)
        forward = GraphedForward(model, pool, buckets=buckets_up_to(s.max_batch),
                                 compile=self.device == "cpu" or s.cuda_compile,
                                 autotune=self.device == "cpu" and s.cpu_autotune,
                                 warm_compositions=s.warm_compositions) if graphed else None
        return ServedBase(desc.name, model, vae, encoder, desc,
                          PatchSlots(desc.name, pool, s.patch_host_bytes, self.metrics, self.device), forward)

    def vae(self, spec: str, channels: int, latent_scale: float | None):
        """The VAE named by `spec`, loaded once per (folder, scale) and shared."""
        if spec == "pixel":
            return PixelVAE(channels)
        key = (str(Path(spec).resolve()) if Path(spec).exists() else spec, latent_scale)
        if key not in self.vaes:
            try:
                self.vaes[key] = SDVAE.from_pretrained(spec, latent_scale).to(self.device)
            except Exception as e:
                raise DescriptionError(f"cannot load the VAE {spec}: {e}") from None
        vae = self.vaes[key]
        if vae.channels != channels:
            raise DescriptionError(f"the VAE {spec} has {vae.channels} latent channels, the model {channels}")
        return vae

    def text_encoder(self, desc: BaseDescription, model: DiT):
        spec = desc.text_encoder or "minilm"
        if spec not in self.encoders:
            self.encoders[spec] = load_text_encoder(spec, device=self.device)
        encoder = self.encoders[spec]
        if encoder.dim != model.config.text_dim:
            raise DescriptionError(f"text encoder {spec} gives {encoder.dim}-d, "
                                   f"the model wants {model.config.text_dim}")
        return encoder


def load_bases(settings: Settings, metrics: Metrics,
               only: str | None = None) -> tuple[dict[str, ServedBase], dict[str, str]]:
    """Every servable base in DMP_MODEL_DIR (or only the one named `only`) on the configured device, and why each
    other entry is not served."""
    set_fused(settings.fused_kernels)
    cpu_attention.set_enabled(settings.cpu_attention_kernel)
    cpu = torch.device(settings.torch_device).type == "cpu"
    if cpu and settings.cpu_attention_kernel:
        cpu_attention.load()  # here, not on the first request: the first build on a machine takes ~10 s
    loader = BaseLoader(settings, metrics)
    loader.load_all(only)
    kernel_bases = [name for name, b in loader.bases.items()
                     if cpu and cpu_attention.applies_to(b.model.config.num_tokens, b.model.config.hidden_size,
                                                         b.model.config.num_heads)]
    metrics.cpu_attention_kernel.set(int(bool(kernel_bases)))
    if cpu:
        log.info("CPU attention kernel: %s%s", cpu_attention.status(),
                 f" (bases {', '.join(kernel_bases)})" if kernel_bases else "")
    for width, dtype in {(b.model.config.hidden_size, next(b.model.parameters()).dtype)
                         for b in loader.bases.values()}:
        if problem := self_check(settings.torch_device, width, dtype):  # at the served shapes, before any capture
            log.warning(problem)
        if dtype == torch.bfloat16 and torch.device(settings.torch_device).type == "cpu" and not native_bf16_cpu():
            log.warning("DMP_DTYPE=bfloat16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in "
                        "/proc/cpuinfo): torch emulates it, and a DiT-XL/2 forward took ~5x its fp32 time on such a "
                        "CPU (bench/README.md); DMP_DTYPE=float32 is the faster choice here")
    return loader.bases, loader.skipped
