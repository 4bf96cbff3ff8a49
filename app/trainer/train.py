"""Training loops: pretrain a base (EMA as in DiT), patch a frozen base (DMP or PT), or fine-tune it (FT)."""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from app.core.devices import pick_dtype
from app.model import DiTConfig, fingerprint, load_base, save_base
from app.model.describe import BaseDescription, describe, resolve_vae
from app.model.dit import DiT
from app.model.dmp import DMP, importance_loss, load_loss, new_patch_for, patch_metadata_for, save_patch
from app.model.sampling import clips_x0
from app.model.vae import vae_downscale
from app.trainer.checkpoint import (
    load_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from app.trainer.data import DataError, DataSet, load_splits
from app.trainer.diffusion import Diffusion
from app.trainer.distributed import Dist, from_env
from app.trainer.evaluate import EVAL_SAMPLING
from app.trainer.provenance import recorded_config

METHODS = ("pretrain", "dmp", "pt", "ft")


@dataclass
class TrainConfig:
    method: str  # pretrain | dmp | pt | ft
    dataset: str
    out: str
    base: str | None = None  # the frozen base (dmp / pt) or the starting point (ft)
    domain: str = ""
    image_size: int = 32
    steps: int = 1000
    batch_size: int = 128  # global: split over every rank and accumulation step
    grad_accum: int = 1  # micro-batches per optimiser step (gradients summed, one all-reduce per step)
    lr: float = 1e-4
    lr_decay_steps: int = 0  # > 0: the lr falls linearly to 0 over the last this many steps (lets a base settle)
    gate_lr_mult: float = 10.0
    weight_decay: float = 0.0
    ema_decay: float = 0.0  # > 0 keeps an EMA of the trained weights (base, FT model or patch) and saves it
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast on GPU, fp32 on CPU
    hflip: str = "auto"  # auto = the data set's own choice (off for digits)
    checkpoint_every: int = 1000
    eval_every: int = 500  # held-out loss cadence
    max_seconds: float = 0.0  # > 0: stop early (and say so in the metrics) once training took this long
    # pretrain architecture
    hidden_size: int = 128
    depth: int = 8
    num_heads: int = 4
    patch_size: int = 4
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    beta_schedule: str = "linear"
    text_encoder: str = "minilm"
    # DMP
    pt_depth: int = 0  # 0 = every block
    gate_input: str = "c"
    top_k: float = 1.0
    noisy_gating: bool = True
    w_importance: float = 0.01
    w_load: float = 0.01
    load_kind: str = "smooth"
    selection: str = "softmax"  # top-k weights: softmax over the kept (official code) | hard (1, the paper)
    gate_scale: float = 1.0  # ours: gates x this in training, folded into the saved prompts (N: uniform gate = PT)
    freeze_gate: bool = False  # control: the gate stays at its zero init (uniform 1/N); only the prompts train
    shuffle_gate_t: bool = False  # control: in training the gate sees another row's timestep (class kept)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out).with_name(Path(self.out).stem + ".ckpt.safetensors")


def resolve_device(name: str) -> torch.device:
    return Dist().device(name)


def new_base(cfg: TrainConfig, data: DataSet) -> DiT:
    text_dim = 0
    if data.task == "text":
        assert data.text is not None, "a text data set carries its caption embeddings"
        text_dim = data.text.shape[1]
    dcfg = DiTConfig(input_size=cfg.image_size, patch_size=cfg.patch_size, in_channels=data.x.shape[1],
                     hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
                     num_classes=data.num_classes, learn_sigma=cfg.learn_sigma, text_dim=text_dim,
                     class_dropout_prob=cfg.class_dropout_prob if data.task != "uncond" else 0.0)
    return DiT(dcfg)


def check_base_matches(base: DiT, data: DataSet) -> None:
    c = base.config
    if c.task != data.task or c.in_channels != data.x.shape[1] or c.input_size != data.x.shape[-1]:
        raise ValueError(f"base is a {c.task} model on {c.in_channels}x{c.input_size}x{c.input_size} inputs; "
                         f"data set {data.name} is {data.task} on {tuple(data.x.shape[1:])}")


@torch.no_grad()
def heldout_loss(model, diffusion: Diffusion, data: DataSet, patch=None, n: int = 512, seed: int = 1234) -> float:
    """Training loss on test images with fixed timesteps and noise, so successive values are comparable."""
    was_training = model.training
    model.eval()
    if patch is not None:
        patch.eval()
    gen = torch.Generator(device=data.x.device).manual_seed(seed)
    idx = torch.arange(min(n, len(data)), device=data.x.device)
    total = 0.0
    for _ in range(4):
        total += diffusion.loss(model, data.x[idx], data.cond(idx), patch=patch, generator=gen).item()
    model.train(was_training)
    if patch is not None:
        patch.train(was_training)
    return total / 4


def unlabelled_base_classes(desc, root: str, num_classes: int) -> list[str]:
    """Class names "0".."n-1" of a base without labels; refuses class folders that are not such numbers."""
    names = [str(i) for i in range(num_classes)]
    folders = sorted(d.name for d in Path(root).iterdir() if d.is_dir()) if Path(root).is_dir() else []
    if bad := [f for f in folders if f not in names]:
        raise DataError(f"base {desc.name} has no labels, so class folders must be its class numbers 0-"
                        f"{num_classes - 1}, not {', '.join(bad[:3])}: give the base labels (id2label in "
                        f"model_index.json, or a sidecar {desc.name}.json with \"labels\", docs/models.md) or "
                        "rename the folders")
    return names


class Objective(nn.Module):
    """One micro-batch's training loss; a module so that DDP wraps base and patch together."""

    def __init__(self, model: DiT, patch, diffusion: Diffusion, cfg: TrainConfig, dist: Dist):
        super().__init__()
        self.model, self.patch, self.diffusion, self.cfg, self.dist = model, patch, diffusion, cfg, dist

    def forward(self, x, y, t, noise, drop=None, gate_noise=None, gate_t_perm=None) -> tuple[torch.Tensor, dict]:
        cfg, diffusion = self.cfg, self.diffusion
        x_t = diffusion.q_sample(x, t, noise)
        out, gating = self.model(x_t, t, y, patch=self.patch, drop=drop, gate_noise=gate_noise,
                                 gate_t_perm=gate_t_perm, return_gating=True)
        loss = diffusion.output_losses(out, x, x_t, t, noise).mean()
        logs = {"loss": loss.detach()}
        if cfg.method == "dmp":
            # The balancing losses are batch statistics: they see every rank's rows of this micro-batch. Each
            # rank then computes the same value; all_gather's backward sums every rank's gradient into each
            # rank's own rows (x world_size) and DDP's average divides it out again: the global gradient.
            gating = gating.gathered(self.dist.gather_rows)
            imp = importance_loss(gating.gates)
            load = load_loss(gating, self.patch.k, kind=cfg.load_kind)
            loss = loss + cfg.w_importance * imp + cfg.w_load * load
            logs |= {"imp": imp.detach(), "load": load.detach()}
        return loss, logs


class Trainer:
    """One run: builds the model, optimiser and data, then `run()` trains, checkpoints and writes the output.

    Under torchrun it is one rank of a DDP job: every random draw is made for the global batch from the same
    seed on every rank, each rank computing its rows, so the math is the same at any world size; rank 0 alone
    writes checkpoints, outputs and progress, and every rank resumes from the same checkpoint.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = True, progress: bool = True,
                 allow_batch_change: bool = False):
        if cfg.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        self.cfg, self.allow_batch_change = cfg, allow_batch_change
        self.dist = from_env(cfg.device)
        self.progress = progress and self.dist.main
        self.device = self.dist.device(cfg.device)
        parts = self.dist.world_size * cfg.grad_accum
        if cfg.grad_accum < 1 or cfg.batch_size % parts:
            raise ValueError(f"the global batch {cfg.batch_size} must split evenly over {self.dist.world_size} "
                             f"rank(s) x {cfg.grad_accum} accumulation step(s)")
        amp = cfg.amp if cfg.amp != "auto" else ("none" if pick_dtype("auto", self.device) == torch.float32 else "bf16")
        self.amp_dtype = torch.bfloat16 if amp == "bf16" else None
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.patch: DMP | None = None
        self.ema: nn.Module | None = None
        self.desc: BaseDescription | None = None
        data_kw = {"text_encoder": cfg.text_encoder} if "captions" in cfg.dataset else {}
        if cfg.method != "pretrain":
            if not cfg.base:
                raise ValueError(f"--base is required for {cfg.method}")
            self.desc = describe(cfg.base)  # the same description the server reads: VAE, labels, schedule
            self.model = load_base(self.desc.checkpoint, num_heads=self.desc.num_heads)
            self.base_fingerprint = fingerprint(self.model)
            data_kw = self.base_data_kwargs(cfg)
        size = cfg.image_size if self.desc is None else self.pixel_size
        with self.dist.main_first():  # rank 0 builds any data cache (latents, caption embeddings), the others read it
            self.train_data, self.test_data = load_splits(cfg.dataset, size, progress=self.progress, **data_kw)
        self.train_data, self.test_data = self.train_data.to(self.device), self.test_data.to(self.device)
        self.hflip = self.train_data.hflip if cfg.hflip == "auto" else cfg.hflip == "on"
        if cfg.method == "pretrain":
            self.model = new_base(cfg, self.train_data)
        else:
            check_base_matches(self.model, self.train_data)
        beta = self.desc.beta_schedule if self.desc else cfg.beta_schedule
        self.diffusion = Diffusion(beta, self.device)
        self.model.to(self.device).train()
        self.params = self.setup_trainable()
        self.step, self.elapsed = 0, 0.0
        self.history: dict[str, list] = {"heldout_loss": []}
        if resume and cfg.checkpoint_path.exists():
            self.restore()
        self.dist.same_everywhere(self.step, self.device, "the step to start from")
        objective = Objective(self.model, self.patch, self.diffusion, cfg, self.dist)
        # Frozen weights are not synchronised; every trainable one is used each step (setup_trainable freezes
        # the ones that would not be), so DDP need not search the graph for unused parameters.
        self.objective: Objective | DistributedDataParallel = DistributedDataParallel(
            objective, device_ids=[self.device] if self.device.type == "cuda" else None,
        ) if self.dist.active else objective

    def base_data_kwargs(self, cfg: TrainConfig) -> dict:
        """How to read the data for this base (its VAE, labels, text encoder); sets the pixel size it generates."""
        mc, desc = self.model.config, self.desc
        assert desc is not None, "only a run from a base reads data the base's way"
        vae = resolve_vae(desc, mc.in_channels)
        self.pixel_size = mc.input_size * (vae_downscale(vae) if vae != "pixel" else 1)
        if not cfg.dataset.startswith("folder:"):
            return {"text_encoder": desc.text_encoder or cfg.text_encoder} if mc.task == "text" else {}
        kw: dict[str, Any] = {"channels": 3 if vae != "pixel" else mc.in_channels,
                              "vae": None if vae == "pixel" else vae}
        if mc.task == "class":
            kw["labels"] = desc.labels or unlabelled_base_classes(desc, cfg.dataset.removeprefix("folder:"),
                                                                  mc.num_classes)
        elif mc.task == "text":
            kw["text_encoder"] = desc.text_encoder or cfg.text_encoder
        return kw

    def setup_trainable(self) -> list:
        cfg = self.cfg
        if cfg.method in ("dmp", "pt"):
            self.model.requires_grad_(False)  # frozen base: only the patch trains
            self.patch = new_patch_for(self.model, pt_depth=cfg.pt_depth or None, gate_input=cfg.gate_input,
                                       top_k=cfg.top_k, method=cfg.method, noisy_gating=cfg.noisy_gating,
                                       selection=cfg.selection, gate_scale=cfg.gate_scale)
            self.patch.to(self.device).train()
            if cfg.method == "dmp" and not cfg.noisy_gating:
                self.patch.w_noise.requires_grad_(False)  # unused: DDP wants every trainable parameter used
            groups: list[dict[str, Any]] = [{"params": [self.patch.prompts], "lr": cfg.lr}]
            if cfg.method == "dmp" and cfg.freeze_gate:
                self.patch.gate.requires_grad_(False)
                self.patch.w_noise.requires_grad_(False)
            elif cfg.method == "dmp":
                groups.append({"params": [*self.patch.gate.parameters(), self.patch.w_noise],
                               "lr": cfg.lr * cfg.gate_lr_mult})
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         fused=self.device.type == "cuda")
            params = [p for g in groups for p in g["params"]]
        else:
            self.model.requires_grad_(True)
            self.model.pos_embed.requires_grad_(False)  # fixed sin-cos, as in DiT
            if hasattr(self.model.y_embedder, "null_embedding") and self.model.y_embedder.dropout_prob == 0:
                self.model.y_embedder.null_embedding.requires_grad_(False)  # never used without condition dropout
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         fused=self.device.type == "cuda")
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        if cfg.ema_decay > 0:  # of the trained module (ours: the paper and the official DMP code use no EMA)
            self.ema = copy.deepcopy(self.trained).eval().requires_grad_(False)
        return params

    @property
    def trained(self) -> torch.nn.Module:
        return self.patch if self.patch is not None else self.model

    # ----------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.patch is not None:
            out = {f"patch.{k}": v for k, v in self.patch.state_dict().items()}
        else:
            out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            out |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        return out | optimizer_tensors(self.opt) | rng_tensors(self.gen)

    def save_state(self) -> None:
        meta = {"step": self.step, "elapsed": self.elapsed, "history": self.history, "config": asdict(self.cfg),
                "world_size": self.dist.world_size}
        if self.patch is not None:
            meta["base_fingerprint"] = self.base_fingerprint
        save_checkpoint(self.cfg.checkpoint_path, self.state_tensors(), meta)

    def restore(self) -> None:
        tensors, meta = load_checkpoint(self.cfg.checkpoint_path)
        if self.patch is not None and meta.get("base_fingerprint") != self.base_fingerprint:
            raise ValueError(f"checkpoint {self.cfg.checkpoint_path} was made on another base; "
                             "delete it or pass --no-resume")
        old_batch = meta["config"]["batch_size"]
        if old_batch != self.cfg.batch_size and not self.allow_batch_change:
            raise ValueError(f"checkpoint {self.cfg.checkpoint_path} was trained at global batch {old_batch}, "
                             f"this run asks for {self.cfg.batch_size}: keep the global batch (any world size "
                             "gives the same math), or pass --allow-batch-change, or --no-resume")
        if self.patch is not None:
            self.patch.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("patch.")})
        else:
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        load_optimizer_tensors(self.opt, tensors)
        restore_rng(tensors, self.gen)
        self.step, self.elapsed, self.history = meta["step"], meta["elapsed"], meta["history"]
        if old_batch != self.cfg.batch_size:
            self.history.setdefault("batch_changes", []).append([self.step, old_batch, self.cfg.batch_size])

    # ------------------------------------------------------------------ loop
    def draw(self) -> dict[str, torch.Tensor | None]:
        """Everything random in one step, drawn for the global batch (same generator state on every rank)."""
        cfg, data, g, dev = self.cfg, self.train_data, self.gen, self.device
        B = cfg.batch_size
        d = {"idx": torch.randint(0, len(data), (B,), device=dev, generator=g),
             "flip": torch.rand(B, device=dev, generator=g) < 0.5 if self.hflip else None,
             "t": torch.randint(0, self.diffusion.num_timesteps, (B,), device=dev, generator=g),
             "noise": torch.randn((B, *data.x.shape[1:]), device=dev, generator=g)}
        p = self.model.y_embedder.dropout_prob if self.model.training else 0.0
        d["drop"] = torch.rand(B, device=dev, generator=g) < p if p > 0 else None  # CFG condition dropout
        patch = self.patch
        d["gate_noise"] = torch.randn((patch.pt_depth, B, patch.num_tokens), device=dev, generator=g) \
            if patch is not None and cfg.method == "dmp" and patch.noisy_gating else None  # (L, B, N)
        d["gate_t_perm"] = torch.randperm(B, device=dev, generator=g) if cfg.shuffle_gate_t else None
        return d

    def micro_batch(self, d: dict, a: int) -> dict[str, torch.Tensor | None]:
        """This rank's rows of accumulation step a: rows [a*B/A, (a+1)*B/A) of the global batch, split by rank."""
        share = self.cfg.batch_size // self.cfg.grad_accum
        mine = self.dist.rows(share)
        rows = slice(a * share + mine.start, a * share + mine.stop)
        idx = d["idx"][rows]
        x = self.train_data.x[idx]
        if d["flip"] is not None:
            x = torch.where(d["flip"][rows, None, None, None], x.flip(-1), x)
        return {"x": x, "y": self.train_data.cond(idx), "t": d["t"][rows], "noise": d["noise"][rows],
                "drop": None if d["drop"] is None else d["drop"][rows],
                "gate_noise": None if d["gate_noise"] is None else d["gate_noise"][:, rows],
                "gate_t_perm": None if d["gate_t_perm"] is None else self.local_perm(d["gate_t_perm"], rows)}

    @staticmethod
    def local_perm(perm: torch.Tensor, rows: slice) -> torch.Tensor:
        """This micro-batch's rows of a global permutation, as a permutation of its own rows (same order)."""
        return perm[(perm >= rows.start) & (perm < rows.stop)] - rows.start

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, drawn = self.cfg, self.draw()
        self.opt.zero_grad(set_to_none=True)
        logs: dict[str, torch.Tensor] = {}
        objective = self.objective
        for a in range(cfg.grad_accum):
            # Gradients of all but the last micro-batch stay local; the last backward all-reduces the sum.
            local = a < cfg.grad_accum - 1
            with objective.no_sync() if local and isinstance(objective, DistributedDataParallel) else nullcontext():
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss, micro_logs = self.objective(**self.micro_batch(drawn, a))
                (loss / cfg.grad_accum).backward()  # each micro loss is a mean: the step's gradient is the batch mean
            for k, v in micro_logs.items():
                logs[k] = v / cfg.grad_accum + logs.get(k, 0.0)
        if cfg.lr_decay_steps > 0:  # a function of the step alone, so a resumed run follows the same schedule
            factor = min(1.0, (cfg.steps - self.step) / cfg.lr_decay_steps)
            for group, lr in zip(self.opt.param_groups, self.base_lrs, strict=True):
                group["lr"] = lr * factor
        self.opt.step()
        if self.ema is not None:
            ema_p: list[torch.Tensor] = [p for p in self.ema.parameters()]
            torch._foreach_lerp_(ema_p, [p.detach() for p in self.trained.parameters()], 1 - cfg.ema_decay)
        return logs

    def out_of_time(self) -> bool:
        """Rank 0's clock decides for every rank (a collective: every rank calls it at the same points)."""
        if self.cfg.max_seconds <= 0:
            return False
        return self.dist.agree(self.elapsed >= self.cfg.max_seconds, self.device)

    def eval_model(self):
        return self.ema if self.ema is not None and self.patch is None else self.model

    def eval_patch(self):
        return self.ema if self.ema is not None and self.patch is not None else self.patch

    def run(self) -> Path:
        cfg, main = self.cfg, self.dist.main
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method} {cfg.domain or cfg.dataset}",
                   disable=not self.progress, dynamic_ncols=True)
        start = time.perf_counter() - self.elapsed
        stopped = self.out_of_time()
        while self.step < cfg.steps and not stopped:
            logs = self.train_step()
            self.step += 1
            bar.update(1)
            if self.step % 25 == 0 or self.step == cfg.steps:
                bar.set_postfix({k: f"{v.item():.4f}" for k, v in logs.items()}, refresh=False)
            if main and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                self.history["heldout_loss"].append(
                    [self.step, heldout_loss(self.eval_model(), self.diffusion, self.test_data, self.eval_patch())])
            self.elapsed = time.perf_counter() - start
            stopped = self.out_of_time()
            if main and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or stopped):
                self.save_state()
        hist = self.history["heldout_loss"]
        if main and stopped and (not hist or hist[-1][0] != self.step):
            hist.append([self.step, heldout_loss(self.eval_model(), self.diffusion, self.test_data, self.eval_patch())])
        bar.close()
        return self.write_output() if main else Path(cfg.out)

    # ---------------------------------------------------------------- output
    def metrics(self) -> dict:
        hist = self.history["heldout_loss"]
        return {"steps": self.step, "train_seconds": round(self.elapsed, 1), "device": str(self.device),
                "trainable_params": sum(p.numel() for p in self.params), "planned_steps": self.cfg.steps,
                "heldout_loss": hist[-1][1] if hist else None, "heldout_loss_curve": hist,
                "world_size": self.dist.world_size, "global_batch": self.cfg.batch_size,
                "grad_accum": self.cfg.grad_accum, "batch_changes": self.history.get("batch_changes", [])}

    def write_output(self) -> Path:
        cfg = self.cfg
        config = recorded_config(cfg, self.model.config, cfg.image_size if self.desc is None else self.pixel_size,
                                 self.diffusion.beta_schedule, self.train_data.meta.get("text_encoder", ""))
        if self.patch is not None:
            patch = self.eval_patch().eval()
            assert self.desc is not None, "a patch is trained on a base"
            meta = patch_metadata_for(self.model, self.desc.name, cfg.domain or self.desc.meta.get("domain", ""))
            return save_patch(patch, cfg.out, **meta, train_config=config, metrics=self.metrics())
        model = self.eval_model().cpu()
        # Keys the service reads (app/engine/bases.py): name, labels, defaults, schedule, vae, text encoder.
        meta = {"name": Path(cfg.out).stem, "domain": cfg.domain or cfg.dataset, "dataset": cfg.dataset,
                "beta_schedule": self.diffusion.beta_schedule, "vae": self.train_data.meta.get("vae", "pixel"),
                "clip_sample": str(clips_x0(self.train_data.meta.get("vae", "pixel"))).lower(),
                "labels": list(self.train_data.class_names) if self.train_data.task != "uncond" else [],
                "default_sampler": EVAL_SAMPLING["sampler"], "default_steps": str(EVAL_SAMPLING["steps"]),
                "default_guidance": str(EVAL_SAMPLING["guidance_scale"] if self.train_data.task != "uncond" else 1.0),
                "train_config": config, "metrics": self.metrics()}
        if self.train_data.task == "text":
            meta["text_encoder"] = cfg.text_encoder
        if cfg.method == "ft":
            assert self.desc is not None, "fine-tuning starts from a base"
            meta |= {"finetuned_from": self.base_fingerprint, "name": self.desc.name + "-ft"}
        return save_base(model, cfg.out, **meta)
