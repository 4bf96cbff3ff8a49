"""Every base layout a user brings, served through the real app: pipeline folders, original .pt + sidecar, diffusers
transformer folder + sidecar, our safetensors; a latent base without VAE and broken files are reported, not served."""
from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
import torch
from conftest import asgi_client, wait_ready
from layouts import ID2LABEL, tiny_transformer, tiny_vae, write_pipeline
from PIL import Image

from app.model import fingerprint, load_base, save_base
from app.model.describe import DescriptionError, describe, label_index


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """One tiny latent DiT (weights shared) in each layout, one shared VAE folder, and three broken entries."""
    root = tmp_path_factory.mktemp("layouts") / "models"
    root.mkdir()
    dm, vae = tiny_transformer(), tiny_vae()
    write_pipeline(root / "pipe", dm, vae)
    vae.save_pretrained(root / "shared-vae")  # an AutoencoderKL folder: not a base itself
    dm.save_pretrained(root / "dtrans")  # diffusers transformer folder + sidecar
    (root / "dtrans.json").write_text(json.dumps({"vae": "shared-vae", "labels": "pipe/model_index.json"}))
    original = load_base(root / "dtrans")
    torch.save({"ema": original.state_dict()}, root / "orig.pt")  # original-layout state dict + sidecar
    (root / "orig.json").write_text(json.dumps({"vae": "shared-vae", "num_heads": 4, "default_steps": 3}))
    save_base(original, root / "ours.safetensors", name="ours", vae=str(root / "shared-vae"),
              labels=["a", "b", "c"], default_steps="2")
    torch.save(original.state_dict(), root / "novae.pt")  # latent, its sidecar names no VAE: must be refused
    (root / "novae.json").write_text(json.dumps({"num_heads": 4}))
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    blob = (root / "orig.pt").read_bytes()
    (root / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (root / "truncated.json").write_text(json.dumps({"vae": "shared-vae", "num_heads": 4}))
    (root / "mislabelled.pt").write_bytes(blob)
    (root / "mislabelled.json").write_text(json.dumps({"vae": "shared-vae", "num_heads": 4, "labels": ["x"]}))
    (root / "patches").mkdir()
    return root


@pytest.fixture(scope="module")
def client(model_dir):
    with asgi_client({"models": model_dir, "patches": model_dir / "patches"}) as c:
        wait_ready(c)
        yield c


def test_pipeline_description_comes_from_the_folder(model_dir):
    desc = describe(model_dir / "pipe")
    assert desc.layout == "pipeline" and desc.vae == str(model_dir / "pipe" / "vae")
    assert desc.labels == [ID2LABEL[str(i)] for i in range(3)]
    assert (desc.default_sampler, desc.default_steps, desc.default_guidance, desc.beta_schedule) == \
        ("ddim", 50, 4.0, "linear")
    ids = label_index(desc.labels)
    assert ids["tinca tinca"] == 0 and ids["goldfish"] == 1 and ids["crane"] == 2


def test_models_route_is_truthful_for_each_layout(client, model_dir):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"pipe", "dtrans", "orig", "ours"}
    for name, m in models.items():
        assert m["vae"] == "sd" and m["image_size"] == 16 and m["in_channels"] == 4, name  # 8x8 latents, 2x VAE
    assert {m["layout"] for m in models.values()} == {"pipeline", "diffusers", "pt", "safetensors"}
    assert models["pipe"]["labels"] == models["dtrans"]["labels"] == [ID2LABEL[str(i)] for i in range(3)]
    assert models["ours"]["labels"] == ["a", "b", "c"] and models["orig"]["default_steps"] == 3
    # diffusers folders keep diffusers' timestep frequencies; the .pt copy is the original DiT's math
    assert models["pipe"]["fingerprint"] == models["dtrans"]["fingerprint"] != models["orig"]["fingerprint"]


def test_broken_entries_are_reported_not_served(client):
    detail = client.get("/health/ready").json()["detail"]
    assert "novae.pt" in detail and "names no VAE" in detail and "novae.json" in detail
    for name in ("corrupt.safetensors", "truncated.pt", "mislabelled.pt"):
        assert name in detail
    assert "1 labels for a model of 3 classes" in detail
    assert "shared-vae" not in detail.split("not served:")[1].split(":")[0]  # the VAE folder is not a base


def test_bases_naming_one_vae_folder_share_it(client):
    bases = client.app.state.engine.bases
    assert bases["dtrans"].vae is bases["orig"].vae is bases["ours"].vae
    assert bases["pipe"].vae is not bases["orig"].vae


@pytest.mark.parametrize("name", ["pipe", "dtrans", "orig", "ours"])
def test_each_layout_generates_rgb_pixels_through_its_vae(client, name):
    r = client.post("/generate", json={"model": name, "class_label": 1, "steps": 2, "seed": 3})
    assert r.status_code == 200, r.text
    img = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert img.mode == "RGB" and img.size == (16, 16)


def test_latent_pt_without_vae_is_refused_with_what_to_add(model_dir, tmp_path):
    from app.model.describe import resolve_vae

    with pytest.raises(DescriptionError, match=r'novae\.json.*"vae"'):
        resolve_vae(describe(model_dir / "novae.pt"), 4)
    shutil.copy(model_dir / "novae.pt", tmp_path / "pix.pt")
    assert resolve_vae(describe(tmp_path / "pix.pt"), 3) == "pixel"  # 3 channels, nothing said: pixels


def test_sidecar_with_an_unknown_key_is_refused(tmp_path, model_dir):
    shutil.copy(model_dir / "orig.pt", tmp_path / "x.pt")
    (tmp_path / "x.json").write_text(json.dumps({"vea": "typo"}))
    with pytest.raises(DescriptionError, match="unknown keys"):
        describe(tmp_path / "x.pt")


def test_pipeline_folder_loads_as_its_transformer(model_dir):
    assert fingerprint(load_base(model_dir / "pipe")) == fingerprint(load_base(model_dir / "pipe" / "transformer"))


@pytest.mark.parametrize("name", ["Tinca tinca", "  GOLDFISH ", "crane"])
def test_class_label_by_any_synonym_equals_the_id(client, name):
    ids = {"tinca tinca": 0, "goldfish": 1, "crane": 2}
    body = {"model": "pipe", "steps": 2, "seed": 9}
    by_name = client.post("/generate", json=body | {"class_label": name})
    by_id = client.post("/generate", json=body | {"class_label": ids[name.strip().lower()]})
    assert by_name.status_code == 200, by_name.text
    assert by_name.json()["images"] == by_id.json()["images"]


def test_unknown_class_name_is_400_with_close_matches(client):
    r = client.post("/generate", json={"model": "pipe", "class_label": "goldfsh", "steps": 1})
    assert r.status_code == 400 and r.json()["error_type"] == "unknown_class"
    assert "'goldfish'" in r.json()["error"]
    r = client.post("/generate", json={"model": "orig", "class_label": "tench", "steps": 1})  # orig has no names
    assert r.status_code == 400 and r.json()["error_type"] == "unknown_class"


def test_openai_prompt_names_the_class(client):
    body = {"model": "pipe", "prompt": "Goldfish", "size": "auto", "seed": 9, "steps": 2}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    by_id = client.post("/generate", json={"model": "pipe", "class_label": 1, "steps": 2, "seed": 9})
    assert r.json()["data"][0]["b64_json"] == by_id.json()["images"][0]
    r = client.post("/v1/images/generations", json=body | {"prompt": "goldfsh"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_class" and "goldfish" in r.text
