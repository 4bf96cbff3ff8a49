"""Patch headers with metadata of the wrong types or absurd nesting: 422 on upload, one failed patch at start."""
from __future__ import annotations

from conftest import ADMIN_TOKEN, BAD_HEADERS, asgi_client, copy_dirs, wait_ready, with_header

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/octet-stream"}


def test_bad_metadata_upload_is_422(class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    good = (dirs["patches"] / "digits-dmp.safetensors").read_bytes()
    with asgi_client(dirs, admin_token=ADMIN_TOKEN, warmup=False) as c:  # default cap: the nested one is 200 kB
        wait_ready(c)
        for kind, change in BAD_HEADERS.items():
            r = c.put("/patches/bad-meta", content=with_header(good, change), headers=AUTH)
            assert r.status_code == 422 and r.json()["error_type"] == "invalid_patch", (kind, r.text)
            assert c.get("/patches/bad-meta").status_code == 404


def test_one_bad_file_at_start_fails_alone(class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    good = dirs["patches"] / "digits-dmp.safetensors"
    for kind, change in BAD_HEADERS.items():
        (dirs["patches"] / f"bad-{kind.replace('_', '-')}.safetensors").write_bytes(with_header(good.read_bytes(),
                                                                                              change))
    with asgi_client(dirs, warmup=False) as c:
        wait_ready(c)
        states = {p["name"]: p["state"] for p in c.get("/patches").json()["patches"]}
        assert states.pop("digits-dmp") == "ready" and set(states.values()) == {"failed"}, states
        assert len(states) == len(BAD_HEADERS)
        r = c.post("/generate", json={"patch": "digits-dmp", "class_label": 1, "steps": 2, "seed": 1})
        assert r.status_code == 200


def test_absurd_but_finite_values_are_422(client, tiny_dirs):
    """1e37 prompts are finite yet black out every image: refused against the base's activation scale."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from app.model.dmp import read_header

    good = (client.dirs["patches"] / "digits-dmp.safetensors").read_bytes()
    tensors, meta = st_load(good), read_header(good)["__metadata__"]
    for name, scale, word in (("prompts", 1e37, "token scale"), ("gate.weight", 1e30, "gate logits"),
                              ("gate.bias", 1e6, "gate logits")):
        data = st_save(tensors | {name: tensors[name] * 0 + scale}, metadata=meta)
        r = client.put("/patches/absurd", content=data, headers=AUTH)
        assert r.status_code == 422 and r.json()["error_type"] == "invalid_patch", r.text
        assert word in r.json()["error"]
    assert client.get("/patches/absurd").status_code == 404
    assert client.put("/patches/absurd", content=st_save(tensors, metadata=meta), headers=AUTH).status_code == 201


def test_shipped_patches_are_far_inside_the_bounds():
    from conftest import REPO

    from app.model import load_base, load_patch
    from app.model.dmp.bounds import PROMPT_FACTOR, activation_scale

    for name in ("mnist", "animals", "mnist-captions"):
        base = load_base(REPO / "models" / f"{name}.safetensors")
        patch = load_patch(REPO / "patches" / f"{name}-dmp.safetensors", base=base)  # passes the check
        tokens, _ = activation_scale(base)
        # 5 % of the bound: these three (official recipe, gate x1) peak at 0.20-0.43 %; a gate x64 patch, which folds
        # the 64x into its prompts (mnist-thick-dmp), at 3.8 %
        assert patch.prompts.abs().max() < 0.05 * PROMPT_FACTOR * tokens
