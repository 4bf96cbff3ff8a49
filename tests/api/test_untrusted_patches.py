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
