"""A real `python -m app serve` on a free port, serving a tiny random class-conditional base and one patch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from app.model import save_base
from app.model.dit import DiT, DiTConfig
from app.model.dmp import new_patch_for, patch_metadata_for, save_patch

REPO = Path(__file__).resolve().parents[2]
BASE_NAME = "tiny"
PATCH_NAME = "tiny-dmp"
TEXT_NAME = "tiny-text"
LABELS = ["circle", "square", "cross"]
ADMIN_TOKEN = "console-test-admin-token-0123456789"
START_TIMEOUT_S = 180  # torch import + model load + warm-up on a busy 2-core machine


@dataclass
class Server:
    url: str
    log: Path

    def get(self, path: str) -> tuple[int, bytes]:
        """GET a path; returns (status, body) for 2xx and 4xx/5xx alike."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def put_patch(self, name: str, data: bytes) -> int:
        """PUT a patch file as the admin; returns the status."""
        req = urllib.request.Request(self.url + f"/patches/{name}", data=data, method="PUT",
                                     headers={"Content-Type": "application/octet-stream",
                                              "Authorization": f"Bearer {ADMIN_TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    def post_json(self, path: str, body: dict) -> tuple[int, dict]:
        """POST a JSON body; returns (status, parsed JSON reply)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def _randomize(module: torch.nn.Module, seed: int, std: float) -> None:
    """Random weights (adaLN-Zero init makes every block an identity and every image flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_base(**config) -> DiT:
    """An 8x8x1 DiT with hidden 32, depth 2, patch 2 and random weights."""
    base = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                         learn_sigma=False, **config))
    _randomize(base, seed=0, std=0.1)
    return base.eval()


def write_tiny_checkpoints(model_dir: Path, patch_dir: Path) -> None:
    """A 3-class base with a random, non-zero DMP patch, and a MiniLM-captioned text base."""
    common = dict(vae="pixel", default_sampler="ddim", default_steps="2", default_guidance="1.5",
                  beta_schedule="linear", clip_sample="true", train_config="{}", metrics="{}")
    base = tiny_base(num_classes=len(LABELS))
    save_base(base, model_dir / f"{BASE_NAME}.safetensors", name=BASE_NAME, task="class", text_encoder="",
              labels=json.dumps(LABELS), **common)
    text = tiny_base(num_classes=0, text_dim=384)  # all-MiniLM-L6-v2 embeddings are 384-d
    save_base(text, model_dir / f"{TEXT_NAME}.safetensors", name=TEXT_NAME, task="text", text_encoder="minilm",
              labels="[]", **common)
    patch = new_patch_for(base)
    _randomize(patch, seed=1, std=1.0)  # large prompts, so the patched image visibly differs from the base
    save_patch(patch, patch_dir / f"{PATCH_NAME}.safetensors", **patch_metadata_for(base, BASE_NAME, "test"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(server: Server, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`python -m app serve` exited with {proc.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            if server.get("/health/ready")[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f"server not ready after {START_TIMEOUT_S}s:\n{server.log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    """The service as users start it, on CPU, embedded registry (no Redis)."""
    root = tmp_path_factory.mktemp("web-server")
    write_tiny_checkpoints(root / "models", root / "patches")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMP_")}
    env |= {"DMP_MODEL_DIR": str(root / "models"), "DMP_PATCH_DIR": str(root / "patches"), "DMP_DEVICE": "cpu",
            "DMP_DRAIN_SECONDS": "1", "DMP_ADMIN_TOKEN": ADMIN_TOKEN, "DMP_BATCH_DIR": str(root / "batch")}
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(url=f"http://127.0.0.1:{port}", log=log)
    try:
        wait_ready(srv, proc)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def submit_one_line_batch(url: str) -> dict:
    """A one-line Batch API batch (keys off) for the base; the created batch object."""
    line = {"custom_id": "a", "method": "POST", "url": "/v1/images/generations",
            "body": {"model": BASE_NAME, "prompt": "0", "seed": 1}}
    file = httpx.post(url + "/v1/files", data={"purpose": "batch"},
                      files={"file": ("in.jsonl", json.dumps(line).encode())}).json()
    return httpx.post(url + "/v1/batches", json={"input_file_id": file["id"], "completion_window": "24h",
                                                 "endpoint": "/v1/images/generations"}).json()
