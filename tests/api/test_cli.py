"""`python -m app generate` goes through the engine and writes the same pixels as the HTTP API."""
from __future__ import annotations

import base64
import os
import subprocess
import sys

from conftest import REPO


def test_cli_generate_matches_http(client, tmp_path):
    out = tmp_path / "x.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMP_")}
    env |= {"DMP_MODEL_DIR": str(client.dirs["models"]), "DMP_PATCH_DIR": str(client.dirs["patches"])}
    proc = subprocess.run([sys.executable, "-m", "app", "generate", "--model", "digits", "--patch", "digits-dmp",
                           "--class-label", "3", "--seed", "42", "--steps", "3", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    http = client.post("/generate", json={"model": "digits", "patch": "digits-dmp", "class_label": 3, "seed": 42,
                                          "steps": 3}).json()["images"][0]
    assert out.read_bytes() == base64.b64decode(http)
    bad = subprocess.run([sys.executable, "-m", "app", "generate", "--model", "digits", "--caption", "x", "--seed",
                          "1", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "class-conditional" in bad.stderr
