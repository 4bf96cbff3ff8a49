"""Replicas never serve different bases under one name (issue 25 item 7): a replica that cannot validate a name's
new version fails the name (logged once), never keeps serving the old version, and GET /patches shows it."""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import ExitStack

import pytest
from conftest import ADMIN_TOKEN, AUTH, asgi_client, make_patch_bytes, poll, wait_ready

pytestmark = pytest.mark.redis


def served(tiny_dirs, root, bases) -> dict:
    (root / "models").mkdir(parents=True)
    (root / "patches").mkdir()
    for name in bases:
        shutil.copy(tiny_dirs["models"] / f"{name}.safetensors", root / "models")
    return {"models": root / "models", "patches": root / "patches"}


def test_a_replica_without_the_new_base_fails_the_name(redis_server, tiny_dirs, tmp_path, caplog):
    digits, blobs = tiny_dirs["bases"]["digits"], tiny_dirs["bases"]["blobs"]
    with ExitStack() as stack:
        a, b = (stack.enter_context(asgi_client(served(tiny_dirs, tmp_path / n, bases), warmup=False,
                                                redis_url=redis_server.url, admin_token=ADMIN_TOKEN))
                for n, bases in (("a", ["digits", "blobs"]), ("b", ["digits"])))
        wait_ready(a)
        wait_ready(b)
        v1 = a.put("/patches/moving", content=make_patch_bytes(digits, "digits", 1), headers=AUTH).json()["version"]
        assert poll(lambda: b.get("/patches/moving").json().get("state") == "ready", 5)
        with caplog.at_level(logging.WARNING, logger="dmp.registry"):
            put = a.put("/patches/moving", content=make_patch_bytes(blobs, "blobs", 2), headers=AUTH)
            assert put.status_code == 200 and put.json()["base"] == "blobs"
            v2 = put.json()["version"]
            assert poll(lambda: b.get("/patches/moving").json().get("version") == v2, 5)
            time.sleep(5)  # two resync periods: no new log line, no return to v1
        record = b.get("/patches/moving").json()
        assert record["state"] == "failed" and record["version"] == v2 and "blobs" in record["error"], record
        listed = {p["name"]: p for p in b.get("/patches").json()["patches"]}
        assert listed["moving"]["state"] == "failed" and listed["moving"]["version"] != v1
        gen = b.post("/generate", json={"patch": "moving", "class_label": 1, "steps": 2, "seed": 1})
        assert gen.status_code == 422 and gen.json()["error_type"] == "patch_not_ready", gen.text  # never v1
        refusals = [r for r in caplog.records if "moving" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        # a version b can serve makes the name ready again there
        v3 = a.put("/patches/moving", content=make_patch_bytes(digits, "digits", 3), headers=AUTH).json()["version"]
        assert poll(lambda: b.get("/patches/moving").json().get("state") == "ready", 5)
        assert b.get("/patches/moving").json()["version"] == v3
