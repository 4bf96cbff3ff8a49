"""docs/trainer.md's "Your own domain in ten minutes", run as written (issue 26): make an image folder, train the
recipe, score, upload to a real server, generate. Only the step counts the doc names are cut, so CI takes a minute."""
from __future__ import annotations

import io
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys

import httpx
import pytest
from conftest import ADMIN_TOKEN, REPO
from PIL import Image

from app.model.dmp import read_header

# as the doc says
# speed only: 3 training steps, 2 sampling steps, and no ImageNet extractor (its 1280-d FDs take a minute here;
# tests/trainer/test_trainer.py covers it in compare)
TEST_FLAGS = {"patch": ["--steps", "3"],
              "compare": ["--steps", "2", "--json", "compare.json", "--extractors", "pca", "randcnn"]}


def walkthrough() -> list[str]:
    """The lines of the section's bash block."""
    section = (REPO / "docs" / "trainer.md").read_text().split("## Your own domain in ten minutes", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()


def curl(line: str) -> dict:
    """What one of the doc's curl lines sends: method, path, headers, body (a file or JSON)."""
    args = shlex.split(line.split(" > ", 1)[0])[1:]  # the reply's file is the test's to check
    url = next(a for a in args if a.startswith("localhost:"))
    out = {"method": "GET", "headers": {}, "path": "/" + url.split("/", 1)[1]}
    for flag, value in itertools.pairwise(args):
        if flag == "-X":
            out["method"] = value
        elif flag == "-H":
            name, val = value.split(": ", 1)
            out["headers"][name] = val
        elif flag in ("-d", "--data-binary"):
            out["body"] = value
            out["method"] = out["method"] if out["method"] != "GET" else "POST"
    return out


@pytest.mark.timeout(1800)  # 6 min 27 s on a 2-core VM at a load average of ~16 (idle: not measured)
def test_the_documented_walkthrough_runs_as_written(tmp_path, start_server):
    lines = walkthrough()
    trainer = [shlex.split(line) for line in lines if line.startswith("python -m app.trainer ")]
    assert [args[3] for args in trainer] == ["make-domain", "patch", "compare"]
    patch_args = trainer[1][4:]
    assert sorted(patch_args[::2]) == ["--base", "--dataset", "--out"]  # no flags: the defaults are the recipe
    (tmp_path / "models").symlink_to(REPO / "models")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMP_")} | {
        "PYTHONPATH": str(REPO), "DMP_DATA_CACHE": str(tmp_path / "cache")}
    outputs = {}
    for args in trainer:
        proc = subprocess.run([sys.executable, *args[1:], *TEST_FLAGS.get(args[3], [])], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, f"{shlex.join(args)}:\n{proc.stderr[-3000:]}"
        outputs[args[3]] = proc.stdout
    patch_file = tmp_path / "runs" / "thick-dmp.safetensors"
    meta = read_header(patch_file.read_bytes())["__metadata__"]
    assert meta["domain"] == "thick" and json.loads(meta["train_config"])["dataset"] == "folder:thick"
    scores = json.loads((tmp_path / "compare.json").read_text())
    assert scores["num_samples"] == 500 and scores["dataset"] == "folder:data/thick"  # the folder's test split
    arm = scores["arms"]["thick-dmp"]
    assert {"d_fd_pca_pct", "d_fd_randcnn_pct"} <= set(arm["summary"]) and "rel_diff_pct" in arm["heldout_deciles"]
    assert "thick-dmp: dFD pca" in outputs["compare"]  # the line the user reads

    serve = next(line for line in lines if "python -m app serve" in line)
    assert "DMP_PATCH_DIR=runs/served" in serve
    served, models = tmp_path / "runs" / "served", tmp_path / "mnist-only"
    served.mkdir(parents=True)
    models.mkdir()
    shutil.copy(REPO / "models" / "mnist.safetensors", models)  # the doc serves all of models/; mnist is enough
    server = start_server(model_dir=models, patch_dir=served, admin_token=ADMIN_TOKEN)
    put, generate = (curl(line) for line in lines if line.startswith("curl "))
    headers = {k: v.replace("$DMP_ADMIN_TOKEN", ADMIN_TOKEN) for k, v in put["headers"].items()}
    r = httpx.request(put["method"], server.url + put["path"], headers=headers,
                      content=(tmp_path / put["body"].removeprefix("@")).read_bytes(), timeout=60)
    assert r.status_code == 201, r.text
    assert (served / "thick-dmp.safetensors").exists()  # uploads go to DMP_PATCH_DIR
    r = httpx.request(generate["method"], server.url + generate["path"], headers=generate["headers"],
                      content=generate["body"], timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert Image.open(io.BytesIO(r.content)).size == (16, 16)
