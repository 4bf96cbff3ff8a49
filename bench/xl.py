"""DiT-XL/2 at 256 px on CPU: our forward vs diffusers' DiTTransformer2DModel on the same weights, and one image.

    python -m bench.xl --quick              # CPU: one CFG forward (2 rows) fp32 and bf16, 2 timed steps + decode
    python -m bench.xl --threads 2 --e2e-steps 50   # the 50-step image timed in full
    python -m bench.xl --quick --no-image   # the forward ratios alone (a few minutes: repeat it for the spread)

Random weights (the cost does not depend on their values). Forward: ours (`DiT.forward`, eager, built with diffusers'
timestep frequencies so both compute the same function, its large linears prepacked for oneDNN where a timing at load
finds it pays, as the engine serves an eager fp32 CPU base: app/model/cpu_linear.py; in bf16 the compiled CPU step's
weight freezing packs them all, unmeasured; on a CPU without oneDNN's bf16 kernels, AVX2 only, ours runs bf16 with
plain linears, as does that graph) vs diffusers, in one process, rounds alternating the two, min over rounds; fp32
then bf16 (both models cast; `--dtypes fp32` for one). `--unpacked`: ours without the prepacking (plain nn.Linear, the
comparison before session 25). The max-abs difference of the fp32 outputs is printed as a check that both compute the
same thing. Image: a 50-step DDIM + CFG image at batch 1 through our `denoise_step` and the SD VAE decode (diffusers
AutoencoderKL from its config, random weights; fp32 in both dtypes, as the service keeps it), in a fresh subprocess
per dtype so its peak RSS is that of serving one image; with --e2e-steps below 50 the sampling time is extrapolated
(labelled `extrapolated`).
The last line is JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import torch

from bench.common import emit

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
UNPACKED_NOTE = " (ours unpacked: this CPU's oneDNN has no bf16 kernels)"


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over fork + exec, so a
    subprocess would report its parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def xl_model():
    """XL/2 with random weights, under diffusers' timestep frequencies and MLP LayerNorm eps (the same function as
    bench/diffusers_ref.py's conversion of it; the same cost as the original DiT's)."""
    from app.model.dit import DiT_models
    from bench.engine import randomize_

    return randomize_(DiT_models["DiT-XL/2"](input_size=32, num_classes=1000, freq_shift=1, norm2_eps=1e-5))


@torch.no_grad()
def forward_compare(repeats: int, log, packed: bool = True, dtypes: tuple[str, ...] = tuple(DTYPES)) -> dict:
    """ms per CFG forward (2 rows) of ours and diffusers, fp32 and bf16, same weights, alternating rounds."""
    from bench.diffusers_ref import to_diffusers
    from bench.engine import time_alternating

    plain = xl_model()
    ref = to_diffusers(plain)
    ours, ours_packed = served(plain, torch.float32, packed)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([500, 500])
    y = torch.tensor([207, 1000])  # a class and the null class: CFG's two rows
    out: dict = {"max_abs_fp32": (ours(x, t.float(), y) - ref(x, timestep=t, class_labels=y).sample).abs().max().item()}
    log(f"fp32 outputs: max |ours - diffusers| = {out['max_abs_fp32']:.2e}")
    for name in dtypes:
        dtype = DTYPES[name]
        if dtype != torch.float32:
            ours = None  # one served copy at a time
            (ours, ours_packed), ref = served(plain, dtype, packed), ref.to(dtype)
        xd = x.to(dtype)
        secs = time_alternating({"ours": lambda ours=ours, xd=xd: ours(xd, t.float(), y),
                                 "diffusers": lambda ref=ref, xd=xd: ref(xd, timestep=t, class_labels=y).sample},
                                torch.device("cpu"), repeats)
        out[name] = {"ours_ms": secs["ours"] * 1e3, "diffusers_ms": secs["diffusers"] * 1e3,
                     "ours_speedup": secs["diffusers"] / secs["ours"], "ours_packed": ours_packed}
        log(f"{name} CFG forward (2 rows): ours {secs['ours']:.2f} s  diffusers {secs['diffusers']:.2f} s  "
            f"ours {out[name]['ours_speedup']:.3f}x{'' if ours_packed or not packed else UNPACKED_NOTE}")
    out["peak_rss_mib_process"] = peak_rss_mib()  # the plain fp32 model, diffusers' and ours as served
    return out


def served(model, dtype: torch.dtype, packed: bool):
    """A copy of `model` in `dtype`, its large linears prepacked as the engine serves it on CPU (or not), and
    whether they were."""
    ours = copy.deepcopy(model).to(dtype)
    return ours, pack(ours, packed)


def pack(model, packed: bool) -> bool:
    """Prepack `model`'s large linears in place where asked, this CPU can (bf16 needs oneDNN's bf16 kernels) and a
    timing of each shape finds it pays (app/model/cpu_linear.py); whether any was."""
    from app.model.cpu_linear import can_pack, pack_linears

    if packed and can_pack(model):
        return pack_linears(model, measure=True) > 0  # the shapes where packing paid here, as the engine loads it
    return False


@torch.no_grad()
def image(dtype: str, steps: int, timed_steps: int, guidance: float = 4.0, packed: bool = True) -> dict:
    """One DDIM + CFG image at batch 1 through denoise_step, then the SD VAE decode to uint8 (this process only)."""
    from app.model.sampling import denoise_step, eager_step, new_job
    from app.model.vae import SDVAE, to_uint8

    model = xl_model().to(DTYPES[dtype])
    packed = pack(model, packed)  # in place, as the engine loads a base: a copy would double this process's peak
    # fp32 as the service runs it (app/engine/bases.py): a bf16 conv decode took > 20 min on a CPU without bf16
    vae = SDVAE.random_sd()
    step = eager_step(model, None, dtype=DTYPES[dtype])
    job = new_job(model, y=207, seed=0, sampler="ddim", steps=steps, guidance_scale=guidance)
    denoise_step(model, [job], step=step)  # first call: allocator and oneDNN warm-up, not timed
    t0 = time.perf_counter()
    n = 0
    while not job.done and n < timed_steps:
        denoise_step(model, [job], step=step)
        n += 1
    per_step = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    pixels = to_uint8(vae.decode(job.latents))
    decode = time.perf_counter() - t0
    assert pixels.shape == (1, 256, 256, 3)
    return {"dtype": dtype, "packed": packed, "steps": steps, "timed_steps": n, "extrapolated": n < steps,
            "seconds_per_step": per_step, "vae_decode_s": decode, "image_s": per_step * steps + decode,
            "peak_rss_mib": peak_rss_mib()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 forward rounds, 2 timed steps per image (minutes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="forward rounds per dtype")
    ap.add_argument("--e2e-steps", type=int, default=None, help="sampling steps timed (the rest extrapolated)")
    ap.add_argument("--no-image", action="store_true", help="the forward comparison only (the ratio, three runs)")
    ap.add_argument("--unpacked", action="store_true", help="ours with plain nn.Linear layers (no prepacking)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="the forwards compared")
    ap.add_argument("--image-only", choices=list(DTYPES), help=argparse.SUPPRESS)  # the subprocess's part
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    timed = args.e2e_steps or (2 if args.quick else 50)
    if args.image_only:
        print(json.dumps(image(args.image_only, 50, timed, packed=not args.unpacked)))
        return

    def log(msg):
        print(msg, flush=True)

    result = {"threads": args.threads, "model": "DiT-XL/2, 256 px (32x32x4 latents), random weights",
              "ours_linears": "plain" if args.unpacked else "prepacked where measured to pay",
              "forward": forward_compare(args.repeats or (2 if args.quick else 3), log, packed=not args.unpacked,
                                         dtypes=tuple(args.dtypes)),
              "image": {}}
    for dtype in () if args.no_image else args.dtypes:
        proc = subprocess.run([sys.executable, "-m", "bench.xl", "--image-only", dtype, "--threads", str(args.threads),
                               "--e2e-steps", str(timed), *(["--unpacked"] if args.unpacked else [])],
                              capture_output=True, text=True, check=True)
        res = result["image"][dtype] = json.loads(proc.stdout.strip().splitlines()[-1])
        extrapolated = f" (extrapolated from {res['timed_steps']} steps)" if res["extrapolated"] else ""
        log(f"{dtype} 50-step DDIM+CFG image with VAE decode: {res['image_s']:.1f} s{extrapolated}, "
            f"{res['seconds_per_step']:.2f} s/step, decode {res['vae_decode_s']:.2f} s, "
            f"peak RSS {res['peak_rss_mib']:.0f} MiB")
    emit(result, args.out)


if __name__ == "__main__":
    main()
