"""Each independent extractor's scale on mnist, so a change in FD can be read against it: FD to the 500 held-out
images of real train images (the floor: what a perfect generator would score with that many samples) and of the same
train images blurred (a 3x3 box filter, a small loss of detail); n per set as the study's primary endpoint.
Usage: python scripts/extractor_scale.py OUT.json [N]"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from app.model import load_base
from app.trainer.data import load_dataset
from app.trainer.evaluate import heldout_split
from app.trainer.quality import Quality

BASE = "models/mnist.safetensors"
out, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2000
base = load_base(BASE)
q = Quality(heldout_split(BASE, base, "mnist").x)
train = load_dataset("mnist", "train", base.config.input_size).x
real = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]].float()  # (n, 1, 16, 16)
sets = {"train (floor)": real,
        "train, 3x3 blur": F.avg_pool2d(F.pad(real, (1, 1, 1, 1), mode="replicate"), 3, stride=1)}
result = {"n": n, "num_heldout": len(q.heldout), "sets": {}}
for name, x in sets.items():
    result["sets"][name] = q.score(x)["extractors"]
    print(name, {e: round(s["fd"], 4) for e, s in result["sets"][name].items()}, flush=True)
out.write_text(json.dumps(result, indent=1))
