"""Embedded (disk) registry: shipped files load, a bad file is recorded as failed and serves nothing."""
from __future__ import annotations

import torch
from conftest import asgi_client, copy_dirs, make_patch_bytes, tiny_base, wait_ready
from safetensors.torch import save_file


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


def test_a_non_base_file_in_the_model_dir_is_skipped(class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    save_file({"step": torch.zeros(1), "opt.exp_avg": torch.zeros(3)}, str(dirs["models"] / "run.ckpt.safetensors"))
    with asgi_client(dirs, warmup=False) as c:
        wait_ready(c)
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["digits"]
