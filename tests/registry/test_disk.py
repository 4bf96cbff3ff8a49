"""Embedded (disk) registry: shipped files load, a bad file is recorded as failed and serves nothing."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from conftest import asgi_client, copy_dirs, make_patch_bytes, tiny_base, wait_ready


def test_bad_files_on_disk_fail_alone(class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    (dirs["patches"] / "junk.safetensors").write_bytes(b"\x80\x04not a patch")
    other = tiny_base("class", seed=42)
    (dirs["patches"] / "stranger.safetensors").write_bytes(make_patch_bytes(other, "elsewhere", seed=1))
    (dirs["patches"] / "bad name!.safetensors").write_bytes(b"ignored: not a valid patch name")
    with asgi_client(dirs, warmup=False) as c:
        wait_ready(c)
        patches = {p["name"]: p for p in c.get("/patches").json()["patches"]}
        assert set(patches) == {"digits-dmp", "junk", "stranger"}
        assert patches["digits-dmp"]["state"] == "ready"
        assert patches["junk"]["state"] == "failed" and "safetensors" in patches["junk"]["error"]
        assert patches["stranger"]["state"] == "failed" and "no served base" in patches["stranger"]["error"]
        r = c.post("/generate", json={"patch": "junk", "class_label": 1, "steps": 2})
        assert r.status_code == 422 and r.json()["error_type"] == "patch_not_ready"
        assert c.post("/generate", json={"patch": "digits-dmp", "class_label": 1, "steps": 2}).status_code == 200


def test_slot_exhaustion_is_a_clear_503(class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    digits = class_only_dirs["bases"]["digits"]
    headers = {"Authorization": "Bearer k", "Content-Type": "application/octet-stream"}
    with asgi_client(dirs, warmup=False, admin_token="k", patch_slots=3) as c:  # base + 2 patches
        wait_ready(c)
        assert c.put("/patches/second", content=make_patch_bytes(digits, "digits", 1), headers=headers).status_code == 201
        r = c.put("/patches/third", content=make_patch_bytes(digits, "digits", 2), headers=headers)
        assert r.status_code == 503 and r.json()["error_type"] == "no_free_slot" and "Retry-After" in r.headers
        assert c.get("/patches/third").status_code == 404 and not (dirs["patches"] / "third.safetensors").exists()
        assert c.delete("/patches/second", headers=headers).status_code == 200
        assert c.put("/patches/third", content=make_patch_bytes(digits, "digits", 2), headers=headers).status_code == 201


def test_a_non_base_file_in_the_model_dir_is_skipped(class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    save_file({"step": torch.zeros(1), "opt.exp_avg": torch.zeros(3)}, str(dirs["models"] / "run.ckpt.safetensors"))
    with asgi_client(dirs, warmup=False) as c:
        wait_ready(c)
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["digits"]
