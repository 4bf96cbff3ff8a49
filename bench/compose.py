"""What a composition costs: a batch where every request mixes 2 (or 4) patches vs the same batch of single patches.

    python -m bench.compose                       # CPU, the demo model, the server's default eager fp32 step
    python -m bench.compose --compile             # the compiled CPU step (DMP_CPU_COMPILE), bf16

A step's rows carry 1 (slot, scale) pair while no job composes, else 4 (docs/design.md §2): the compiled step runs
its graph's width for every row (fixed shapes), the eager step skips pairs no row of the batch uses. This measures
both, end to end through
denoise_step: `batch` one-image jobs with CFG, each on its
own patch (single), on two patches at 0.5 each (compose2), on four (compose4), and the pool-less unpatched step for
the price of the patch pool itself. Rounds alternate the variants; each variant's time is its minimum over rounds
(load on a shared machine only adds time) and `noise` is each variant's max/min - 1 over the rounds. Both wall time
and this process's CPU time are taken: on a shared, oversubscribed CPU the wall time mostly measures the other
processes, while the CPU time of a 1-thread run is the work itself (what the ratios use; the wall ratios are in
the JSON too). The last line is JSON with `compose2_over_single` (images/s ratio; target >= 0.95).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from app.engine.graphs import GraphedForward, buckets_up_to
from app.model.dmp import PatchPool
from app.model.sampling import denoise_step, eager_step, new_job
from bench.engine import demo_model, random_patch


def run(model, step, mixes: list[tuple], steps: int) -> None:
    """One image per mix, DDIM with CFG, all jobs stepped together."""
    jobs = [new_job(model, y=i % model.config.num_classes, seed=i, sampler="ddim", steps=steps,
                    guidance_scale=4.0, mix=m) for i, m in enumerate(mixes)]
    while not jobs[0].done:
        denoise_step(model, jobs, step=step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist.safetensors")
    ap.add_argument("--batch", type=int, default=8, help="one-image requests per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="the compiled CPU step (bf16), as DMP_CPU_COMPILE=1")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, source = demo_model(args.model, "cpu")
    cfg = model.config
    n = 2 * args.batch
    pool = PatchPool(cfg.hidden_size, cfg.num_tokens, cfg.depth, n + 1)
    slots = [pool.install(random_patch(model, seed=100 + i)) for i in range(n)]
    if args.compile:
        model = model.to(torch.bfloat16)
        graphed = GraphedForward(model, pool, buckets=buckets_up_to(args.batch), compile=True, autotune=True)
        bare = GraphedForward(model, None, buckets=buckets_up_to(args.batch), compile=True, autotune=True)
        patched, unpatched = graphed.step, bare.step
    else:
        patched, unpatched = eager_step(model, pool), eager_step(model, None)
    b = args.batch
    variants = {
        "single": (patched, [((slots[i], 1.0),) for i in range(b)]),
        "compose2": (patched, [((slots[i], 0.5), (slots[b + i], 0.5)) for i in range(b)]),
        "compose4": (patched, [tuple((slots[(i + k * 3) % n], 0.25) for k in range(4)) for i in range(b)]),
        "unpatched": (unpatched, [()] * b),
    }
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for step, mixes in variants.values():  # warm-up (and, compiled, the compile) outside the timing
        run(model, step, mixes, 2)
    for r in range(args.rounds):
        for k, (step, mixes) in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(model, step, mixes, args.steps)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s ({cpu[k][-1]:.2f} s CPU)"
                                                          for k, v in times.items()), flush=True)
    best = {k: min(v) for k, v in cpu.items()}
    ips = {k: b / s for k, s in best.items()}
    wall = {k: b / min(v) for k, v in times.items()}
    out = {
        "model": source, "mode": "compiled bf16" if args.compile else "eager fp32", "batch": b, "cfg": True,
        "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
        "images_per_cpu_s": ips, "cpu_seconds_min": best, "cpu_seconds_all": cpu,
        "images_per_wall_s": wall, "wall_seconds_all": times,
        "noise": {k: max(v) / min(v) - 1 for k, v in cpu.items()},
        "wall_noise": {k: max(v) / min(v) - 1 for k, v in times.items()},
        "wall_compose2_over_single": wall["compose2"] / wall["single"],
        "load_average": [load_before, os.getloadavg()[0]],
        "compose2_over_single": ips["compose2"] / ips["single"],
        "compose4_over_single": ips["compose4"] / ips["single"],
        "single_over_unpatched": ips["single"] / ips["unpatched"],
    }
    for k in variants:
        print(f"{k:>10}: {ips[k]:6.2f} images per CPU s (min {best[k]:.2f} s, noise {out['noise'][k]:.0%}); "
              f"wall {wall[k]:.2f} images/s (noise {out['wall_noise'][k]:.0%})")
    print(f"compose2/single {out['compose2_over_single']:.3f}, compose4/single {out['compose4_over_single']:.3f}, "
          f"single/unpatched {out['single_over_unpatched']:.3f}; load average {load_before:.1f} -> "
          f"{out['load_average'][1]:.1f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
