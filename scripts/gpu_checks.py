"""GPU checks at real shapes: fused add + LayerNorm + modulate vs torch and fp64, CUDA-graph replay vs eager, bf16
vs fp32, patch install after capture, whole graphed sampling steps vs eager and without host syncs, and XL/2
forwards with and without the fused kernels plus a kernel profile. Prints a table and writes JSON (--json)."""
from __future__ import annotations

import argparse
import json
import time

import torch

from app.engine.graphs import GraphedForward
from app.model.dit import DiT_models
from app.model.dmp import PatchPool
from app.model.kernels import PromptAdd, add_norm_modulate, add_norm_modulate_reference, fused, use_triton
from app.model.sampling import denoise_step, eager_step, new_job
from bench.engine import random_patch, randomize_, time_alternating


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()  # the kernel serves inference only: with autograd on, add_norm_modulate takes the torch path
def kernel_checks(B=128, N=256, D=1152, S=9, L=28) -> dict:
    """Fused add + LayerNorm + modulate vs the torch reference and fp64, per dtype and variant; timings."""
    from triton.testing import do_bench

    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, res = (torch.randn(B, N, D, device="cuda").to(dtype) for _ in range(2))
        shift, scale, gate = (0.5 * torch.randn(B, 6 * D, device="cuda")).to(dtype).chunk(6, dim=1)[:3]
        prompt = PromptAdd(torch.randn(B, N, device="cuda").softmax(-1), torch.randn(S, L, N, D, device="cuda"),
                           torch.randint(0, S, (B,), device="cuda"), 5)
        for name, kw in {"prompt": dict(prompt=prompt), "residual": dict(residual=res, residual_gate=gate)}.items():
            fused_x, fused_h = add_norm_modulate(x, shift, scale, 1e-6, **kw)
            ref_x, ref_h = add_norm_modulate_reference(x, shift, scale, 1e-6, **kw)
            d = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
            if "prompt" in d:
                d["prompt"] = PromptAdd(prompt.gates.double(), prompt.prompts.double(), prompt.slots, 5)
            ex_x, ex_h = add_norm_modulate_reference(x.double(), shift.double(), scale.double(), 1e-6, **d)
            ms_fused = do_bench(lambda x=x, shift=shift, scale=scale, kw=kw: add_norm_modulate(x, shift, scale, 1e-6,
                                                                                                **kw),
                                return_mode="median")
            ms_ref = do_bench(lambda x=x, shift=shift, scale=scale, kw=kw: add_norm_modulate_reference(x, shift, scale,
                                                                                                      1e-6, **kw),
                              return_mode="median")
            moved = (4 if name == "residual" else 3) * x.numel() * x.element_size()  # reads x (+ y), writes x, h
            out[f"{name}_{str(dtype).removeprefix('torch.')}"] = {
                "fused_x_vs_fp64_rel": rel(fused_x, ex_x), "reference_x_vs_fp64_rel": rel(ref_x, ex_x),
                "fused_h_vs_fp64_rel": rel(fused_h, ex_h), "reference_h_vs_fp64_rel": rel(ref_h, ex_h),
                "used_triton": use_triton(x), "all_finite": bool(torch.isfinite(fused_h).all()),
                "ms_fused": ms_fused, "ms_reference": ms_ref, "fused_GBps": moved / ms_fused / 1e6}
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
        denoise_step(model32, eager, step=eager_step(model32, pool))
        torch.cuda.set_sync_debug_mode("error")
        try:
            denoise_step(model16, graphed, step=fwd.step)
        except RuntimeError:  # a synchronizing call inside the step
            syncs += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    a, b = torch.cat([j.latents for j in graphed]), torch.cat([j.latents for j in eager])
    return {"model": size, "steps": steps, "graph_steps_with_host_sync": syncs,
            "bf16_graph_vs_fp32_eager_latents_rel": rel(a, b), "stats": fwd.stats()}


def bf16_model_with_patch(size: str):
    """A random bf16 32x32 class model on CUDA, a 2-slot pool and the slot of one random patch in it."""
    with torch.device("cuda"):
        model = randomize_(DiT_models[size](input_size=32, num_classes=1000)).to(torch.bfloat16)
    cfg = model.config
    pool = PatchPool(cfg.hidden_size, cfg.num_tokens, cfg.depth, 2, device="cuda")
    return model, pool, pool.install(random_patch(model, 1))


def random_rows(cfg, rows: int):
    """Forward inputs: fp32 latents, float timesteps, labels including the null class."""
    return (torch.randn(rows, cfg.in_channels, cfg.input_size, cfg.input_size, device="cuda"),
            torch.randint(0, 1000, (rows,), device="cuda").float(), torch.randint(0, 1001, (rows,), device="cuda"))


@torch.no_grad()
def fusion_gain(size="DiT-XL/2", images=(32, 64), repeats=10, top=20) -> dict:
    """ms per graphed forward (bf16; one patch and none) with the fused kernels and with plain torch ops, and
    the kernel table of one eager forward (torch.profiler): where the time goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model, pool, slot = bf16_model_with_patch(size)
    cfg = model.config
    graphs = {}
    for on in (True, False):
        with fused(on):  # the kernels a graph replays are fixed at capture
            for name, p in (("patched", pool), ("unpatched", None)):
                graphs[f"{'fused' if on else 'plain'}_{name}"] = fwd = GraphedForward(model, p, buckets=images)
                fwd.capture()
    out = {"model": size, "forward_ms": {}}
    for rows in (2 * b for b in images):
        x, t, y = random_rows(cfg, rows)
        patch = pool.batch(torch.full((rows,), slot, device="cuda"))
        fns = {k: (lambda f=f, k=k, x=x, t=t, y=y, patch=patch: f(x, t, y, patch=None if k.endswith("unpatched")
                                                                  else patch))
               for k, f in graphs.items()}
        ms = {k: v * 1e3 for k, v in time_alternating(fns, torch.device("cuda"), repeats).items()}
        ms["fusion_speedup_patched"] = ms["plain_patched"] / ms["fused_patched"]
        ms["patch_overhead_fused"] = ms["fused_patched"] / ms["fused_unpatched"] - 1
        ms["patch_overhead_plain"] = ms["plain_patched"] / ms["plain_unpatched"] - 1
        out["forward_ms"][rows] = ms
    rows = 2 * images[-1]
    x, t, y = random_rows(cfg, rows)
    x = x.bfloat16()
    patch = pool.batch(torch.full((rows,), slot, device="cuda"))
    model(x, t, y, patch=patch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(x, t, y, patch=patch)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only: CPU-side op rows would count their kernels a second time
    dev_us = [(e.key, e.count, e.self_device_time_total) for e in events if e.device_type == DeviceType.CUDA]
    dev_us.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in dev_us)
    out["profile_rows"] = rows
    out["profile_kernel_ms_total"] = total / 1e3
    out["profile_top"] = [{"kernel": k[:120], "calls": c, "ms": us / 1e3, "share": us / total} for k, c, us in
                          dev_us[:top]]
    return out


@torch.no_grad()
def compile_gain(size="DiT-XL/2", images=64, repeats=10) -> dict:
    """One bucket's graphed step (bf16, one patch): the hand-fused eager step vs the torch.compile'd step
    (DMP_CUDA_COMPILE), both captured by GraphedForward; compile seconds and output agreement."""
    model, pool, slot = bf16_model_with_patch(size)
    graphs, setup_s = {}, {}
    for name, compile_ in (("fused", False), ("compiled", True)):
        t0 = time.perf_counter()
        graphs[name] = fwd = GraphedForward(model, pool, buckets=(images,), compile=compile_)
        fwd.capture()
        setup_s[name] = time.perf_counter() - t0
    rows = 2 * images
    x, t, y = random_rows(model.config, rows)
    patch = pool.batch(torch.full((rows,), slot, device="cuda"))
    outs = {k: f(x, t, y, patch=patch) for k, f in graphs.items()}
    ms = time_alternating({k: (lambda f=f: f(x, t, y, patch=patch)) for k, f in graphs.items()},
                          torch.device("cuda"), repeats)
    return {"model": size, "rows": rows, "setup_s": setup_s, "forward_ms": {k: v * 1e3 for k, v in ms.items()},
            "compiled_speedup": ms["fused"] / ms["compiled"],
            "compiled_vs_fused_rel": rel(outs["compiled"], outs["fused"]),
            "stats": {k: f.stats() for k, f in graphs.items()}}


def save(result: dict, path: str | None) -> None:
    """Write what is measured so far (a run cut short by its timeout keeps it)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile", action="store_true", help="only the torch.compile'd step vs the hand-fused one")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("scripts/gpu_checks.py needs a CUDA GPU")
    if args.compile:
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "compile": compile_gain()}
        save(result, args.json)
        print(json.dumps(result["compile"], indent=1))
        c = result["compile"]
        raise SystemExit(0 if c["compiled_vs_fused_rel"] < 5e-2 and c["stats"]["compiled"]["fallbacks"] == 0 else 1)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "kernel": kernel_checks(), "graphs": graph_checks(), "steps": step_checks()}
    save(result, args.json)
    result["fusion"] = fusion_gain()
    for case, r in result["kernel"].items():
        print(f"add_norm_modulate {case:>17}: h rel fused {r['fused_h_vs_fp64_rel']:.2e} reference "
              f"{r['reference_h_vs_fp64_rel']:.2e}  fused {r['ms_fused']:.3f} ms ({r['fused_GBps']:.0f} GB/s) vs "
              f"reference {r['ms_reference']:.3f} ms")
    for part in ("graphs", "steps"):
        for k, v in result[part].items():
            print(f"{part} {k}: {v}")
    for rows, r in result["fusion"]["forward_ms"].items():
        print(f"fusion {result['fusion']['model']} rows={rows}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
    print(f"profile, one eager forward at {result['fusion']['profile_rows']} rows, "
          f"{result['fusion']['profile_kernel_ms_total']:.2f} ms of kernels:")
    for r in result["fusion"]["profile_top"]:
        print(f"  {r['ms']:8.3f} ms {r['share']:6.1%} x{r['calls']:<4d} {r['kernel']}")
    ok = (all(r["used_triton"] and r["all_finite"]
              and r["fused_h_vs_fp64_rel"] <= 2 * r["reference_h_vs_fp64_rel"] + 1e-6
              and r["fused_x_vs_fp64_rel"] <= 2 * r["reference_x_vs_fp64_rel"] + 1e-6
              for r in result["kernel"].values())
          and result["graphs"]["recaptures_after_install"] == 0
          and result["graphs"]["bf16_graph_vs_fp32_eager_rel"] < 3e-2
          and result["graphs"]["after_install_graph_vs_fp32_eager_rel"] < 3e-2
          and result["steps"]["graph_steps_with_host_sync"] == 0
          and result["steps"]["stats"]["fallbacks"] == 0
          and result["steps"]["bf16_graph_vs_fp32_eager_latents_rel"] < 5e-2)
    result["ok"] = ok
    save(result, args.json)
    print("GPU CHECKS", "PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
