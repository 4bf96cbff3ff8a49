"""Where one denoising step's time goes: ours (the engine's compiled CPU step) vs diffusers, same weights.

    python -m bench.step_profile --batches 1 8 16 [--threads 1] [--top 12] [--out bench/results/x.log]

For each batch: one DDIM + CFG step of our GraphedForward (`--ours-dtype`, one patch and unpatched; Inductor
kernel profile, so each generated C++ kernel is its own row) and one DiTTransformer2DModel forward of diffusers
(bf16 and fp32; eager torch.profiler) on the same doubled rows, each the table of the `--top` ops by self CPU time
over `--reps` steps.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch._inductor import config as inductor_config
from torch.profiler import ProfilerActivity, profile

from bench.engine import Bench, demo_model


def table(fn, reps: int, top: int) -> tuple[str, float]:
    """torch.profiler's self-CPU table of `reps` calls, and the wall ms per call."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / reps
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top), ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist.safetensors")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--ours-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, source = demo_model(args.model, torch.device("cpu"))
    lines = [f"model {source}, {args.threads} thread(s), {args.reps} steps per table"]
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        b = Bench(model, torch.device("cpu"), n_patches=1, compile_cpu=True,
                  ours_dtype=torch.float32 if args.ours_dtype == "fp32" else torch.bfloat16)
        b.warm(args.batches)
        for batch in args.batches:
            # one step of the 20-step DDIM + CFG run bench.engine times: jobs re-made so every call is step 0
            kw = dict(batch=batch, sampler="ddim", steps=1, guidance=1.5)
            fns = {f"ours (compiled {args.ours_dtype}, 1 patch)": lambda kw=kw: b.ours_run(slots=[1], **kw),
                   f"ours (compiled {args.ours_dtype}, unpatched)": lambda kw=kw: b.ours_run(
                       slots=[0], unpatched=True, **kw)}
            for dtype in b.ref:
                fns[f"diffusers {dtype}"] = lambda batch=batch, dtype=dtype: b.diffusers_run(
                    batch=batch, sampler="ddim", steps=1, guidance=1.5, dtype=dtype)
            for name, fn in fns.items():
                text, ms = table(fn, args.reps, args.top)
                lines += [f"\n=== batch {batch}: {name}: {ms:.2f} ms per step (wall, incl. profiler)", text]
                print("\n".join(lines[-2:]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
