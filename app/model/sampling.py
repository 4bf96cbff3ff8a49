"""Samplers (diffusers schedulers), classifier-free guidance, per-request generators, and `generate`.

A `Job` is one request's sampling state (its own scheduler, timestep schedule and generator), so jobs with
different patches, samplers and step counts share one batched step via `denoise_step`, and a request's
pixels never depend on its batch-mates. A step is `plan_step` (jobs -> StepBatch tensors) then `run_step`
(pure tensor code: forward, per-row CFG, one batched DDIM/DDPM update), which app.engine.graphs compiles or
captures as one graph per batch bucket.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

# from the defining modules: to a type checker the package root exports the dummy classes it falls back to
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

from app.model.dit import DiT
from app.model.dmp import MIX_WIDTH, PatchPool
from app.model.protocols import VAE, Patch, Scheduler, TextEncoder
from app.model.vae import PixelVAE, to_uint8

Sampler = Literal["ddpm", "ddim", "dpm"]  # the request schema's type; SAMPLERS is the same list as values
SAMPLERS: tuple[str, ...] = get_args(Sampler)
TRAIN_TIMESTEPS = 1000


def clips_x0(vae_kind: str) -> bool:
    """The default x0 clipping: to [-1, 1] for pixel models (their data range), never for latents."""
    return vae_kind == "pixel"


def noise_schedule_kwargs(beta_schedule: str = "linear") -> dict:
    """DiT's training schedule: linear 1e-4..0.02 over 1000 steps, or cosine ('squaredcos_cap_v2')."""
    if beta_schedule == "cosine":
        return dict(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2")
    return dict(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def make_scheduler(sampler: str, steps: int, *, learn_sigma: bool, clip_sample: bool, beta_schedule="linear"):
    """A fresh diffusers scheduler for one request, timesteps set."""
    common = noise_schedule_kwargs(beta_schedule)
    sched: DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler
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


@dataclass(eq=False)  # identity, not tensor-valued equality
class Job:
    """Sampling state of one request: `n` images (one generator for all, or one per image), one condition, and
    one patch module or up to MIX_WIDTH (pool slot, scale) pairs."""

    latents: torch.Tensor  # (n, C, H, W)
    y: torch.Tensor  # (n,) labels or (n, text_dim)
    y_null: torch.Tensor | None  # same shape as y (the null condition, or a negative class); None = no CFG
    guidance_scale: float
    scheduler: Scheduler
    generators: list[torch.Generator]  # one draws for all n images, or n draw one image each
    patch: Patch | None = None  # DMP module (single-patch batches) ...
    mix: tuple[tuple[int, float], ...] = ()  # ... or (slot, scale) pairs in the engine's PatchPool; () = the base
    index: int = 0
    cfg_channels: str = "all"
    table: torch.Tensor | None = None  # (len(COEFFS), steps) from step_table; None: the scheduler's own step
    t_list: list = field(default_factory=list)  # timesteps as Python numbers (no tensor indexing per step)
    # made once here (the request's thread), read per step by the runner: views and Python bools, no tensor op
    step_coefs: tuple[torch.Tensor, ...] = field(init=False)  # (len(COEFFS), n) per step; DPM: one, SAFE_COEF
    step_draws: tuple[bool, ...] = field(init=False)  # per step: the DDPM update adds noise

    def __post_init__(self):
        n = self.latents.shape[0]
        if self.table is None:
            self.step_coefs, self.step_draws = (SAFE_COEF[:, None].expand(-1, n),), (False,)
        else:
            self.step_coefs = self.table.T[:, :, None].expand(-1, -1, n).unbind(0)
            self.step_draws = tuple((self.table[COEFFS.index("noise")] > 0).tolist())

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


def new_job(model: DiT, *, y, seed: int | list[int], sampler: str = "ddpm", steps: int = 250,
            guidance_scale: float = 1.0, n: int = 1, patch: Patch | None = None, slot: int = 0,
            mix: tuple[tuple[int, float], ...] | None = None, negative=None, beta_schedule: str = "linear",
            clip_sample: bool = False, device="cpu", cfg_channels: str = "all") -> Job:
    """Create a job; the noise comes from CPU generators, so it is device-independent. `seed` an int: one generator
    draws all n images; a list of n seeds: image i has its own generator, so it reproduces alone (a 1-image job
    with seed[i]). `slot`: one pool slot at scale 1; `mix`: (slot, scale) pairs. `negative`: CFG's unconditional
    half takes this class instead of the null class (class models)."""
    cfg = model.config
    seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) not in (1, n):
        raise ValueError(f"{len(seeds)} seeds for {n} images")
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    shape = (n // len(gens), cfg.in_channels, cfg.input_size, cfg.input_size)
    if sampler == "dpm":  # multistep state lives in the scheduler: one per job
        sched = make_scheduler(sampler, steps, learn_sigma=cfg.learn_sigma, clip_sample=clip_sample,
                               beta_schedule=beta_schedule)
        table, t_list = None, sched.timesteps.tolist()
    else:
        sched, table, t_list = shared_schedule(sampler, steps, cfg.learn_sigma, clip_sample, beta_schedule)
    latents = (torch.cat([torch.randn(shape, generator=g) for g in gens]) * sched.init_noise_sigma).to(
        device=device, dtype=torch.float32)
    y = torch.as_tensor(y, device=device)
    y = y.reshape(-1, cfg.text_dim).float() if cfg.task == "text" else y.reshape(-1).long()
    y = y.expand(n, *y.shape[1:]) if y.shape[0] == 1 else y
    use_cfg = guidance_scale != 1.0 and cfg.task != "uncond"
    y_null = model.null_y(n, device) if use_cfg else None
    if negative is not None and use_cfg:
        if cfg.task != "class" or not 0 <= int(negative) < cfg.num_classes:
            raise ValueError(f"a negative class needs a class model and a label in [0, {cfg.num_classes})")
        y_null = torch.full((n,), int(negative), dtype=torch.long, device=device)
    if mix is None:
        mix = ((slot, 1.0),) if slot else ()
    if len(mix) > MIX_WIDTH:
        raise ValueError(f"at most {MIX_WIDTH} patches per job, got {len(mix)}")
    return Job(latents, y, y_null, guidance_scale, sched, gens, patch, tuple(mix), cfg_channels=cfg_channels,
               table=table, t_list=list(t_list))


@functools.lru_cache(maxsize=256)
def shared_schedule(sampler: str, steps: int, learn_sigma: bool, clip_sample: bool, beta_schedule: str):
    """(scheduler, step_table, timesteps as a tuple) of a DDIM/DDPM setting, made once per process: jobs only read
    them (the batched update steps from the table), and building a diffusers scheduler costs ~1 ms of Python per
    request that a server's runner thread waits for (the GIL) in eager mode."""
    sched = make_scheduler(sampler, steps, learn_sigma=learn_sigma, clip_sample=clip_sample,
                           beta_schedule=beta_schedule)
    return sched, step_table(sched), tuple(sched.timesteps.tolist())


# ----------------------------------------------------------------------------- vectorised DDIM / DDPM update
# One step of DDIM (eta 0) or DDPM for epsilon models is, per sample, with x0 = (x - sb * eps) / sa (clipped
# when the scheduler clips):  prev = a * x0 + b * x + d * eps + exp(0.5 * log_var) * noise,
# log_var = frac * max_log + (1 - frac) * min_log, frac = (v + 1) / 2 (v: learned variance channels, else 0).
# The coefficients come from the diffusers scheduler's own tables with its own formulas, so a batch of jobs on
# different steps, samplers and schedules updates in a few batched ops instead of one scheduler call per job.
COEFFS = ("sa", "sb", "a", "b", "d", "min_log", "max_log", "noise", "clip")


def step_table(sched) -> torch.Tensor | None:
    """Per-step coefficients (len(COEFFS), steps) fp32 of a DDIM or DDPM scheduler; None for DPM-Solver, whose
    multistep state needs its own step()."""
    if isinstance(sched, DPMSolverMultistepScheduler):
        return None
    cfg = sched.config
    if cfg.prediction_type != "epsilon" or cfg.thresholding or (cfg.clip_sample and cfg.clip_sample_range != 1.0):
        raise ValueError(f"unsupported {type(sched).__name__} config for the batched update")
    ac = sched.alphas_cumprod  # fp32, as diffusers computes its scalars
    ts = sched.timesteps.long()
    ap_t = ac[ts]
    zero = torch.zeros_like(ap_t)
    if isinstance(sched, DDIMScheduler):
        prev = ts - cfg.num_train_timesteps // sched.num_inference_steps
        ap_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], sched.final_alpha_cumprod)
        a, b, d = ap_prev ** 0.5, zero, (1 - ap_prev) ** 0.5  # eta = 0: no noise
        min_log = max_log = noise = zero
        clip = torch.full_like(ap_t, float(cfg.clip_sample))
    elif isinstance(sched, DDPMScheduler) and cfg.variance_type in ("fixed_small", "learned_range"):
        prev = torch.cat([ts[1:], ts.new_tensor([-1])])
        ap_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], sched.one)
        cur_alpha = ap_t / ap_prev
        cur_beta = 1 - cur_alpha
        a = ap_prev ** 0.5 * cur_beta / (1 - ap_t)
        b = cur_alpha ** 0.5 * (1 - ap_prev) / (1 - ap_t)
        d = zero
        min_log = torch.log(torch.clamp((1 - ap_prev) / (1 - ap_t) * cur_beta, min=1e-20))
        max_log = torch.log(cur_beta) if cfg.variance_type == "learned_range" else min_log
        noise = (ts > 0).float()
        clip = torch.full_like(ap_t, float(cfg.clip_sample))
    else:
        raise ValueError(f"no batched update for {type(sched).__name__} ({cfg.get('variance_type')})")
    return torch.stack([ap_t ** 0.5, (1 - ap_t) ** 0.5, a, b, d, min_log, max_log, noise, clip])


SAFE_COEF = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 0])  # prev = x: images another step rule (or padding) owns


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor, guided_channels: torch.Tensor):
    """Classifier-free guidance per row; channels not guided (mask 0) come from the conditional half.

    cond, uncond (B, C, H, W); scale (B,); guided_channels (B, C) bool (the original DiT guided 3 of 4).
    """
    guided = uncond + scale[:, None, None, None] * (cond - uncond)
    return torch.where(guided_channels[:, :, None, None], guided, cond)


def vector_step(x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, v: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM/DDPM update for every row: x, eps, v, noise (B, C, H, W); coef (len(COEFFS), B)."""
    sa, sb, a, b, d, min_log, max_log, _, clip = (c[:, None, None, None] for c in coef)
    x0 = x0_from_eps(x, eps, sa, sb)
    x0 = torch.where(clip > 0, x0.clamp(-1, 1), x0)
    prev = a * x0 + b * x + d * eps
    if noise is not None:
        frac = (v + 1) / 2 if v is not None else 0.0
        prev = prev + torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log)) * noise
    return prev


@dataclass
class StepBatch:
    """One batched step as tensors: R forward rows (CFG twins included) made from B images."""

    x: torch.Tensor  # (B, C, H, W) latents (scaled for schedulers that scale their input)
    row_image: torch.Tensor  # (R,) image of each forward row
    t: torch.Tensor  # (R,)
    y: torch.Tensor  # (R,) labels or (R, text_dim)
    slots: torch.Tensor  # (R, W) PatchPool slots of each row's (slot, scale) pairs, W = mix_width; unused: slot 0 ...
    patch_scales: torch.Tensor  # (R, W) fp32 ... at scale 0
    cond: torch.Tensor  # (B,) row of each image's conditional half
    uncond: torch.Tensor  # (B,) row of its unconditional twin (the conditional row itself without CFG)
    scale: torch.Tensor  # (B,) guidance scale (1 without CFG)
    guided: torch.Tensor  # (B, C) bool: channels CFG applies to
    coef: torch.Tensor  # (len(COEFFS), B) vector_step coefficients (SAFE_COEF for DPM-Solver images)
    noise: torch.Tensor | None  # (B, C, H, W) DDPM noise (zeros for images that draw none); None: no image does


def mix_width(pairs_per_row) -> int:
    """(slot, scale) pairs a step carries per row: 1 while no row composes patches, else MIX_WIDTH. Two fixed
    widths, so a graphed step has two shapes per bucket, and single-patch batches do not pay for three unused
    pairs (half of what a patch cost a compiled CPU step, bench/results/2026-12-06-cpu-patch-width1.log)."""
    return 1 if max(pairs_per_row, default=0) <= 1 else MIX_WIDTH


@dataclass(frozen=True)
class JobsLayout:
    """The tensors of a step that depend on the jobs alone, not on the step each is at (StepBatch's fields)."""

    rows: tuple[int, ...]  # forward rows of each job
    row_image: torch.Tensor
    y: torch.Tensor
    slots: torch.Tensor
    patch_scales: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    scale: torch.Tensor
    guided: torch.Tensor


LAYOUTS_KEPT = 8  # one runner steps several bases in turn (and tests run several engines in one process)
_layouts: dict[tuple, JobsLayout] = {}  # insertion-ordered: the oldest goes first
_layouts_lock = threading.Lock()


def jobs_layout(model: DiT, jobs: list[Job]) -> JobsLayout:
    """The jobs' layout, made again only when a job joins, leaves or is seated elsewhere: a batch that keeps its
    jobs (one request alone, or requests that arrived together) builds only its per-step tensors, and the step
    graphs skip copying the rest (app.engine.graphs, GraphedForward._fill)."""
    key = tuple((job, job.mix) for job in jobs)  # jobs hash by identity
    with _layouts_lock:
        layout = _layouts.get(key)
    if layout is not None:
        return layout
    C = model.config.in_channels
    dev = jobs[0].latents.device
    ys: list[torch.Tensor] = []
    rows: list[int] = []
    cond: list[int] = []
    uncond: list[int] = []
    row_image, slot_rows, mix_scales, scale, guided_k = [], [], [], [], []
    img = row = 0
    width = mix_width(len(job.mix) for job in jobs)
    for job in jobs:
        n, twins = job.latents.shape[0], job.y_null is not None
        halves = 2 if twins else 1
        ys += [job.y, job.y_null] if job.y_null is not None else [job.y]
        rows.append(n * halves)
        row_image += list(range(img, img + n)) * halves
        pairs = list(job.mix) + [(0, 0.0)] * (width - len(job.mix))
        slot_rows += [[p[0] for p in pairs]] * (n * halves)
        mix_scales += [[float(p[1]) for p in pairs]] * (n * halves)
        cond += range(row, row + n)
        uncond += range(row + n, row + 2 * n) if twins else range(row, row + n)
        scale += [job.guidance_scale if twins else 1.0] * n
        guided_k += [3 if job.cfg_channels == "first3" else C] * n
        img, row = img + n, row + n * halves

    def as_tensor(v, dtype=torch.long):
        return to_device(torch.tensor(v, dtype=dtype), dev)
    layout = JobsLayout(
        tuple(rows), row_image=as_tensor(row_image), y=torch.cat(ys), slots=as_tensor(slot_rows),
        patch_scales=as_tensor(mix_scales, torch.float32), cond=as_tensor(cond), uncond=as_tensor(uncond),
        scale=as_tensor(scale, torch.float32), guided=torch.arange(C, device=dev)[None] < as_tensor(guided_k)[:, None])
    with _layouts_lock:
        _layouts[key] = layout
        while len(_layouts) > LAYOUTS_KEPT:
            del _layouts[next(iter(_layouts))]
    return layout


def plan_step(model: DiT, jobs: list[Job]) -> StepBatch:
    """The tensors of one batched step for these jobs; DDPM jobs draw their noise from their own generators."""
    layout = jobs_layout(model, jobs)
    dev = jobs[0].latents.device
    xs, noises, coefs = [], [], []
    t_rows: list[float] = []
    for job, rows in zip(jobs, layout.rows, strict=True):
        n = job.latents.shape[0]
        xs.append(job.latents if job.table is not None else
                  job.scheduler.scale_model_input(job.latents, job.timesteps[job.index]))
        t_rows += [float(job.t_list[job.index])] * rows
        now = job.index if job.table is not None else 0
        coefs.append(job.step_coefs[now])
        noises.append(torch.cat([torch.randn((n // len(job.generators), *job.latents.shape[1:]), generator=g)
                                 for g in job.generators]) if job.step_draws[now] else None)
    noise = None
    if any(z is not None for z in noises):
        noise = to_device(torch.cat([z if z is not None else torch.zeros(x.shape)
                                     for z, x in zip(noises, xs, strict=True)]), dev)
    return StepBatch(
        x=torch.cat(xs), row_image=layout.row_image, t=to_device(torch.tensor(t_rows, dtype=torch.float32), dev),
        y=layout.y, slots=layout.slots, patch_scales=layout.patch_scales, cond=layout.cond, uncond=layout.uncond,
        scale=layout.scale, guided=layout.guided, coef=to_device(torch.cat(coefs, 1), dev), noise=noise)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """CPU tensor -> device without a host sync: a copy from pageable memory would wait for the GPU's queue."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def run_step(denoise, b: StepBatch, in_channels: int):
    """Forward all rows, guide, and update every image: returns (out (R, C_out, H, W), prev, eps, v).

    `denoise(x, t, y, slots, patch_scales)` -> fp32 model output. Pure tensor code, so it can be compiled or
    graph-captured.
    """
    out = denoise(b.x[b.row_image], b.t, b.y, b.slots, b.patch_scales)  # (R, C_out, H, W)
    cond = out[b.cond]  # (B, C_out, H, W)
    eps = guide(cond[:, :in_channels], out[b.uncond][:, :in_channels], b.scale, b.guided)
    v = cond[:, in_channels:] if cond.shape[1] > in_channels else None  # learned variance (DDPM reads it)
    return out, vector_step(b.x, eps, b.coef, v, b.noise), eps, v


StepFn = Callable[[StepBatch], tuple]  # StepBatch -> run_step's (out, prev, eps, v)


def eager_step(model: DiT, pool: PatchPool | None = None, patch: Patch | None = None,
               dtype=torch.float32) -> StepFn:
    """run_step on the model's plain forward: each row's patches from its `pool` (slot, scale) pairs, or `patch`
    for every row."""
    if pool is not None and patch is not None:
        raise ValueError("give a pool (patches by slot) or one patch, not both")

    def denoise(x, t, y, slots, scales):
        rows_patch = patch
        if pool is not None:
            # pairs no row uses (scale 0 everywhere) add exactly nothing: the eager step skips them, so a composed
            # batch pays for the pairs its rows use (a graphed step has fixed widths: 1 or MIX_WIDTH, mix_width)
            used = scales.ne(0).any(0).nonzero()  # (K_used, 1) columns some row uses
            width = int(used.max()) + 1 if used.numel() else 0
            rows_patch = pool.batch(slots[:, :width], scales[:, :width]) if width else None
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(x, t, y, patch=rows_patch).float()

    return lambda batch: run_step(denoise, batch, model.config.in_channels)


@torch.no_grad()
def denoise_step(model: DiT, jobs: list[Job], step: StepFn | None = None, dtype=torch.float32,
                 previews: frozenset[Job] = frozenset()) -> dict[Job, torch.Tensor]:
    """One batched forward and one batched DDIM/DDPM update for all jobs (DPM-Solver jobs: their scheduler's
    own multistep update). `step` runs the batch and reads each row's patch from its slot: eager_step(model, pool)
    or app.engine.graphs.GraphedForward.step. Without it, jobs carry one patch module (or none), run eagerly.

    Returns the x0 prediction (n, C, H, W) of each job in `previews` (only those pay for it)."""
    batch = plan_step(model, jobs)
    if step is None:
        if len({id(j.patch) for j in jobs}) > 1:
            raise ValueError("jobs with different patches need a pool step (eager_step(model, pool))")
        step = eager_step(model, patch=jobs[0].patch, dtype=dtype)
    elif any(j.patch is not None for j in jobs):
        raise ValueError("a step function reads patches from pool slots: these jobs carry patch modules")
    _, prev, eps, v = step(batch)
    x0s, img = {}, 0
    for job in jobs:
        n = job.latents.shape[0]
        if job in previews:  # a few elementwise ops on the job's own rows
            x0s[job] = predict_x0(job, eps[img:img + n])
        if job.table is not None:
            job.latents = prev[img:img + n]
        else:  # DPM-Solver: multistep state lives in its scheduler
            job.latents = job.scheduler.step(eps[img:img + n], job.timesteps[job.index], job.latents).prev_sample
        img += n
        job.index += 1
    return x0s


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, sa, sb) -> torch.Tensor:
    """The clean sample an epsilon prediction implies: (x - sb eps) / sa, sa = sqrt(a), sb = sqrt(1 - a)."""
    return (x - sb * eps) / sa


def predict_x0(job: Job, eps: torch.Tensor) -> torch.Tensor:
    """The clean sample the model predicts from the job's current latents."""
    a = job.scheduler.alphas_cumprod[int(job.t_list[job.index])].item()
    return x0_from_eps(job.latents, eps, a ** 0.5, (1 - a) ** 0.5)


@torch.no_grad()
def generate(model: DiT, vae: VAE | None = None, *, y=None, captions: list[str] | None = None,
             text_encoder: TextEncoder | None = None, patch: Patch | None = None, sampler: str = "ddpm",
             steps: int = 250, guidance_scale: float = 1.0, seeds: list[int] | int = 0,
             beta_schedule: str | None = None, clip_sample: bool | None = None, device=None, dtype=torch.float32,
             cfg_channels: str = "all", progress: bool = False):
    """Base + optional patch + sampler + guidance + seeds -> uint8 images (B, H, W, C).

    One image per seed; `y` is a class label or one per seed (ignored for unconditional models); `captions`
    (one, or one per seed) are encoded by `text_encoder` for text models.
    """
    vae = vae or PixelVAE(model.config.in_channels)
    device = device or next(model.parameters()).device
    meta = getattr(model, "meta", {})
    beta_schedule = beta_schedule or meta.get("beta_schedule", "linear")
    if clip_sample is None:
        clip_sample = clips_x0(vae.kind)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    conds = condition_rows(model, len(seeds), y=y, captions=captions, text_encoder=text_encoder)
    jobs = [new_job(model, y=cond, seed=s, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                    patch=patch, beta_schedule=beta_schedule, clip_sample=clip_sample, device=device,
                    cfg_channels=cfg_channels) for s, cond in zip(seeds, conds, strict=True)]
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        live = [j for j in jobs if not j.done]
        if not live:
            break
        denoise_step(model, live, dtype=dtype)
    latents = torch.cat([j.latents for j in jobs])
    return to_uint8(vae.decode(latents))


def condition_rows(model: DiT, n: int, y=None, captions=None,
                   text_encoder: TextEncoder | None = None) -> list[torch.Tensor]:
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
