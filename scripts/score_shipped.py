"""Issue 30 item 4: the shipped mnist-dmp against its base, and its gate's share (the same prompts with the gate
zeroed, i.e. uniform 1/64), by every extractor against the 500 held-out mnist images; paired 95 % bootstrap
intervals. Reads the samples cached by app/trainer/samples.py (sample them first with arm_images)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from app.model import load_base
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
for g in (1.0, 1.5, 2.0, 2.5):
    m = n if g == 1.5 else 500
    imgs = {}
    for arm, path, gate in (("base", None, "learned"), ("dmp", PATCH, "learned"), ("dmp, gate zeroed", PATCH, "uniform")):
        for size in (m, 1000):  # chunks of 500 are seeded by their start: the first 500 of 1,000 are the 500-sample set
            try:
                x, y = arm_images(BASE, path, n=size, seed=0, guidance=g, cache=cache, gate=gate, cached_only=True)
                imgs[arm] = (x[:m], y[:m])
                break
            except FileNotFoundError:
                continue
    if len(imgs) < 3:  # not all sampled (yet): report what exists
        print(f"guidance {g}: only {sorted(imgs)} sampled")
        continue
    result["frontier"][f"{g:g}"] = {arm: q.score(x, y) for arm, (x, y) in imgs.items()}
    if g == 1.5:
        (xb, y), (xd, _), (xu, _) = imgs["base"], imgs["dmp"], imgs["dmp, gate zeroed"]
        result["pairs"] = {"dmp - base": q.paired(xb, xd, y, resamples=500)["delta"],
                           "gate zeroed - base": q.paired(xb, xu, y, resamples=500)["delta"],
                           "dmp - gate zeroed": q.paired(xu, xd, y, resamples=500)["delta"]}
    print(f"guidance {g} scored", flush=True)
out.write_text(json.dumps(result, indent=1))
