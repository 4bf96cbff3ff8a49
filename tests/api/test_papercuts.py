"""Papercuts a new user hit: the CLI loads one base and needs no seed, /models tells the guidance an unconditional
base gets, streamed partial images say which of the n images they are."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

from conftest import REPO, copy_dirs


def test_cli_loads_only_the_base_it_needs_and_draws_a_seed(tiny_dirs, tmp_path):
    dirs = copy_dirs(tiny_dirs, tmp_path)
    (dirs["models"] / "broken.safetensors").write_bytes(b"not a checkpoint")  # loading it would log a warning
    env = os.environ | {"DMP_MODEL_DIR": str(dirs["models"]), "DMP_PATCH_DIR": str(dirs["patches"]),
                        "PYTHONPATH": str(REPO)}
    out = tmp_path / "digit.png"
    proc = subprocess.run([sys.executable, "-m", "app", "generate", "--patch", "digits-dmp", "--class-label", "3",
                           "--num-images", "2", "--steps", "2", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "broken" not in proc.stderr  # the other entries were not loaded
    assert (tmp_path / "digit-0.png").read_bytes() != (tmp_path / "digit-1.png").read_bytes()
    assert "model=digits" in proc.stdout and "seed=" in proc.stdout


def test_models_say_an_unconditional_base_is_not_guided(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert models["blobs"]["default_guidance"] == 1.0


def test_streamed_images_carry_their_index(client):
    body = {"model": "digits", "prompt": "3", "n": 2, "stream": True, "partial_images": 1, "steps": 4, "seed": 5}
    with client.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    partial = [e for e in events if e["type"] == "image_generation.partial_image"]
    done = [e for e in events if e["type"] == "image_generation.completed"]
    assert [e["image_index"] for e in partial] == [0, 1] and [e["partial_image_index"] for e in partial] == [0, 0]
    assert [e["image_index"] for e in done] == [0, 1]
    assert base64.b64decode(done[0]["b64_json"]) != base64.b64decode(done[1]["b64_json"])
