"""Samplers (diffusers schedulers), classifier-free guidance, per-request generators, and `generate`.

A `Job` is one request's sampling state (its own scheduler, timestep schedule and generator), so jobs with
different patches, samplers and step counts share one batched forward via `denoise_step`, and a request's
pixels never depend on its batch-mates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from app.model.dit import DiT
from app.model.vae import PixelVAE, to_uint8

SAMPLERS = ("ddpm", "ddim", "dpm")
TRAIN_TIMESTEPS = 1000


def noise_schedule_kwargs(beta_schedule: str = "linear") -> dict:
    """DiT's training schedule: linear 1e-4..0.02 over 1000 steps, or cosine ('squaredcos_cap_v2')."""
    if beta_schedule == "cosine":
        return dict(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2")
    return dict(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def make_scheduler(sampler: str, steps: int, *, learn_sigma: bool, clip_sample: bool, beta_schedule="linear"):
    """A fresh diffusers scheduler for one request, timesteps set."""
    common = noise_schedule_kwargs(beta_schedule)
    if sampler == "ddpm":
        sched = DDPMScheduler(**common, variance_type="learned_range" if learn_sigma else "fixed_small",
                              clip_sample=clip_sample)
    elif sampler == "ddim":
        # No x0 clipping for DDIM: diffusers clips x0 but keeps the unclipped epsilon for the direction term,
        # which drives pixel-space samples off the data (measured: garbage digits at any guidance).
        sched = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    elif sampler == "dpm":
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    else:
        raise ValueError(f"unknown sampler {sampler!r}: one of {SAMPLERS}")
    sched.set_timesteps(steps)
    return sched


@dataclass
class Job:
    """Sampling state of one request: `n` images from one seed, one condition, one patch."""

    latents: torch.Tensor  # (n, C, H, W)
    y: torch.Tensor  # (n,) labels or (n, text_dim)
    y_null: torch.Tensor | None  # same shape as y; None = no CFG
    guidance_scale: float
    scheduler: object
    generator: torch.Generator
    patch: object = None  # DMP module (single-patch batches) ...
    slot: int = 0  # ... or a slot in the engine's PatchPool
    index: int = 0
    cfg_channels: str = "all"
    meta: dict = field(default_factory=dict)

    @property
    def timesteps(self):
        return self.scheduler.timesteps

    @property
    def done(self) -> bool:
        return self.index >= len(self.scheduler.timesteps)

    @property
    def rows(self) -> int:
        """Forward rows this job takes (CFG doubles them)."""
        return self.latents.shape[0] * (2 if self.y_null is not None else 1)


def new_job(model: DiT, *, y, seed: int, sampler: str = "ddpm", steps: int = 250, guidance_scale: float = 1.0,
            n: int = 1, patch=None, slot: int = 0, beta_schedule: str = "linear", clip_sample: bool = False,
            device="cpu", dtype=torch.float32, cfg_channels: str = "all") -> Job:
    """Create a job; the initial noise comes from a CPU generator seeded with `seed`, so it is device-independent."""
    cfg = model.config
    gen = torch.Generator("cpu").manual_seed(int(seed))
    shape = (n, cfg.in_channels, cfg.input_size, cfg.input_size)
    sched = make_scheduler(sampler, steps, learn_sigma=cfg.learn_sigma, clip_sample=clip_sample,
                           beta_schedule=beta_schedule)
    latents = (torch.randn(shape, generator=gen) * sched.init_noise_sigma).to(device=device, dtype=torch.float32)
    y = torch.as_tensor(y, device=device)
    y = y.reshape(-1, cfg.text_dim).float() if cfg.task == "text" else y.reshape(-1).long()
    y = y.expand(n, *y.shape[1:]) if y.shape[0] == 1 else y
    use_cfg = guidance_scale != 1.0 and cfg.task != "uncond"
    y_null = model.null_y(n, device) if use_cfg else None
    return Job(latents, y, y_null, guidance_scale, sched, gen, patch, slot, cfg_channels=cfg_channels,
               meta={"dtype": dtype})


def _guide(out: torch.Tensor, n: int, scale: float, in_channels: int, cfg_channels: str) -> torch.Tensor:
    """Combine the (cond, uncond) halves; the variance channels come from the conditional half."""
    cond, uncond = out[:n], out[n:]
    k = 3 if cfg_channels == "first3" else in_channels  # the original DiT guided only 3 of 4 channels
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


@torch.no_grad()
def denoise_step(model: DiT, jobs: list[Job], pool=None, dtype=torch.float32, forward=None) -> None:
    """One batched forward for all jobs, then each job's own scheduler step. `pool`: PatchPool for slots;
    `forward(x, t, y, patch=...)`: what runs the denoiser (default the model; e.g. app.engine.graphs')."""
    cfg = model.config
    xs, ts, ys, slots = [], [], [], []
    for job in jobs:
        t = job.timesteps[job.index]
        x = job.scheduler.scale_model_input(job.latents, t)
        halves = [(x, job.y)] + ([(x, job.y_null)] if job.y_null is not None else [])
        for xi, yi in halves:
            xs.append(xi)
            ys.append(yi)
            ts.append(torch.full((xi.shape[0],), float(t), device=xi.device))
            slots.append(torch.full((xi.shape[0],), job.slot, dtype=torch.long, device=xi.device))
    x, t, y = torch.cat(xs), torch.cat(ts), torch.cat(ys)
    if pool is not None:
        patch = pool.batch(torch.cat(slots))
    else:
        patches = {id(j.patch) for j in jobs}
        if len(patches) > 1:
            raise ValueError("jobs with different patches need a PatchPool")
        patch = jobs[0].patch
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = (forward or model)(x, t, y, patch=patch).float()  # (B, C_out, H, W)
    row = 0
    for job in jobs:
        n = job.latents.shape[0]
        rows = job.rows
        o = out[row:row + rows]
        row += rows
        if job.y_null is not None:
            o = _guide(o, n, job.guidance_scale, cfg.in_channels, job.cfg_channels)
        if not isinstance(job.scheduler, DDPMScheduler) or not cfg.learn_sigma:
            o = o[:, :cfg.in_channels]  # DDIM / DPM-Solver take epsilon only
        step_kwargs = {"generator": job.generator} if isinstance(job.scheduler, DDPMScheduler) else {}
        job.latents = job.scheduler.step(o, job.timesteps[job.index], job.latents, **step_kwargs).prev_sample
        job.index += 1


@torch.no_grad()
def generate(model: DiT, vae=None, *, y=None, captions: list[str] | None = None, text_encoder=None,
             patch=None, sampler: str = "ddpm", steps: int = 250, guidance_scale: float = 1.0,
             seeds: list[int] | int = 0, beta_schedule: str | None = None, clip_sample: bool | None = None,
             device=None, dtype=torch.float32, cfg_channels: str = "all", progress: bool = False):
    """Base + optional patch + sampler + guidance + seeds -> uint8 images (B, H, W, C).

    One image per seed; `y` is a class label or one per seed (ignored for unconditional models); `captions`
    (one, or one per seed) are encoded by `text_encoder` for text models.
    """
    vae = vae or PixelVAE(model.config.in_channels)
    device = device or next(model.parameters()).device
    meta = getattr(model, "meta", {})
    beta_schedule = beta_schedule or meta.get("beta_schedule", "linear")
    if clip_sample is None:
        clip_sample = vae.kind == "pixel"
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    conds = condition_rows(model, len(seeds), y=y, captions=captions, text_encoder=text_encoder)
    jobs = [new_job(model, y=cond, seed=s, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                    patch=patch, beta_schedule=beta_schedule, clip_sample=clip_sample, device=device,
                    dtype=dtype, cfg_channels=cfg_channels) for s, cond in zip(seeds, conds)]
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        live = [j for j in jobs if not j.done]
        if not live:
            break
        denoise_step(model, live, dtype=dtype)
    latents = torch.cat([j.latents for j in jobs])
    return to_uint8(vae.decode(latents))


def condition_rows(model: DiT, n: int, y=None, captions=None, text_encoder=None) -> list[torch.Tensor]:
    """One condition tensor per image, from labels or captions, checked against the model's task."""
    task = model.config.task
    if task == "text":
        if captions is None or text_encoder is None:
            raise ValueError("a text model needs captions and a text encoder")
        captions = [captions] * n if isinstance(captions, str) else list(captions)
        if len(captions) == 1:
            captions = captions * n
        emb = text_encoder.encode(captions)  # (n, text_dim)
        return list(emb[:, None])
    if task == "uncond":
        return [torch.tensor(0)] * n  # the only (null) class
    if y is None:
        raise ValueError("a class-conditional model needs a class label")
    labels = torch.as_tensor(y).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n)
    if (labels < 0).any() or (labels >= model.config.num_classes).any():
        raise ValueError(f"class labels must be in [0, {model.config.num_classes})")
    return list(labels[:, None])
