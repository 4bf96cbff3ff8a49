"""/patches/{name}/gates and gates.png: weights checked against the gate formula, the heatmap, bad params, caching."""
from __future__ import annotations

import io

import pytest
import torch
from conftest import AUTH, admin_client, make_patch_bytes
from PIL import Image
from safetensors.torch import load as st_load


@pytest.fixture(scope="module")
def gclient(class_only_dirs, tmp_path_factory):
    with admin_client(class_only_dirs, tmp_path_factory.mktemp("gates"), warmup=False) as c:
        yield c


def expected(base, data: bytes, label: int, timesteps: list[int]) -> torch.Tensor:
    """softmax(W [c; l] + b) straight from the file's tensors, c = t_emb + y_emb: (L, T, N)."""
    t = st_load(data)
    w, b = t["gate.weight"], t["gate.bias"]  # (N, D + 1), (N,)
    with torch.no_grad():
        c = base.t_embedder(torch.tensor(timesteps, dtype=torch.float32)) + base.y_embedder(
            torch.tensor([label]), False)  # (T, D)
        L = t["prompts"].shape[0]
        return torch.stack([(c @ w[:, :-1].T + layer * w[:, -1] + b).softmax(-1) for layer in range(L)])


def test_weights_follow_the_gate_formula(gclient, tiny_dirs):
    r = gclient.get("/patches/digits-dmp/gates", params={"class_label": 3, "timesteps": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["timesteps"] == [0, 250, 500, 749, 999] and body["condition"]["class_label"] == 3
    got = torch.tensor(body["weights"])
    assert got.shape == (body["blocks"], 5, body["prompts"])
    data = (gclient.dirs["patches"] / "digits-dmp.safetensors").read_bytes()
    want = expected(tiny_dirs["bases"]["digits"], data, 3, body["timesteps"])
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(got.sum(-1), torch.ones(got.shape[:2]), atol=1e-3)
    # a class by name is the same class; another class gates differently (gate input c)
    assert gclient.get("/patches/digits-dmp/gates", params={"class_label": "3", "timesteps": 5}).json() == body
    other = gclient.get("/patches/digits-dmp/gates", params={"class_label": 7, "timesteps": 5}).json()
    assert other["weights"] != body["weights"]
    mean = gclient.get("/patches/digits-dmp/gates", params={"timesteps": 5}).json()
    assert mean["condition"]["class_label"] is None and len(mean["weights"][0]) == 5


def test_heatmap_png(gclient):
    r = gclient.get("/patches/digits-dmp/gates.png", params={"timesteps": 20})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    blocks = gclient.get("/patches/digits-dmp/gates", params={"timesteps": 20}).json()["blocks"]
    cols = min(4, blocks)
    rows = (blocks + cols - 1) // cols
    assert img.size == (round(3.4 * cols * 80), round((2.9 * rows + 0.5) * 80))
    assert len(set(img.convert("RGB").getdata())) > 50  # a coloured heatmap, not a blank canvas


@pytest.mark.parametrize("path,params,status", [
    ("/patches/nope/gates", {}, 404),
    ("/patches/digits-dmp/gates", {"timesteps": 1}, 422),
    ("/patches/digits-dmp/gates", {"timesteps": 5000}, 422),
    ("/patches/digits-dmp/gates", {"timesteps": "x"}, 422),
    ("/patches/digits-dmp/gates", {"class_label": 10}, 422),
    ("/patches/digits-dmp/gates", {"class_label": -1}, 422),
    ("/patches/digits-dmp/gates.png", {"class_label": "zebra"}, 400),
    ("/patches/digits-dmp/gates.png", {"caption": "a cat"}, 422),
])
def test_bad_params_are_4xx_json(gclient, path, params, status):
    r = gclient.get(path, params=params)
    assert r.status_code == status, r.text
    assert {"error", "error_type"} <= set(r.json())


def test_a_new_version_is_not_served_from_the_cache(gclient, tiny_dirs):
    before = gclient.get("/patches/digits-dmp/gates", params={"class_label": 1, "timesteps": 3}).json()
    data = make_patch_bytes(tiny_dirs["bases"]["digits"], "digits", seed=999)
    assert gclient.put("/patches/digits-dmp", content=data, headers=AUTH).status_code == 200
    after = gclient.get("/patches/digits-dmp/gates", params={"class_label": 1, "timesteps": 3}).json()
    assert after["version"] != before["version"]
    want = expected(tiny_dirs["bases"]["digits"], data, 1, after["timesteps"])
    assert torch.allclose(torch.tensor(after["weights"]), want, atol=1e-4)


def test_history_lists_versions_newest_first(gclient, tiny_dirs):
    first = gclient.get("/patches/digits-dmp").json()["version"]
    data = make_patch_bytes(tiny_dirs["bases"]["digits"], "digits", seed=1234)
    assert gclient.put("/patches/hist", content=data, headers=AUTH).status_code == 201
    assert gclient.delete("/patches/hist", headers=AUTH).status_code == 200
    body = gclient.get("/patches/hist/history").json()
    assert body["current"] is None
    assert [e["event"] for e in body["history"]] == ["deleted", "installed"]
    assert body["history"][0]["at"] >= body["history"][1]["at"]
    main = gclient.get("/patches/digits-dmp/history").json()
    assert main["current"] == gclient.get("/patches/digits-dmp").json()["version"]
    assert first in [e["version"] for e in main["history"]]
    r = gclient.get("/patches/never-seen/history")
    assert r.status_code == 404 and r.json()["error_type"] == "patch_not_found"
