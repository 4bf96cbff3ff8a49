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


def test_uploads_go_to_the_user_patch_dir_never_into_the_shipped_one(class_only_dirs, tmp_path, monkeypatch):
    """DMP_PATCH_DIR unset: the shipped patches are copied once per name into the user data dir, which takes the
    uploads; a delete sticks over restarts, a newly shipped name still arrives, the shipped folder is never written."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app
    from app.core.config import Settings

    dirs = copy_dirs(class_only_dirs, tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    shipped = dirs["patches"]
    before = sorted(p.name for p in shipped.iterdir())
    settings = Settings(model_dir=dirs["models"], shipped_patch_dir=shipped, admin_token="seed-admin-token-0123456",
                        warmup=False)
    user = tmp_path / "data" / "dmp" / "patches"
    assert settings.patch_root == user and settings.patch_seed_dir == shipped
    auth = {"Authorization": "Bearer seed-admin-token-0123456", "Content-Type": "application/octet-stream"}
    upload = make_patch_bytes(class_only_dirs["bases"]["digits"], "digits", seed=5)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert [p["name"] for p in c.get("/patches").json()["patches"]] == ["digits-dmp"]
        assert c.put("/patches/mine", content=upload, headers=auth).status_code == 201
        assert c.delete("/patches/digits-dmp", headers=auth).status_code == 200
    assert (user / "mine.safetensors").read_bytes() == upload
    assert not (user / "digits-dmp.safetensors").exists()
    assert sorted(p.name for p in shipped.iterdir()) == before  # nothing written next to the shipped files

    (shipped / "extra.safetensors").write_bytes((shipped / "digits-dmp.safetensors").read_bytes())
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert sorted(p["name"] for p in c.get("/patches").json()["patches"]) == ["extra", "mine"]


def test_an_explicit_patch_dir_is_used_as_is(class_only_dirs, tmp_path, monkeypatch):
    from app.core.config import Settings

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    dirs = copy_dirs(class_only_dirs, tmp_path)
    settings = Settings(model_dir=dirs["models"], patch_dir=dirs["patches"], warmup=False)
    assert settings.patch_root == dirs["patches"] and settings.patch_seed_dir is None
    with asgi_client(dirs, warmup=False) as c:
        wait_ready(c)
    assert not (tmp_path / "data").exists()
    assert Settings(redis_url="redis://localhost:6379/0").patch_root == Settings().shipped_patch_dir  # seeds Redis
