"""Our engine vs diffusers on the same weights, steps, sampler, guidance and batch, in one run.

    python -m bench.engine --quick                 # CPU, the demo model, a few minutes
    python -m bench.engine --device cuda           # + DiT-XL/2 (random weights), 250-step DDPM / 50-step DDIM
    python -m bench.engine --churn                 # only the many-patches case (bench/churn.py): 64 patches
                                                   # over 8 device slots vs one patch, through the real Engine

Ours: app.model.sampling.denoise_step with the engine's bucketed forward (CUDA graphs on GPU; torch.compile
with frozen weights on CPU), bf16, patches served from the PatchPool. diffusers: DiTTransformer2DModel built
from our weights (bench/diffusers_ref.py) driven by DiTPipeline's own loop. Each timing is the minimum over
rounds that alternate between the contenders (on a shared machine load only adds time). The patch's cost is also
read in pairs: `--pairs` whole generations and `--step-pairs` single steps, patched and unpatched back to back
(median ratio, quartiles, bootstrap 95 % interval). Prints a table; the last line is JSON. On CPU both sides use the
same thread count (--threads).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from app.core.devices import pick_device
from app.engine.graphs import BUCKETS, GraphedForward
from app.model.dit import DiT, DiT_models, DiTConfig
from app.model.dmp import PatchPool, new_patch_for
from app.model.loaders import load_base
from app.model.sampling import denoise_step, make_scheduler, new_job, plan_step
from bench.churn import churn_suite
from bench.diffusers_ref import diffusers_math, diffusers_sample, to_diffusers

XL2_GFLOP_PER_ROW = 237.0  # docs/design.md §7: one XL/2 forward of one sample at 256 px (2 x 118.6 GMACs)
BF16_TFLOPS = 790.0  # measured bf16 GEMM rate on an H200 here (docs/design.md §7)
DEMO_SHAPE = dict(input_size=32, patch_size=4, in_channels=1, hidden_size=128, depth=8, num_heads=4,
                  num_classes=10, learn_sigma=True)  # app/trainer/train.py's pretrain defaults


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def randomize_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: adaLN-Zero's zeros would make blocks identities (and zeros time faster)."""
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * std)
    return model.eval().requires_grad_(False)


def random_patch(model: DiT, seed: int, std: float = 0.02):
    """A patch with small random prompts and gate, the scale a trained patch reaches."""
    patch = new_patch_for(model)
    randomize_(patch, std=std, seed=seed)
    return patch


def demo_model(path: str, device) -> tuple[DiT, str]:
    if Path(path).exists():
        return load_base(path).to(device), path
    with torch.device(device):
        model = randomize_(DiT(DiTConfig(**DEMO_SHAPE)), std=0.05)
    return model, f"random base of the demo shape ({path} absent)"


class Bench:
    """One model in three forms: ours (bf16 twin, or fp32, + pool + graphed forwards) and diffusers (bf16, fp32)."""

    def __init__(self, model: DiT, device, n_patches: int, compile_cpu: bool, buckets=BUCKETS,
                 diffusers_fp32: bool = True, ours_dtype: torch.dtype = torch.bfloat16, twin: bool = False):
        self.device = device
        self.fp32 = diffusers_math(model)  # same weights under diffusers' timestep frequencies: same function
        self.ours = diffusers_math(model).to(ours_dtype)
        self.cfg = model.config
        self.ref = {"bf16": to_diffusers(diffusers_math(model).to(torch.bfloat16))}
        if diffusers_fp32:
            self.ref["fp32"] = to_diffusers(self.fp32)
        cfg = self.cfg
        self.pool = PatchPool(cfg.hidden_size, cfg.num_tokens, cfg.depth, n_patches + 1, device=device)
        self.patches = [random_patch(model, seed=100 + i) for i in range(n_patches)]
        self.install_ms = []
        for p in self.patches:
            sync(device)
            t0 = time.perf_counter()
            self.pool.install(p)
            sync(device)
            self.install_ms.append((time.perf_counter() - t0) * 1e3)
        compile_ = compile_cpu and device.type == "cpu"
        # every job here carries one patch: the composing graphs (bench/compose.py times those) would only add warm-up
        self.patched = GraphedForward(self.ours, self.pool, buckets=buckets, compile=compile_, autotune=compile_,
                                      warm_compositions=False)
        self.unpatched = GraphedForward(self.ours, None, buckets=buckets, compile=compile_, autotune=compile_)
        # `twin`: a second unpatched step, compiled on its own: how far two compiles of the same step differ
        # (step_overhead's null reading; bench/results/2026-12-08-cpu-patch-cost-b1-ablations-epyc-adhoc.log)
        self.twin = GraphedForward(self.ours, None, buckets=buckets, compile=compile_,
                                   autotune=compile_) if twin else None

    def warm(self, images: list[int]) -> float:
        """Capture (GPU) or compile (CPU) the buckets these batch sizes use; returns seconds."""
        t0 = time.perf_counter()
        for fwd in (self.patched, self.unpatched, self.twin):
            if fwd is not None:
                fwd.capture(sorted({fwd.bucket_for(2 * b) for b in images}))
        return time.perf_counter() - t0

    def ours_run(self, *, batch: int, slots: list[int], sampler: str, steps: int, guidance: float, seed=0,
                 unpatched=False) -> torch.Tensor:
        """`batch` images as len(slots) jobs (one per slot) through denoise_step and the graphed forward."""
        per_job = batch // len(slots)
        jobs = [new_job(self.ours, y=(seed + i) % self.cfg.num_classes, seed=seed + i, sampler=sampler,
                        steps=steps, guidance_scale=guidance, n=per_job, slot=s, device=self.device)
                for i, s in enumerate(slots)]
        step = (self.unpatched if unpatched else self.patched).step
        while not jobs[0].done:
            denoise_step(self.ours, jobs, step=step)
        return torch.cat([j.latents for j in jobs])

    def diffusers_run(self, *, batch: int, sampler: str, steps: int, guidance: float, dtype="bf16", seed=0):
        sched = make_scheduler(sampler, steps, learn_sigma=False, clip_sample=False)  # DiTPipeline drops sigma
        labels = torch.arange(batch) % self.cfg.num_classes
        gen = torch.Generator(self.device).manual_seed(seed)
        return diffusers_sample(self.ref[dtype], sched, labels, self.cfg.num_classes, guidance, gen)


def time_alternating(fns: dict, device, repeats: int, warmup: bool = True, stat=min) -> dict[str, float]:
    """Seconds of each callable (min over rounds: background load only ever adds time); one warm-up each,
    then rounds that visit every callable once."""
    for fn in fns.values() if warmup else ():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: stat(v) for k, v in times.items()}


def paired_ratio(a, b, pairs: int, device) -> dict:
    """a's cost over b's: the median of `pairs` per-pair ratios (a / b - 1), each pair run back to back in
    alternating order, with its quartiles and a bootstrap 95 % interval of the median (scipy.stats.bootstrap). A
    small difference between two fast runs, which a minimum over a few rounds on a shared CPU cannot resolve
    (min-of-5 read -6 % to +12 % at batch 8 across runs)."""
    ratios = []
    for i in range(pairs):
        secs = {}
        for name, fn in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            secs[name] = time.perf_counter() - t0
        ratios.append(secs["a"] / secs["b"] - 1)
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    ci = stats.bootstrap((np.array(ratios),), np.median, confidence_level=0.95, n_resamples=2000,
                         method="percentile", rng=0).confidence_interval
    return {"pairs": pairs, "median": median, "q1": q1, "q3": q3, "ci95": [float(ci.low), float(ci.high)]}


@torch.no_grad()
def step_overhead(b: Bench, *, batch: int, guidance: float, pairs: int) -> dict:
    """The patch's cost per denoising step: the patched and unpatched step functions (the bucket's graph and its
    input copies) on one planned batch, `pairs` alternating pairs (paired_ratio). Planning, the per-job update and
    the decode are the same work either way, so this is an upper bound on its share of a whole generation, and
    a thousand millisecond pairs resolve it to about a point (95 % interval) where 20 whole generations cannot. With
    the bench's `twin`, also the same reading for two separate compiles of the unpatched step ("null"): what the
    compile alone moves, which the interval does not include."""
    def planned(slot: int):
        jobs = [new_job(b.ours, y=1, seed=0, sampler="ddim", steps=20, guidance_scale=guidance, n=batch, slot=slot,
                        device=b.device)]
        return plan_step(b.ours, jobs)
    patched, unpatched = planned(1), planned(0)
    steps = {"patched": lambda: b.patched.step(patched), "unpatched": lambda: b.unpatched.step(unpatched)}
    if b.twin is not None:
        steps["twin"] = lambda: b.twin.step(unpatched)
    for _ in range(20):  # the buffers' first copies, caches
        for step in steps.values():
            step()
    out = paired_ratio(steps["patched"], steps["unpatched"], pairs, b.device)
    if "twin" in steps:
        out["null"] = paired_ratio(steps["twin"], steps["unpatched"], pairs, b.device)
    return out


def sampling_suite(b: Bench, *, batch: int, sampler: str, steps: int, guidance: float, repeats: int,
                   mixed: bool, diffusers_dtypes=("bf16",), unpatched: bool = True, warmup: bool = True,
                   pairs: int = 0, step_pairs: int = 0) -> dict:
    """End-to-end images/s of diffusers and of ours (unpatched, one patch, and 8 patches vs one in 8 jobs);
    `pairs`: also the patch's cost from that many alternating patched/unpatched generations, `step_pairs` from
    that many steps (paired_ratio, step_overhead)."""
    kw = dict(batch=batch, sampler=sampler, steps=steps, guidance=guidance)
    fns = {f"diffusers_{d}": (lambda d=d: b.diffusers_run(dtype=d, **kw)) for d in diffusers_dtypes}
    fns["ours_patched"] = lambda: b.ours_run(slots=[1], **kw)
    if unpatched:
        fns["ours_unpatched"] = lambda: b.ours_run(slots=[0], unpatched=True, **kw)
    if mixed:
        fns |= {"ours_1patch_8jobs": lambda: b.ours_run(slots=[1] * 8, **kw),
                "ours_8patches_8jobs": lambda: b.ours_run(slots=list(range(1, 9)), **kw)}
    secs = time_alternating(fns, b.device, repeats, warmup)
    ips = {k: batch / s for k, s in secs.items()}  # min seconds over the rounds
    best_ref = max(ips[f"diffusers_{d}"] for d in diffusers_dtypes)
    out = {"batch": batch, "sampler": sampler, "steps": steps, "guidance": guidance,
           "images_per_s": ips, "seconds": secs,
           "speedup_vs_diffusers": ips["ours_patched"] / best_ref}
    if unpatched:
        out["patch_overhead"] = secs["ours_patched"] / secs["ours_unpatched"] - 1
        if pairs:
            out["patch_overhead_paired"] = paired_ratio(fns["ours_patched"], fns["ours_unpatched"], pairs, b.device)
        if step_pairs:
            out["patch_overhead_step"] = step_overhead(b, batch=batch, guidance=guidance, pairs=step_pairs)
    if mixed:
        out["mixed_patch_ratio"] = ips["ours_8patches_8jobs"] / ips["ours_1patch_8jobs"]
    return out


@torch.no_grad()
def equality_check(b: Bench, rows: int = 2) -> dict:
    """One forward: our fp32 model vs diffusers fp32 (same function), and our bf16 engine vs our fp32."""
    cfg = b.cfg
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(b.device)
    t = torch.randint(0, 1000, (rows,), generator=g).to(b.device)
    y = torch.randint(0, cfg.num_classes, (rows,), generator=g).to(b.device)
    out = {}
    if "fp32" in b.ref:
        ref = b.ref["fp32"](x, timestep=t, class_labels=y).sample
        out["ours_fp32_vs_diffusers_fp32_max_abs"] = (b.fp32(x, t.float(), y) - ref).abs().max().item()
    slots = torch.tensor([1, 0] * (rows // 2), device=b.device)
    ours = b.patched(x, t.float(), y, patch=b.pool.batch(slots))
    ref32 = b.fp32(x, t.float(), y, patch=b.pool.batch(slots))
    out["ours_bf16_engine_vs_fp32_eager_rel"] = ((ours - ref32).norm() / ref32.norm()).item()
    return out


def forward_sweep(b: Bench, rows_list: list[int], repeats: int = 10) -> dict:
    """ms per forward (CFG rows) of our graphs (1 patch, 8 patches, no pool) and of diffusers eager."""
    cfg, dev = b.cfg, b.device
    res = {}
    for rows in rows_list:
        x = torch.randn(rows, cfg.in_channels, cfg.input_size, cfg.input_size, device=dev)
        t = torch.randint(0, 1000, (rows,), device=dev)
        y = torch.randint(0, cfg.num_classes, (rows,), device=dev)
        one = b.pool.batch(torch.ones(rows, dtype=torch.long, device=dev))
        mixed = b.pool.batch(torch.arange(rows, device=dev) % 8 + 1)
        fns = {"ours_1patch": lambda x=x, t=t, y=y, one=one: b.patched(x, t.float(), y, patch=one),
               "ours_8patches": lambda x=x, t=t, y=y, mixed=mixed: b.patched(x, t.float(), y, patch=mixed),
               "ours_unpatched": lambda x=x, t=t, y=y: b.unpatched(x, t.float(), y),
               "diffusers_bf16": lambda x=x, t=t, y=y: b.ref["bf16"](x.bfloat16(), timestep=t, class_labels=y).sample}
        res[rows] = {k: v * 1e3 for k, v in time_alternating(fns, dev, repeats).items()}
    return res


def latency_with_vae(b: Bench, steps: int = 50, guidance: float = 4.0, repeats: int = 3) -> dict:
    """One 50-step DDIM + CFG image, end to end: sampling, SD VAE decode (random weights), uint8 on the host."""
    from app.model.vae import SDVAE, to_uint8

    vae = SDVAE.random_sd().to(b.device, torch.bfloat16)

    def one():
        latents = b.ours_run(batch=1, slots=[1], sampler="ddim", steps=steps, guidance=guidance)
        return to_uint8(vae.decode(latents))

    secs = time_alternating({"e2e": one}, b.device, repeats)["e2e"]
    dec = time_alternating({"decode": lambda: vae.decode(torch.randn(1, 4, 32, 32, device=b.device))},
                           b.device, repeats)["decode"]
    return {"seconds": secs, "vae_decode_seconds": dec, "steps": steps, "guidance": guidance}


def bf16_limit_images_per_s(steps: int, cfg_factor: int = 2) -> float:
    return BF16_TFLOPS * 1e12 / (XL2_GFLOP_PER_ROW * 1e9 * cfg_factor * steps)


def run_xl2(device, repeats: int, log, out: dict, save=lambda: None) -> dict:
    """DiT-XL/2 with random weights: forward sweep, 250-step DDPM and 50-step DDIM with CFG, latency.
    Fills `out` stage by stage and calls `save` after each, so a run cut short keeps what it measured."""
    with torch.device(device):
        model = randomize_(DiT_models["DiT-XL/2"](input_size=32, num_classes=1000))
    b = Bench(model, device, n_patches=8, compile_cpu=False, diffusers_fp32=False)
    del model
    t0 = time.perf_counter()
    b.patched.capture()
    b.unpatched.capture()
    capture_s = time.perf_counter() - t0
    log(f"XL/2: captured {b.patched.captures + b.unpatched.captures} graphs in {capture_s:.1f}s")
    sweep = forward_sweep(b, b.patched.rows, repeats=repeats * 3)
    for rows, r in sweep.items():
        log(f"  forward rows={rows:4d}: " + "  ".join(f"{k} {v:7.2f} ms" for k, v in r.items()))
    best_rows = max(sweep, key=lambda r: r / sweep[r]["ours_1patch"])
    best = best_rows // 2
    out |= {"capture_s": capture_s, "forward_ms": sweep, "best_batch": best, "equality": equality_check(b),
            "patch_install_ms": statistics.median(b.install_ms)}
    r = sweep[best_rows]
    out["patch_overhead_forward"] = r["ours_1patch"] / r["ours_unpatched"] - 1
    out["mixed_patch_ratio_forward"] = r["ours_1patch"] / r["ours_8patches"]
    captures = b.patched.captures
    extra = random_patch(b.fp32, seed=999)
    b.pool.free(8)
    sync(device)
    t0 = time.perf_counter()
    b.pool.install(extra)
    sync(device)
    out["patch_install_after_capture_ms"] = (time.perf_counter() - t0) * 1e3
    out["recaptures_after_install"] = b.patched.captures - captures
    save()
    for sampler, steps in (("ddpm", 250), ("ddim", 50)):
        for batch in (1, best):
            res = sampling_suite(b, batch=batch, sampler=sampler, steps=steps, guidance=4.0, repeats=1, mixed=False,
                                 unpatched=False, warmup=False)  # graphs captured, diffusers warm from the sweep
            res["fraction_of_bf16_limit"] = res["images_per_s"]["ours_patched"] / bf16_limit_images_per_s(steps)
            out[f"{sampler}{steps}_b{batch}"] = res
            save()
            log(f"XL/2 {sampler} {steps} steps batch {batch}: " + "  ".join(
                f"{k} {v:.3f} img/s" for k, v in res["images_per_s"].items())
                + f"  frac bf16 limit {res['fraction_of_bf16_limit']:.3f}")
    out["latency_50step_cfg_with_vae"] = latency_with_vae(b)
    out["graph_stats"] = {"patched": b.patched.stats(), "unpatched": b.unpatched.stats()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="demo model only, few steps (CPU: a few minutes)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model", default="models/mnist.safetensors")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both contenders")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8, help="the batch of the mixed-patches case and the headline ratio")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16],
                    help="batch sizes timed (issue 29: 1, 8 and the service's 16)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=20,
                    help="alternating patched/unpatched generations per batch for the patch's cost (paired_ratio)")
    ap.add_argument("--step-pairs", type=int, default=1000,
                    help="alternating patched/unpatched steps per batch for the patch's cost per step (step_overhead)")
    ap.add_argument("--ours-dtype", choices=["bf16", "fp32"], default="bf16",
                    help="our engine's weights (fp32 on a CPU without native bf16: AVX512-BF16 or AMX)")
    ap.add_argument("--no-xl", action="store_true", help="skip DiT-XL/2 on GPU")
    ap.add_argument("--churn", action="store_true", help="only the 64-patches-over-8-slots case (bench/churn.py)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(pick_device(args.device))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    steps = args.steps or (20 if args.quick else 50)
    repeats = args.repeats or 5
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    if args.churn:
        result = churn_suite(shape=DEMO_SHAPE, randomize=randomize_, random_patch=random_patch, device=device.type,
                             threads=args.threads, steps=steps, log=log)
        result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} threads)"
        log(f"64 patches over 8 slots vs 1 patch: throughput ratio {result['throughput_ratio']:.3f}, "
            f"p95 {result['mixed']['p95_s']:.3f} s vs {result['one_patch']['p95_s']:.3f} s")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return
    load_start = os.getloadavg()[0]
    model, source = demo_model(args.model, device)
    log(f"device {device}  demo model: {source}  threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    b = Bench(model, device, n_patches=8, compile_cpu=True,
              ours_dtype=torch.float32 if args.ours_dtype == "fp32" else torch.bfloat16, twin=args.step_pairs > 0)
    batches = sorted({*args.batches, 1, args.batch})
    warm_s = b.warm(batches)
    log(f"setup {time.perf_counter() - t0:.1f}s (compile/capture {warm_s:.1f}s), "
        f"patch install median {statistics.median(b.install_ms):.2f} ms")
    eq = equality_check(b)
    log("equality: " + "  ".join(f"{k} {v:.3g}" for k, v in eq.items()))
    guidance = float(getattr(model, "meta", {}).get("default_guidance", 4.0))
    suites = {}
    for batch in batches:
        mixed = batch == args.batch
        suites[batch] = sampling_suite(b, batch=batch, sampler="ddim", steps=steps, guidance=guidance,
                                       repeats=repeats, mixed=mixed, diffusers_dtypes=("bf16", "fp32"),
                                       pairs=args.pairs, step_pairs=args.step_pairs)
    log(f"\n{f'demo, ddim {steps} steps, cfg {guidance:.1f}':<34}" + "".join(f"{f'batch {k}':>14}" for k in suites))
    for name in suites[args.batch]["images_per_s"]:
        log(f"{name + ' img/s':<34}" + "".join(
            f"{s['images_per_s'][name]:>14.2f}" if name in s["images_per_s"] else f"{'-':>14}"
            for s in suites.values()))
    for key in ("speedup_vs_diffusers", "patch_overhead", "mixed_patch_ratio"):
        log(f"{key:<34}" + "".join(f"{s[key]:>14.3f}" if key in s else f"{'-':>14}" for s in suites.values()))
    if args.pairs:
        log(f"{'patch_overhead_paired (q1..q3)':<34}" + "".join(
            f"{p['median']:>7.3f} ({p['q1']:.3f}..{p['q3']:.3f})" for p in
            (s["patch_overhead_paired"] for s in suites.values())))
    if args.step_pairs:
        log(f"{'patch_overhead_step [95% CI]':<34}" + "".join(
            f" {p['median']:>7.4f} [{p['ci95'][0]:.4f}..{p['ci95'][1]:.4f}]" for p in
            (s["patch_overhead_step"] for s in suites.values())))
        log(f"{'  null: unpatched twin [95% CI]':<34}" + "".join(
            f" {p['null']['median']:>7.4f} [{p['null']['ci95'][0]:.4f}..{p['null']['ci95'][1]:.4f}]" for p in
            (s["patch_overhead_step"] for s in suites.values())))
    main_suite = suites[args.batch]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": source, "dtype": f"{args.ours_dtype} (ours), diffusers bf16 and fp32", "sampler": "ddim",
        "steps": steps,
        "guidance": guidance, "batch": args.batch,
        "speedup_vs_diffusers": main_suite["speedup_vs_diffusers"],
        "speedup_vs_diffusers_batch1": suites[1]["speedup_vs_diffusers"],
        "patch_overhead": main_suite["patch_overhead"], "mixed_patch_ratio": main_suite["mixed_patch_ratio"],
        "speedup_by_batch": {k: s["speedup_vs_diffusers"] for k, s in suites.items()},
        "patch_overhead_by_batch": {k: s["patch_overhead"] for k, s in suites.items()},
        "patch_overhead_paired_by_batch": {k: s.get("patch_overhead_paired") for k, s in suites.items()},
        "patch_overhead_step_by_batch": {k: s.get("patch_overhead_step") for k, s in suites.items()},
        "images_per_s": main_suite["images_per_s"]["ours_patched"],
        "diffusers_images_per_s": {k: v for k, v in main_suite["images_per_s"].items() if k.startswith("diffusers")},
        "load_avg_1min": {"start": load_start, "end": os.getloadavg()[0]}, "warm_s": warm_s,
        "patch_install_ms": statistics.median(b.install_ms), "equality": eq,
        "suites": suites, "graph_stats": b.patched.stats(),
    }
    def save():
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=1, default=str))

    if device.type == "cuda" and not args.quick and not args.no_xl:
        save()
        del b
        torch.cuda.empty_cache()
        result["xl2"] = {}
        run_xl2(device, repeats=1, log=log, out=result["xl2"], save=save)
    save()
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
