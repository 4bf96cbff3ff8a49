"""GPU numerics checks at real shapes: Triton gate-add vs fallback, CUDA-graph replay vs eager, bf16 vs fp32,
patch install after capture, whole graphed sampling steps vs eager and without host syncs. Prints a table and writes JSON (--json). Run by scripts/gpu_checks.sh."""
from __future__ import annotations

import argparse
import json
import time

import torch

from app.engine.graphs import GraphedForward
from app.engine.kernels import gate_add, gate_add_reference
from app.model.dit import DiT_models
from app.model.dmp import PatchPool
from app.model.sampling import denoise_step, new_job
from bench.engine import random_patch, randomize_


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kernel_checks(B=128, N=256, D=1152, S=9, L=28) -> dict:
    """Fused kernel vs the torch fallback and an fp64 reference; fresh random inputs per dtype; timings."""
    from triton.testing import do_bench

    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(B, N, D, device="cuda").to(dtype)
        gates = torch.randn(B, N, device="cuda").softmax(-1)
        pool = torch.randn(S, L, N, D, device="cuda")
        slots = torch.randint(0, S, (B,), device="cuda")
        fused = gate_add(x, gates, pool, slots, 5)
        fallback = gate_add_reference(x, gates, pool, slots, 5)
        ref = x.double() + gates[..., None].double() * pool[slots, 5].double()
        ms_fused = do_bench(lambda: gate_add(x, gates, pool, slots, 5), return_mode="median")
        ms_fallback = do_bench(lambda: gate_add_reference(x, gates, pool, slots, 5), return_mode="median")
        moved = 2 * x.numel() * x.element_size() + B * N * D * pool.element_size() + gates.numel() * 4
        out[str(dtype).removeprefix("torch.")] = {
            "fused_vs_fp64_rel": rel(fused, ref), "fallback_vs_fp64_rel": rel(fallback, ref),
            "fused_vs_fallback_max_abs": (fused.double() - fallback.double()).abs().max().item(),
            "all_finite": bool(torch.isfinite(fused).all()), "ms_fused": ms_fused, "ms_fallback": ms_fallback,
            "fused_GBps": moved / ms_fused / 1e6}
    return out


def twin_models(size: str):
    """A random 32x32 class model in fp32 and its bf16 copy on CUDA, and an empty 4-slot patch pool."""
    with torch.device("cuda"):
        model32 = randomize_(DiT_models[size](input_size=32, num_classes=1000))
    model16 = DiT_models[size](input_size=32, num_classes=1000).cuda()
    model16.load_state_dict(model32.state_dict())
    model16 = model16.to(torch.bfloat16).eval().requires_grad_(False)
    cfg = model32.config
    return model32, model16, PatchPool(cfg.hidden_size, cfg.num_tokens, cfg.depth, 4, device="cuda")


@torch.no_grad()
def graph_checks(size="DiT-B/2", rows=16) -> dict:
    """Graph replay vs eager (bf16, same model), bf16 graph vs fp32 eager, install after capture."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model32, model16, pool = twin_models(size)
    s1 = pool.install(random_patch(model32, 1))
    fwd = GraphedForward(model16, pool, buckets=(rows // 2,))
    t0 = time.perf_counter()
    fwd.capture()
    capture_s = time.perf_counter() - t0
    x = torch.randn(rows, model32.config.in_channels, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (rows,), device="cuda").float()
    y = torch.randint(0, 1001, (rows,), device="cuda")
    mix = torch.tensor([s1, 0] * (rows // 2), device="cuda")
    graph = fwd(x, t, y, patch=pool.batch(mix))
    eager16 = model16(x.bfloat16(), t, y, patch=pool.batch(mix)).float()
    eager32 = model32(x, t, y, patch=pool.batch(mix))
    res = {"model": size, "rows": rows, "capture_s": capture_s,
           "graph_vs_eager_bf16_max_abs": (graph - eager16).abs().max().item(),
           "bf16_graph_vs_fp32_eager_rel": rel(graph, eager32),
           "bf16_eager_vs_fp32_eager_rel": rel(eager16, eager32)}
    captures = fwd.captures
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    s2 = pool.install(random_patch(model32, 2))
    torch.cuda.synchronize()
    res["install_ms"] = (time.perf_counter() - t0) * 1e3
    mix2 = torch.tensor([s2, s1] * (rows // 2), device="cuda")
    graph2 = fwd(x, t, y, patch=pool.batch(mix2))
    res["after_install_graph_vs_fp32_eager_rel"] = rel(graph2, model32(x, t, y, patch=pool.batch(mix2)))
    res["after_install_changed_output_rel"] = rel(graph2, graph)
    res["recaptures_after_install"] = fwd.captures - captures
    res["stats"] = fwd.stats()
    return res


@torch.no_grad()
def step_checks(size="DiT-B/2", steps=6) -> dict:
    """Whole sampling steps in the graphs (bf16) vs eager fp32 jobs: DDIM and DDPM, CFG and not, two patches;
    and no host sync inside a step (torch.cuda sync debug mode set to raise)."""
    model32, model16, pool = twin_models(size)
    s1, s2 = pool.install(random_patch(model32, 1)), pool.install(random_patch(model32, 2))
    fwd = GraphedForward(model16, pool, buckets=(4, 8))
    fwd.capture()

    def jobs(model):
        kw = dict(steps=steps, device="cuda")
        return [new_job(model, y=207, seed=1, sampler="ddim", guidance_scale=4.0, slot=s1, **kw),
                new_job(model, y=88, seed=2, sampler="ddpm", guidance_scale=1.5, slot=s2, n=2, **kw),
                new_job(model, y=3, seed=3, sampler="ddim", guidance_scale=1.0, slot=0, **kw)]

    eager, graphed = jobs(model32), jobs(model16)
    syncs = 0
    for _ in range(steps):
        denoise_step(model32, eager, pool=pool)
        torch.cuda.set_sync_debug_mode("error")
        try:
            denoise_step(model16, graphed, pool=pool, forward=fwd)
        except RuntimeError:  # a synchronizing call inside the step
            syncs += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    a, b = torch.cat([j.latents for j in graphed]), torch.cat([j.latents for j in eager])
    return {"model": size, "steps": steps, "graph_steps_with_host_sync": syncs,
            "bf16_graph_vs_fp32_eager_latents_rel": rel(a, b), "stats": fwd.stats()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("scripts/gpu_checks.py needs a CUDA GPU")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "kernel": kernel_checks(), "graphs": graph_checks(), "steps": step_checks()}
    for dtype, r in result["kernel"].items():
        print(f"gate_add {dtype:>8}: fused rel {r['fused_vs_fp64_rel']:.2e} fallback rel {r['fallback_vs_fp64_rel']:.2e}"
              f"  fused {r['ms_fused']:.3f} ms ({r['fused_GBps']:.0f} GB/s) vs fallback {r['ms_fallback']:.3f} ms")
    for part in ("graphs", "steps"):
        for k, v in result[part].items():
            print(f"{part} {k}: {v}")
    ok = (all(r["all_finite"] and r["fused_vs_fp64_rel"] <= 2 * r["fallback_vs_fp64_rel"] + 1e-7
              for r in result["kernel"].values())
          and result["graphs"]["recaptures_after_install"] == 0
          and result["graphs"]["bf16_graph_vs_fp32_eager_rel"] < 3e-2
          and result["graphs"]["after_install_graph_vs_fp32_eager_rel"] < 3e-2
          and result["steps"]["graph_steps_with_host_sync"] == 0
          and result["steps"]["stats"]["fallbacks"] == 0
          and result["steps"]["bf16_graph_vs_fp32_eager_latents_rel"] < 5e-2)
    result["ok"] = ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print("GPU CHECKS", "PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
