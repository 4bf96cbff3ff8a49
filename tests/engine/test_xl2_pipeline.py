"""Real size: DiT-XL/2 (random weights) as a whole DiTPipeline folder with the real SD-VAE architecture, served by
`python -m app serve` on CPU; 2 steps give a 256x256 RGB PNG. Prints the time and the server's peak RSS."""
from __future__ import annotations

import gc
import io
import json
import time

import httpx
import pytest
from diffusers import DiTTransformer2DModel
from layouts import tie_embedders, write_pipeline
from PIL import Image

from app.model.vae import SDVAE


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), MiB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.slow
def test_xl2_pipeline_folder_serves_a_256px_image_on_cpu(tmp_path, start_server):
    models = tmp_path / "models"
    dm = tie_embedders(DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                             out_channels=8, num_layers=28, sample_size=32, patch_size=2,
                                             num_embeds_ada_norm=1000))
    id2label = {str(i): f"class {i}, synonym {i}" for i in range(1000)}
    write_pipeline(models / "DiT-XL-2-256", dm, SDVAE.random_sd().autoencoder, id2label)
    del dm
    gc.collect()
    (tmp_path / "patches").mkdir()
    started = time.perf_counter()
    server = start_server(wait=False, model_dir=models, patch_dir=tmp_path / "patches", device="cpu",
                          warmup="false", request_timeout=900)
    server.wait_ready(timeout=900)
    ready = time.perf_counter() - started
    info = httpx.get(server.url + "/models", timeout=30).json()["models"]
    assert [(m["name"], m["layout"], m["vae"], m["image_size"], m["depth"], m["hidden_size"]) for m in info] == \
        [("DiT-XL-2-256", "pipeline", "sd", 256, 28, 1152)]
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/generate", headers={"Accept": "image/png"}, timeout=900,
                   json={"class_label": "synonym 207", "steps": 2, "guidance_scale": 4.0, "seed": 0})
    took = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (256, 256)
    rss = peak_rss_mib(server.proc.pid)
    print(json.dumps({"load_to_ready_s": round(ready, 1), "generate_2_steps_cfg_s": round(took, 1),
                      "server_peak_rss_mib": round(rss), "timings": r.headers.get("Server-Timing")}))
