"""A diffusers DiT fine-tuned in diffusers (its per-block embedder copies differ): trained on and served as it is."""
from __future__ import annotations

import numpy as np
import torch
from conftest import asgi_client, wait_ready
from layouts import tiny_transformer, tiny_vae, write_pipeline
from PIL import Image

from app.model import load_base
from app.trainer.__main__ import main


def test_patch_trained_on_a_fine_tuned_pipeline_is_served(tmp_path, monkeypatch):
    monkeypatch.setenv("DMP_DATA_CACHE", str(tmp_path / "cache"))
    dm = tiny_transformer()
    with torch.no_grad():  # what a fine-tune in diffusers does: block 1's copy drifts from block 0's
        for p in dm.transformer_blocks[1].norm1.emb.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    models, data, patches = tmp_path / "models", tmp_path / "data", tmp_path / "patches"
    write_pipeline(models / "pipe", dm, tiny_vae())  # labels: tench / goldfish / crane
    assert load_base(models / "pipe").config.block_embedders
    rng = np.random.default_rng(0)
    for name in ("goldfish", "crane"):
        (data / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / name / f"{i}.png")
    patches.mkdir()
    assert main(["patch", "--base", str(models / "pipe"), "--dataset", f"folder:{data}", "--steps", "3",
                 "--batch-size", "4", "--device", "cpu", "--eval-every", "3", "--quiet",
                 "--out", str(patches / "pipe-dmp.safetensors")]) == 0
    with asgi_client({"models": models, "patches": patches}) as client:
        wait_ready(client)
        listed = {p["name"]: p for p in client.get("/patches").json()["patches"]}
        assert listed["pipe-dmp"]["state"] == "ready"
        r = client.post("/generate", json={"patch": "pipe-dmp", "class_label": "goldfish", "steps": 2, "seed": 1})
        assert r.status_code == 200, r.text
