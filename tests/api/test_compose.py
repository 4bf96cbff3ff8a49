"""POST /generate with patch strength, compositions, per-image seeds and negative classes (issue 23)."""
from __future__ import annotations

import base64
import io
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import admin_client, make_patch_bytes
from PIL import Image

from app.model import save_base
from tests.conftest import BASE_META, batched_forwards, tiny_base

DIGITS = {"model": "digits", "class_label": 3, "steps": 3, "seed": 5, "guidance_scale": 2.0}


def compose_dirs(tiny_dirs, root) -> dict:
    """digits and blobs bases; digits patches digits-dmp, digits-copy (the same bytes), digits-b, digits-c."""
    models, patches = root / "models", root / "patches"
    models.mkdir(parents=True)
    patches.mkdir()
    shutil.copy(tiny_dirs["models"] / "digits.safetensors", models)
    save_base(tiny_base("uncond", seed=1), models / "blobs.safetensors", **BASE_META, name="blobs", task="uncond")
    dmp = (tiny_dirs["patches"] / "digits-dmp.safetensors").read_bytes()
    (patches / "digits-dmp.safetensors").write_bytes(dmp)
    (patches / "digits-copy.safetensors").write_bytes(dmp)
    digits = tiny_dirs["bases"]["digits"]
    for name, seed in (("digits-b", 201), ("digits-c", 202)):
        (patches / f"{name}.safetensors").write_bytes(make_patch_bytes(digits, "digits", seed=seed))
    shutil.copy(tiny_dirs["patches"] / "blobs-dmp.safetensors", patches)
    return {"models": models, "patches": patches, "bases": tiny_dirs["bases"]}


@pytest.fixture(scope="module")
def client(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    dirs = compose_dirs(tiny_dirs, root / "src")
    with admin_client(dirs, root / "served") as c:
        yield c


def generate(client, **body) -> dict:
    r = client.post("/generate", json=DIGITS | body)
    assert r.status_code == 200, r.text
    return r.json()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)


def test_scale_zero_is_the_base_and_scale_one_the_patch_byte_for_byte(client):
    base = generate(client)
    patched = generate(client, patch="digits-dmp")
    assert base["images"] != patched["images"]
    zero = generate(client, patch="digits-dmp", patch_scale=0)
    assert zero["images"] == base["images"]
    assert zero["patches"] == [{"name": "digits-dmp", "version": patched["patch"]["version"], "scale": 0.0}]
    assert zero["patch"] == patched["patch"]  # the old field stays
    assert generate(client, patch="digits-dmp", patch_scale=1.0)["images"] == patched["images"]
    assert generate(client, patches=[{"name": "digits-dmp", "scale": 1}])["images"] == patched["images"]
    assert generate(client, patches=[{"name": "digits-dmp"}])["images"] == patched["images"]  # scale 1 by default
    negative = generate(client, patch="digits-dmp", patch_scale=-2)["images"]
    assert negative not in (base["images"], patched["images"])


def test_half_a_plus_half_its_copy_is_a_within_one_grey_level(client):
    whole = generate(client, patch="digits-dmp", num_images=2)
    halves = generate(client, patches=[{"name": "digits-dmp", "scale": 0.5}, {"name": "digits-copy", "scale": 0.5}],
                      num_images=2)
    assert [p["scale"] for p in halves["patches"]] == [0.5, 0.5]
    base = generate(client, num_images=2)
    for w, h, b in zip(whole["images"], halves["images"], base["images"], strict=True):
        assert np.abs(pixels(w) - pixels(h)).max() <= 1
        assert np.abs(pixels(w) - pixels(b)).max() > 1  # the patch does change pixels: the test can fail


COMPOSITIONS = [
    [{"name": "digits-dmp", "scale": 0.5}, {"name": "digits-b", "scale": -1.0}],
    [{"name": "digits-b", "scale": 2}, {"name": "digits-c", "scale": 0.25}],
    [{"name": "digits-dmp"}, {"name": "digits-b"}, {"name": "digits-c"}, {"name": "digits-copy", "scale": -4}],
    [{"name": "digits-c", "scale": 4}],
    [{"name": "digits-c", "scale": 0.7}, {"name": "digits-dmp", "scale": -0.5}],
    [{"name": "digits-copy", "scale": 1.5}, {"name": "digits-b", "scale": 0.1}, {"name": "digits-dmp"}],
]


def test_six_compositions_in_parallel_equal_each_alone(client):
    bodies = [{"patches": c, "seed": 40 + i, "num_images": 1 + i % 2} for i, c in enumerate(COMPOSITIONS)]
    alone = [generate(client, **b)["images"] for b in bodies]
    assert len({tuple(a) for a in alone}) == len(alone)
    before = batched_forwards(client)
    with ThreadPoolExecutor(len(bodies) * 2) as pool:
        together = [pool.submit(generate, client, **b) for b in bodies + bodies[::-1]]
        results = [f.result()["images"] for f in together]
    assert results == alone + alone[::-1]
    count, images = batched_forwards(client)
    assert images - before[1] > count - before[0], "requests never shared a forward: the test proves nothing"



@pytest.mark.parametrize("body", [
    {"patch": "digits-dmp", "patch_scale": float("nan")},
    {"patch": "digits-dmp", "patch_scale": 1e9},
    {"patch": "digits-dmp", "patch_scale": 10**400},  # an int no float holds
    {"patch": "digits-dmp", "patch_scale": -4.5},
    {"patch": "digits-dmp", "patch_scale": "1"},
    {"patch_scale": 0.5},
    {"patches": []},
    {"patches": [{"name": f"p{i}"} for i in range(9)]},
    {"patches": [{"name": "digits-dmp"}] * 5},
    {"patches": [{"name": "nope"}]},
    {"patches": [{"name": "digits-dmp"}, {"name": "blobs-dmp"}]},
    {"patches": [{"name": "digits-dmp", "scale": "0.5"}]},
    {"patches": ["digits-dmp"]},
    {"patches": "digits-dmp"},
    {"patches": [{"name": "digits-dmp"}, {"name": "digits-dmp", "scale": 2}]},
    {"patches": [{"name": "digits-dmp", "scale": float("inf")}]},
    {"patches": [{"name": "digits-dmp", "weight": 1}]},
    {"patch": "digits-dmp", "patches": [{"name": "digits-b"}]},
    {"seeds": [1, 2], "num_images": 3},
    {"seeds": [1, -2], "num_images": 2, "seed": None},
    {"seeds": [1, 2], "num_images": 2},  # and seed 5 from DIGITS: one or the other
    {"negative_class_label": 10},
    {"negative_class_label": "no such class"},
    {"negative_class_label": 2, "guidance_scale": 1.0},
])
def test_bad_specs_are_4xx_and_change_nothing(client, body):
    before = client.get("/patches").json()
    req = {k: v for k, v in (DIGITS | body).items() if v is not None}
    r = client.post("/generate", content=_json(req), headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error", "error_type"} and r.json()["error"], r.json()
    assert client.get("/patches").json() == before


def _json(body: dict) -> str:
    """JSON with NaN/Infinity written as Python's json does (what a careless client sends)."""
    import json

    return json.dumps(body)


def test_negative_class_on_other_tasks_is_refused(client):
    r = client.post("/generate", json={"model": "blobs", "steps": 2, "negative_class_label": 1})
    assert r.status_code == 422 and r.json()["error_type"] == "invalid_request"


def test_negative_class_guides_away_from_that_class(client):
    plain = generate(client)["images"]
    away = generate(client, negative_class_label=7)["images"]
    assert away != plain
    assert generate(client, negative_class_label="7")["images"] == away  # a label name, as class_label takes


def test_each_image_has_its_seed_and_reproduces_alone(client):
    three = generate(client, patch="digits-dmp", patch_scale=0.5, num_images=3, seed=20)
    assert three["seeds"] == [20, 21, 22] and three["seed"] == 20
    one = generate(client, patch="digits-dmp", patch_scale=0.5, seed=21)
    assert one["images"] == three["images"][1:2] and one["seeds"] == [21]
    listed = generate(client, patch="digits-dmp", patch_scale=0.5, num_images=2, seed=None, seeds=[22, 7])
    assert listed["seeds"] == [22, 7] and listed["images"][0] == three["images"][2]
    assert listed["images"][1] == generate(client, patch="digits-dmp", patch_scale=0.5, seed=7)["images"][0]
    assert len(set(three["images"])) == 3


def test_openapi_documents_the_new_fields(client):
    props = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"patch_scale", "patches", "seeds", "negative_class_label"} <= set(props)


def test_result_cache_key_holds_scales_seeds_and_every_version():
    from dataclasses import replace

    from app.engine.cache import ResultCache
    from app.engine.work import Spec

    spec = Spec("digits", "a", 3, None, 2, 3, "ddim", 2.0, 5, "png", patches=(("a", 0.5), ("b", 1.0)), seeds=(5, 6))
    key = ResultCache.key(spec, "fp", ("v1", "v2"))
    assert key == ResultCache.key(replace(spec), "fp", ("v1", "v2"))
    others = [replace(spec, patches=(("a", 0.6), ("b", 1.0))), replace(spec, patches=(("b", 1.0), ("a", 0.5))),
              replace(spec, seeds=(5, 7)), replace(spec, negative_class_label=4)]
    assert all(ResultCache.key(s, "fp", ("v1", "v2")) != key for s in others)
    assert ResultCache.key(spec, "fp", ("v1", "v3")) != key
