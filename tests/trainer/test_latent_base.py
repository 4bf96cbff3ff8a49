"""The trainer takes the bases the server takes: a latent DiTPipeline folder, ImageFolder classes matched to its
labels by name, images encoded once with its own VAE and cached; the patch it writes is then served by that base."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import asgi_client, wait_ready
from layouts import tiny_transformer, tiny_vae, write_pipeline
from PIL import Image

from app.model.describe import describe
from app.trainer.__main__ import main
from app.trainer.data import DataError, image_folder


def write_images(folder, n, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("DMP_DATA_CACHE", str(tmp_path / "cache"))
    models, data = tmp_path / "models", tmp_path / "data"
    write_pipeline(models / "pipe", tiny_transformer(), tiny_vae())  # labels: tench / goldfish / crane
    for i, name in enumerate(["goldfish", "Tinca_tinca", "CRANE"]):
        write_images(data / name, 4, seed=i)
    (tmp_path / "patches").mkdir()
    return tmp_path, models, data


def test_class_folders_match_base_labels_and_latents_are_cached(setup):
    tmp_path, models, data = setup
    desc = describe(models / "pipe")
    ds = image_folder(str(data), 16, vae=desc.vae, labels=desc.labels)
    assert ds.task == "class" and ds.num_classes == 3 and tuple(ds.x.shape) == (12, 4, 8, 8)  # 16 px -> 8x8 latents
    assert ds.labels.tolist() == [2] * 4 + [0] * 4 + [1] * 4  # folders sorted: CRANE, Tinca_tinca, goldfish
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    write_images(data / "goldfsh", 1, seed=9)
    with pytest.raises(DataError, match="'goldfsh' \\(close: goldfish\\)"):
        image_folder(str(data), 16, vae=desc.vae, labels=desc.labels)


def test_three_steps_on_a_pipeline_base_then_served(setup):
    tmp_path, models, data = setup
    out = tmp_path / "patches" / "pipe-dmp.safetensors"
    assert main(["patch", "--base", str(models / "pipe"), "--dataset", f"folder:{data}", "--steps", "3",
                 "--batch-size", "4", "--device", "cpu", "--eval-every", "3", "--out", str(out), "--quiet"]) == 0
    with asgi_client({"models": models, "patches": tmp_path / "patches"}) as client:
        wait_ready(client)
        patches = {p["name"]: p for p in client.get("/patches").json()["patches"]}
        assert patches["pipe-dmp"]["base"] == "pipe" and patches["pipe-dmp"]["state"] == "ready"
        r = client.post("/generate", json={"patch": "pipe-dmp", "class_label": "goldfish", "steps": 2, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["patch"]["name"] == "pipe-dmp"


def test_single_folder_is_unconditional_and_a_class_base_says_so(setup, capsys):
    tmp_path, models, _ = setup
    write_images(tmp_path / "faces", 5, seed=3)  # FFHQ-style: images straight in the folder
    assert image_folder(str(tmp_path / "faces"), 16).task == "uncond"
    code = main(["patch", "--base", str(models / "pipe"), "--dataset", f"folder:{tmp_path / 'faces'}", "--steps",
                 "1", "--device", "cpu", "--out", str(tmp_path / "x.safetensors"), "--quiet"])
    assert code == 2 and "class" in capsys.readouterr().err


def test_captions_file_makes_a_text_data_set(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("DMP_DATA_CACHE", str(tmp_path / "cache"))
    write_images(tmp_path / "coco" / "a", 2, seed=1)
    write_images(tmp_path / "coco" / "b", 1, seed=2)
    caps = {"a/0.png": "a red bus", "a/1.png": "two cats on a sofa", "b/0.png": "a bowl of soup"}
    (tmp_path / "coco" / "captions.json").write_text(json.dumps(caps))
    ds = image_folder(str(tmp_path / "coco"), 8, text_encoder="minilm")
    assert ds.task == "text" and ds.captions == list(caps.values()) and tuple(ds.text.shape) == (3, 384)
    del caps["b/0.png"]
    (tmp_path / "coco" / "captions.json").write_text(json.dumps(caps))
    with pytest.raises(DataError, match="no caption for 1 image"):
        image_folder(str(tmp_path / "coco"), 8, text_encoder="minilm")
