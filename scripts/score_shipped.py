"""Issue 30 item 4: the shipped mnist-dmp against its base, and its gate's share (the same prompts with the gate
zeroed, i.e. uniform 1/64), by every extractor against the 500 held-out mnist images; paired 95 % bootstrap
intervals; its gate weights over timesteps (range, and a heatmap PNG next to OUT) and its largest prompt as a share
of the loader's bound. Samples through app/trainer/samples.py, whose cache (CACHE) a rerun reads."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from app.model import load_base, load_patch
from app.model.dmp.bounds import PROMPT_FACTOR, activation_scale
from app.model.dmp.gatemap import gate_weights, heatmap_png
from app.trainer.classifier import load_classifier
from app.trainer.evaluate import heldout_split
from app.trainer.quality import Quality
from app.trainer.samples import arm_images

BASE, PATCH = "models/mnist.safetensors", "patches/mnist-dmp.safetensors"
cache, out = Path(sys.argv[1]), Path(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
test = heldout_split(BASE, load_base(BASE), "mnist")
clf, _ = load_classifier("runs/classifiers/mnist-16.safetensors")
q = Quality(test.x, clf)
result = {"n": n, "num_heldout": len(test), "pairs": {}, "frontier": {}}
base = load_base(BASE).eval()
patch = load_patch(PATCH, base=base)
timesteps = list(range(0, 1000, 10))  # the 1,000 training timesteps, every 10th
gates = gate_weights(base, patch, torch.arange(base.y_embedder.num_classes), timesteps)  # (L, T, N), mean over classes
heat = heatmap_png(gates, timesteps, title=f"{PATCH}: gate weight, mean over classes")
out.with_name(out.stem + "-gates.png").write_bytes(heat)
result["gates"] = {"min": gates.min().item(), "max": gates.max().item(), "uniform": 1 / gates.shape[2]}
result["prompt_max_share_of_bound"] = (patch.prompts.abs().max() / (PROMPT_FACTOR * activation_scale(base)[0])).item()
for g in (1.5, 2.5):
    m = n if g == 1.5 else 500
    imgs = {}
    arms = (("base", None, "learned"), ("dmp", PATCH, "learned"), ("dmp, gate zeroed", PATCH, "uniform"))
    for arm, path, gate in arms:
        for size in (1000, m):  # chunks of 500 are seeded by their start: the first 500 of 1,000 are the 500-sample set
            try:  # a cached 1,000 serves; else the m samples, sampled now if they are not cached
                x, y = arm_images(BASE, path, n=size, seed=0, guidance=g, cache=cache, gate=gate,
                                  cached_only=size != m, progress=True)
                imgs[arm] = (x[:m], y[:m])
                break
            except FileNotFoundError:
                continue
    result["frontier"][f"{g:g}"] = {arm: q.score(x, y) for arm, (x, y) in imgs.items()}
    if g == 1.5:
        (xb, y), (xd, _), (xu, _) = imgs["base"], imgs["dmp"], imgs["dmp, gate zeroed"]
        result["pairs"] = {"dmp - base": q.paired(xb, xd, y, resamples=100)["delta"],
                           "gate zeroed - base": q.paired(xb, xu, y, resamples=100)["delta"],
                           "dmp - gate zeroed": q.paired(xu, xd, y, resamples=100)["delta"]}
    print(f"guidance {g} scored", flush=True)
out.write_text(json.dumps(result, indent=1))

lines = []
if result["pairs"]:
    g = result["frontier"]["1.5"]
    lines += [f"DDIM 50, guidance 1.5, {n} paired samples per arm ({n // 10} per class, sampling seed 0), against the "
              f"{len(test)} held-out mnist images. Δ FD in % of the base's FD, [95 % paired bootstrap interval].", "",
              "| extractor | FD base | FD mnist-dmp | FD gate zeroed | Δ mnist-dmp − base | Δ gate zeroed − base | "
              "Δ mnist-dmp − gate zeroed | P / R base | P / R mnist-dmp | P / R gate zeroed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for e in g["base"]["extractors"]:
        def d(pair, e=e):
            x = result["pairs"][pair][e]
            return f"{x['d_fd_pct']:+.1f} % [{x['ci95_pct'][0]:+.1f}, {x['ci95_pct'][1]:+.1f}]"
        pr = [f"{g[a]['extractors'][e]['precision']:.3f} / {g[a]['extractors'][e]['recall']:.3f}"
              for a in ("base", "dmp", "dmp, gate zeroed")]
        fd = " | ".join(f"{g[a]['extractors'][e]['fd']:.4g}" for a in ("base", "dmp", "dmp, gate zeroed"))
        lines.append(f"| {e} | {fd} | {d('dmp - base')} | {d('gate zeroed - base')} | {d('dmp - gate zeroed')} | "
                     + " | ".join(pr) + " |")
    lines += ["", "Class accuracy (our classifier): " + ", ".join(f"{a} {g[a]['class_acc']:.3f}" for a in g) + "."]
names = " / ".join(result["frontier"]["1.5"]["base"]["extractors"])
lines += ["", f"Guidance frontier (class accuracy; FD {names}), 500 samples per point "
          f"({n} at 1.5):", "", "| guidance | base | mnist-dmp | gate zeroed |", "|---|---|---|---|"]
for gs, arms in result["frontier"].items():
    lines.append(f"| {gs} | " + " | ".join(
        f"{arms[a].get('class_acc', float('nan')):.3f}; " + " / ".join(f"{arms[a]['extractors'][e]['fd']:.3g}"
                                                                    for e in arms[a]['extractors'])
        for a in ("base", "dmp", "dmp, gate zeroed")) + " |")
out.with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
