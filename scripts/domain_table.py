"""Scores the runs of patches/domain_table.sh: how far each moves the mnist base toward a shifted domain (ink share
of its samples against the real held-out images of the domain) and its held-out loss on the domain and on MNIST
(what it costs on the original domain), each paired with the base at the same sampling seed, noise and timesteps.

    python scripts/domain_table.py OUT_DIR [--json F] [--markdown F]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from app.model import load_base, load_patch
from app.trainer.data import load_dataset
from app.trainer.diffusion import Diffusion
from app.trainer.domains import ink_share
from app.trainer.evaluate import EVAL_SAMPLING, sample_images
from app.trainer.heldout import decile_losses

BASE = "models/mnist.safetensors"
STYLES = ("thick", "inverted")
ROWS = (("dmp", "+DMP (default recipe)"), ("pt", "+PT (--baseline pt)"), ("ft", "+FT (--baseline ft)"))
SEEDS = (0, 1, 2)


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.fmean(values), se


def score_style(out: Path, style: str, base, diffusion: Diffusion, mnist_test, samples: int, steps: int) -> dict:
    """Every finished run of one style, each seed paired with the base at that sampling seed."""
    labels = json.loads(base.meta.get("labels") or "[]") or [str(i) for i in range(10)]
    test = load_dataset(f"folder:{out / 'data' / style}", "test", base.config.input_size, channels=1,
                        labels=list(labels), progress=False)
    test = test.subset(np.arange(min(samples, len(test))))
    base_target = decile_losses(base, diffusion, test, reps=1)  # (10 deciles, images): fixed t and noise
    base_mnist = decile_losses(base, diffusion, mnist_test, reps=1)
    base_cache = out / f"base-{style}.score{len(test)}-{steps}.json"
    if base_cache.exists():
        base_ink = {int(s): v for s, v in json.loads(base_cache.read_text()).items()}
    else:
        base_ink = {s: ink_share(sample_images(base, test.labels, seed=s, steps=steps)) for s in SEEDS}
        base_cache.write_text(json.dumps(base_ink))
    result = {"real_ink": ink_share(test.x), "mnist_real_ink": ink_share(mnist_test.x), "base_ink": base_ink,
              "test_images": len(test), "runs": {}}
    files = [(row, s, out / f"{style}-{row}-s{s}.safetensors") for row, _ in ROWS for s in SEEDS]
    if style == "thick":
        files.append(("shipped", 0, out / "mnist-thick-dmp.safetensors"))
    for row, seed, path in files:
        if not path.exists():
            continue
        cache = path.with_suffix(f".score{len(test)}-{steps}.json")  # a run is scored once, as soon as it is done
        if cache.exists() and cache.stat().st_mtime > path.stat().st_mtime:
            run = json.loads(cache.read_text())
        else:
            model, patch = (load_base(path), None) if row == "ft" else (base, load_patch(path, base=base))
            ink = ink_share(sample_images(model, test.labels, patch=patch, seed=seed, steps=steps))
            target = decile_losses(model, diffusion, test, patch=patch, reps=1)
            mnist = decile_losses(model, diffusion, mnist_test, patch=patch, reps=1)
            run = {"seed": seed, "file": path.name, "ink": ink,
                   "gap_closed_pct": 100 * (ink - base_ink[seed]) / (result["real_ink"] - base_ink[seed]),
                   "target_loss_pct": 100 * (target.mean() / base_target.mean() - 1).item(),
                   "mnist_loss_pct": 100 * (mnist.mean() / base_mnist.mean() - 1).item()}
            cache.write_text(json.dumps(run))
        result["runs"].setdefault(row, []).append(run)
        print(style, row, seed, json.dumps(run), flush=True)
    return result


def markdown(results: dict) -> str:
    lines = []
    for style, r in results.items():
        base_ink = mean_se(list(r["base_ink"].values()))
        lines += [(f"**{style}** (real held-out {style} images: ink share {r['real_ink']:.3f}; real MNIST "
                   f"{r['mnist_real_ink']:.3f}; {r['test_images']} test images)"), "",
                  ("| row | seeds | ink share of samples | gap to the domain closed | held-out loss on "
                   f"{style} vs base | held-out loss on MNIST vs base |"), "|---|---|---|---|---|---|",
                  f"| base | {len(r['base_ink'])} sampling | {base_ink[0]:.3f} ± {base_ink[1]:.3f} | 0 % | 0 % | 0 % |"]
        for row, name in ROWS + (("shipped", "+DMP shipped `mnist-thick-dmp` (1,000 steps)"),):
            runs = r["runs"].get(row)
            if not runs:
                continue
            cells = []
            for key, fmt in (("ink", "{:.3f} ± {:.3f}"), ("gap_closed_pct", "{:+.0f} % ± {:.0f}"),
                             ("target_loss_pct", "{:+.1f} % ± {:.1f}"), ("mnist_loss_pct", "{:+.1f} % ± {:.1f}")):
                m, se = mean_se([x[key] for x in runs])
                cells.append(fmt.format(m, se).replace("± nan", "(1 run)"))
            lines.append(f"| {name} | {', '.join(str(x['seed']) for x in runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--samples", type=int, default=100, help="test images (and samples) per domain (500 = all)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per sample")
    args = p.parse_args()
    torch.manual_seed(0)
    base = load_base(BASE).eval()
    diffusion = Diffusion(base.meta.get("beta_schedule", "linear"), "cpu")
    mnist_test = load_dataset("mnist", "test", base.config.input_size)
    mnist_test = mnist_test.subset(np.arange(min(args.samples, len(mnist_test))))
    results = {style: score_style(args.out, style, base, diffusion, mnist_test, args.samples, args.sample_steps)
               for style in STYLES}
    results_meta = {"sampling": EVAL_SAMPLING | {"steps": args.sample_steps}, "base": BASE, "samples": args.samples}
    if args.json:
        args.json.write_text(json.dumps({"meta": results_meta, "results": results}, indent=1))
    text = markdown(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
