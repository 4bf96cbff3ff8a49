"""Write a stand-in for the demo base (the trainer's default architecture, random weights) and two patches.

    python -m bench.make_standin /tmp/load    # -> /tmp/load/models/standin.safetensors, /tmp/load/patches/p{0,1}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from app.model import DiT, DiTConfig, save_base
from app.model.dmp import new_patch_for, patch_metadata_for, patch_to_bytes


def random_patch_bytes(base: DiT, seed: int) -> bytes:
    """A non-zero DMP patch for `base`, as file bytes."""
    torch.manual_seed(seed)
    patch = new_patch_for(base)
    with torch.no_grad():
        for p in patch.parameters():
            p.normal_(0, 0.5)
    return patch_to_bytes(patch, **patch_metadata_for(base, "standin"))


def main(root: Path) -> None:
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "patches").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # app/trainer/train.py defaults: hidden 128, depth 8, 4 heads, patch 4, learn_sigma; MNIST-sized 28x28x1
    model = DiT(DiTConfig(input_size=28, patch_size=4, in_channels=1, hidden_size=128, depth=8, num_heads=4,
                          num_classes=10, learn_sigma=True)).eval()
    save_base(model, root / "models/standin.safetensors", name="standin", task="class", vae="pixel",
              default_sampler="ddim", default_steps="20", default_guidance="1.0", beta_schedule="linear",
              clip_sample="true", labels=json.dumps([str(i) for i in range(10)]))
    for i in range(2):
        (root / "patches" / f"p{i}.safetensors").write_bytes(random_patch_bytes(model, seed=i))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
