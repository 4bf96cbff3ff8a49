"""One attention call on CPU: this project's kernel (app/model/cpu_attention.py) vs torch's SDPA kernels.

    python -m bench.attention [--shapes 16x64x4x16,32x64x4x16] [--dtypes bf16,fp32] [--threads 1] [--calls 200]
                              [--out bench/results/x.json]

Each shape is rows x tokens x heads x head dim, from the (B, N, 3, H, Dh) output of a fused qkv projection to
(B, N, H * Dh) as the next projection takes it, so the SDPA forms pay the permutes a DiT block pays. Contenders,
alternating in rounds of `--calls` calls each (the minimum and median per call over all calls): `kernel`, SDPA
with the flash kernel, SDPA with the math kernel (bmm, softmax, bmm). Printed per shape: microseconds and
kernel / flash; the error of each against fp64 attention of the same inputs; and how long loading the kernel took
(its build, on a machine whose torch extension cache lacks it). The last line is JSON.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.model import cpu_attention
from bench.common import emit

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sdpa(backend: SDPBackend):
    def run(qkv: torch.Tensor) -> torch.Tensor:
        B, N, _, H, Dh = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * Dh)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="2x64x4x16,16x64x4x16,32x64x4x16,8x128x4x16,4x256x4x16,8x64x4x32")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not cpu_attention.load():
        raise SystemExit(f"kernel not available: {cpu_attention.status()}")
    load_s = time.perf_counter() - t0  # the build, the first time on a machine; loading from torch's cache after
    print(f"kernel loaded in {load_s:.1f} s", flush=True)
    contenders = {"kernel": cpu_attention.qkv_attention, "flash": sdpa(SDPBackend.FLASH_ATTENTION),
                  "math": sdpa(SDPBackend.MATH)}
    rows = []
    for dtype_name in args.dtypes.split(","):
        for shape in args.shapes.split(","):
            B, N, H, Dh = (int(v) for v in shape.split("x"))
            qkv = (torch.randn(B, N, 3, H, Dh, generator=torch.Generator().manual_seed(0)) * 2).to(DTYPES[dtype_name])
            q, k, v = qkv.double().permute(2, 0, 3, 1, 4).unbind(0)
            exact = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * Dh)
            times: dict[str, list[float]] = {name: [] for name in contenders}
            errors = {name: (f(qkv).double() - exact).abs().max().item() for name, f in contenders.items()}
            for _ in range(args.rounds):
                for name, f in contenders.items():
                    for _ in range(args.calls // args.rounds):
                        t0 = time.perf_counter()
                        f(qkv)
                        times[name].append(time.perf_counter() - t0)
            row = {"dtype": dtype_name, "shape": shape, "threads": args.threads,
                   **{f"{n}_us_min": round(min(t) * 1e6, 1) for n, t in times.items()},
                   **{f"{n}_us_median": round(statistics.median(t) * 1e6, 1) for n, t in times.items()},
                   **{f"{n}_max_abs_err": e for n, e in errors.items()}}
            row["kernel_over_flash_min"] = round(row["kernel_us_min"] / row["flash_us_min"], 3)
            row["kernel_over_flash_median"] = round(row["kernel_us_median"] / row["flash_us_median"], 3)
            rows.append(row)
            print(f"{dtype_name} {shape}: " + ", ".join(
                f"{n} {row[f'{n}_us_min']:.0f} us min / {row[f'{n}_us_median']:.0f} median (err {errors[n]:.1e})"
                for n in contenders) + f"; kernel / flash {row['kernel_over_flash_min']:.2f} (min) "
                f"{row['kernel_over_flash_median']:.2f} (median)", flush=True)
    emit({"bench": "attention", "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_s": round(load_s, 2),
          "rows": rows}, args.out)


if __name__ == "__main__":
    main()
