"""/patches: auth, every kind of bad upload (nothing changes), 201/200, delete, hot swap under concurrent load."""
from __future__ import annotations

import io
import math
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ADMIN_TOKEN, asgi_client, copy_dirs, make_patch_bytes, tiny_base, wait_ready
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/octet-stream"}


def edit(data: bytes, tensors=None, meta=None) -> bytes:
    """Rewrite a patch file with some tensors or metadata changed."""
    from app.model.dmp import read_header

    t = st_load(data) | (tensors or {})
    m = (read_header(data)["__metadata__"]) | (meta or {})
    return st_save({k: v for k, v in t.items() if v is not None}, metadata=m)


def state(client):
    return client.get("/patches").json(), sorted(p.name for p in client.dirs["patches"].iterdir())


def test_admin_auth(client, tiny_dirs):
    data = make_patch_bytes(tiny_dirs["bases"]["digits"], "digits", seed=1)
    ctype = {"Content-Type": "application/octet-stream"}
    r = client.put("/patches/authz", content=data, headers=ctype)
    assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
    r = client.put("/patches/authz", content=data, headers=ctype | {"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error_type"] == "invalid_token"
    assert client.delete("/patches/digits-dmp", headers={"Authorization": "Basic c2VjcmV0"}).status_code == 401
    r = client.put("/patches/authz", content=data, headers=AUTH)
    assert r.status_code == 201, r.text
    assert client.delete("/patches/authz", headers=AUTH).status_code == 200
    assert client.get("/patches/authz").status_code == 404


def test_admin_routes_off_without_token(class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    with asgi_client(dirs, warmup=False) as c:
        wait_ready(c)
        data = (dirs["patches"] / "digits-dmp.safetensors").read_bytes()
        r = c.put("/patches/x", content=data, headers=AUTH)
        assert r.status_code == 404 and set(r.json()) == {"error", "error_type"}
        assert c.delete("/patches/digits-dmp", headers=AUTH).status_code == 404
        assert c.get("/patches/digits-dmp").status_code == 200


def _bad_uploads(tiny_dirs):
    digits = tiny_dirs["bases"]["digits"]
    good = make_patch_bytes(digits, "digits", seed=3)
    prompts = st_load(good)["prompts"]
    other = tiny_base("class", seed=99)  # same shapes, other weights
    buf = io.BytesIO()
    torch.save({"prompts": prompts}, buf)  # a pickle-based torch file
    return [
        ("pickle", pickle.dumps({"prompts": prompts.numpy()}), 422),
        ("torch.save file", buf.getvalue(), 422),
        ("NaN", edit(good, {"prompts": torch.full_like(prompts, math.nan)}), 422),
        ("Inf", edit(good, {"gate.bias": torch.full((16,), math.inf)}), 422),
        ("wrong shape", edit(good, {"prompts": torch.zeros(2, 16, 31)}), 422),
        ("missing tensor", edit(good, {"gate.bias": None}), 422),
        ("other base", make_patch_bytes(other, "digits", seed=4), 422),
        ("unknown format", edit(good, meta={"format": "lora"}), 422),
        ("future version", edit(good, meta={"format_version": "9"}), 422),
        ("wrong task", edit(good, meta={"task": "text"}), 422),
        ("empty", b"", 422),
        ("garbage", b"\x00" * 100, 422),
        ("oversize", b"\x01" * 20000, 413),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_uploads_change_nothing(client, tiny_dirs, case):
    why, data, status = _bad_uploads(tiny_dirs)[case]
    before = state(client)
    r = client.put("/patches/digits-dmp", content=data, headers=AUTH)
    assert r.status_code == status, (why, r.text)
    assert set(r.json()) == {"error", "error_type"} and r.json()["error"]
    assert state(client) == before
    gen = client.post("/generate", json={"patch": "digits-dmp", "class_label": 1, "steps": 2, "seed": 1})
    assert gen.status_code == 200


def test_upload_cap_counts_bytes_not_content_length(client):
    def chunks():
        for _ in range(10):
            yield b"\x02" * 4000  # no Content-Length: chunked transfer

    before = state(client)
    r = client.put("/patches/chunky", content=chunks(), headers=AUTH)
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    assert state(client) == before


def test_wrong_content_type(client, tiny_dirs):
    data = make_patch_bytes(tiny_dirs["bases"]["digits"], "digits", seed=5)
    r = client.put("/patches/typed", content=data, headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == 415 and r.json()["error_type"] == "unsupported_media_type"
    assert client.get("/patches/typed").status_code == 404


def test_upload_replace_and_describe(client, tiny_dirs):
    digits = tiny_dirs["bases"]["digits"]
    v1, v2 = make_patch_bytes(digits, "digits", seed=6), make_patch_bytes(digits, "digits", seed=7)
    r1 = client.put("/patches/fresh", content=v1, headers=AUTH)
    assert r1.status_code == 201 and r1.json()["state"] == "ready" and r1.json()["base"] == "digits"
    r2 = client.put("/patches/fresh", content=v2, headers=AUTH)
    assert r2.status_code == 200 and r2.json()["version"] != r1.json()["version"]
    detail = client.get("/patches/fresh").json()
    assert detail["metadata"]["format"] == "dmp-patch" and detail["task"] == "class"
    assert (client.dirs["patches"] / "fresh.safetensors").read_bytes() == v2  # stored atomically
    assert not [p for p in client.dirs["patches"].iterdir() if p.name.startswith(".")]
    assert client.delete("/patches/fresh", headers=AUTH).json()["state"] == "retired"
    assert not (client.dirs["patches"] / "fresh.safetensors").exists()


def test_hot_swap_under_concurrent_load(client, tiny_dirs):
    """Every reply's image is exactly the image of the version it reports; no 5xx; old slots are freed."""
    digits = tiny_dirs["bases"]["digits"]
    versions = [make_patch_bytes(digits, "digits", seed=s) for s in (20, 21, 22)]
    assert client.put("/patches/swap", content=versions[0], headers=AUTH).status_code == 201
    body = {"patch": "swap", "class_label": 5, "steps": 4, "seed": 77}
    replies, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            replies.append(client.post("/generate", json=body))

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(hammer) for _ in range(4)]
        i = 0
        while i < 9 or len(replies) < 60:  # keep swapping while requests are running
            r = client.put("/patches/swap", content=versions[(i + 1) % 3], headers=AUTH)
            assert r.status_code == 200, r.text
            i += 1
            time.sleep(0.01)
        stop.set()
        for w in workers:
            w.result()
    assert replies and all(r.status_code == 200 for r in replies), {r.status_code for r in replies}
    reference = {}
    for data in versions:
        version = client.put("/patches/swap", content=data, headers=AUTH).json()["version"]
        reference[version] = client.post("/generate", json=body).json()["images"]
    assert len({tuple(v) for v in reference.values()}) == 3
    seen = set()
    for r in replies:
        out = r.json()
        assert out["images"] == reference[out["patch"]["version"]]
        seen.add(out["patch"]["version"])
    assert len(seen) >= 2, "no swap happened while requests ran"
    assert client.get("/patches/swap").json()["versions_held"] == []
    slots = [line for line in client.get("/metrics").text.splitlines()
             if line.startswith('dmp_patch_slots_in_use{model="digits"}')]
    assert slots and float(slots[0].split()[-1]) == 2  # digits-dmp + swap's current version, nothing leaked
