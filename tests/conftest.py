"""Shared fixtures of the service tests: tiny random bases and patches, a real redis-server, a real uvicorn."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from app.model import DiT, DiTConfig, save_base
from app.model.dmp import new_patch_for, patch_metadata_for, patch_to_bytes

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"  # the service refuses tokens under 16 characters
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/octet-stream"}  # an admin upload
TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, learn_sigma=False)
BASE_META = dict(vae="pixel", default_sampler="ddim", default_steps="3", default_guidance="1.0",
                 beta_schedule="linear", clip_sample="true")


@pytest.fixture(scope="session", autouse=True)
def _user_data_outside_home(tmp_path_factory):
    """A server started without DMP_PATCH_DIR writes to $XDG_DATA_HOME/dmp/patches: never the tester's home."""
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))


def tiny_base(task: str, seed: int) -> DiT:
    torch.manual_seed(seed)
    extra = {"class": dict(num_classes=10), "uncond": dict(num_classes=0), "text": dict(num_classes=0, text_dim=384)}
    model = DiT(DiTConfig(**TINY, **extra[task])).eval()
    with torch.no_grad():  # DiT zero-inits its output layers: randomise them so images depend on the input
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


def make_patch_bytes(base: DiT, base_name: str, seed: int, **kw) -> bytes:
    """A random (non-zero) DMP patch for `base`, as file bytes."""
    torch.manual_seed(seed)
    patch = new_patch_for(base, **kw)
    with torch.no_grad():
        for p in patch.parameters():
            p.normal_(0, 0.5)
    return patch_to_bytes(patch, **patch_metadata_for(base, base_name))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """models/ with a class base `digits`, an uncond base `blobs`, a text base `captions`; patches/ with one each."""
    root = tmp_path_factory.mktemp("served")
    models, patches = root / "models", root / "patches"
    bases = {}
    for i, (name, task) in enumerate([("digits", "class"), ("blobs", "uncond"), ("captions", "text")]):
        model = tiny_base(task, seed=i)
        meta = dict(BASE_META, name=name, task=task, text_encoder="minilm" if task == "text" else "")
        if task == "class":
            meta["labels"] = json.dumps([str(d) for d in range(10)])
        save_base(model, models / f"{name}.safetensors", **meta)
        bases[name] = model
        patches.mkdir(parents=True, exist_ok=True)
        (patches / f"{name}-dmp.safetensors").write_bytes(make_patch_bytes(model, name, seed=100 + i))
    return {"models": models, "patches": patches, "bases": bases}


@pytest.fixture(scope="session")
def class_only_dirs(tmp_path_factory, tiny_dirs):
    """Just the class base (fast to load, no text encoder) and its patch."""
    root = tmp_path_factory.mktemp("classonly")
    (root / "models").mkdir()
    (root / "patches").mkdir()
    shutil.copy(tiny_dirs["models"] / "digits.safetensors", root / "models")
    shutil.copy(tiny_dirs["patches"] / "digits-dmp.safetensors", root / "patches")
    return {"models": root / "models", "patches": root / "patches", "bases": {"digits": tiny_dirs["bases"]["digits"]}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free port in a temp dir, no persistence; can be killed and restarted."""

    def __init__(self, workdir: Path):
        self.workdir, self.port, self.proc = workdir, free_port(), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server per test (skipped only if the binary is missing)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


class ServerProcess:
    """`python -m app serve` in a subprocess on a free port."""

    def __init__(self, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DMP_")} | env
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(self.port)], cwd=REPO,
                                     env=full_env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(**DMP settings) -> a ready ServerProcess; all are killed at the end."""
    started = []

    def start(wait: bool = True, **settings) -> ServerProcess:
        env = {f"DMP_{k.upper()}": str(v) for k, v in settings.items()}
        server = ServerProcess(env, tmp_path / f"server{len(started)}.log")
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def copy_dirs(dirs: dict, dest: Path) -> dict:
    """A private copy of models/ and patches/ (uploads write into patches/)."""
    shutil.copytree(dirs["models"], dest / "models")
    shutil.copytree(dirs["patches"], dest / "patches")
    return {"models": dest / "models", "patches": dest / "patches", "bases": dirs["bases"]}


def wait_ready(client, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = client.get("/health/ready")
        if r.status_code == 200:
            return
        assert r.json()["error_type"] in ("not_ready", "registry_unavailable"), r.json()
        time.sleep(0.1)
    raise TimeoutError(client.get("/health/ready").json())


def asgi_client(dirs: dict, **settings):
    """A TestClient (httpx over ASGI, lifespan run) for an app on `dirs`; use as a context manager."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app
    from app.core.config import Settings

    app = create_app(Settings(model_dir=dirs["models"], patch_dir=dirs["patches"], **settings))
    return TestClient(app)


def batched_forwards(client, model: str = "digits") -> tuple[float, float]:
    """(batched forwards, images in them) so far for base `model`, from /metrics."""
    text = client.get("/metrics").text
    get = lambda key: sum(float(line.split()[-1]) for line in text.splitlines()  # noqa: E731
                          if line.startswith(key) and f'model="{model}"' in line)
    return get("dmp_batch_size_count"), get("dmp_batch_size_sum")


def poll(fn, timeout: float, every: float = 0.05) -> bool:
    """Whether `fn()` turned true within `timeout` seconds (asked every `every` s)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if fn():
            return True
        time.sleep(every)
    return False


@contextmanager
def admin_client(dirs: dict, dest: Path, **settings):
    """A ready app with admin token ADMIN_TOKEN on a private copy of `dirs` at `dest` (the copy is `.dirs`)."""
    copy = copy_dirs(dirs, dest)
    with asgi_client(copy, admin_token=ADMIN_TOKEN, **settings) as c:
        wait_ready(c)
        c.dirs = copy
        yield c


@pytest.fixture(scope="module")
def client(tiny_dirs, tmp_path_factory):
    """The three tiny bases behind one app, admin token ADMIN_TOKEN; shared by a test module (read-mostly)."""
    with admin_client(tiny_dirs, tmp_path_factory.mktemp("client"), max_patch_bytes=16384) as c:
        yield c


def with_header(data: bytes, change) -> bytes:
    """A safetensors file with its JSON header rewritten by `change(header) -> header or raw JSON bytes`."""
    (n,) = struct.unpack("<Q", data[:8])
    header = change(json.loads(data[8:8 + n]))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


# Headers a red-team pass sent: metadata that is not safetensors' {str: str}, and a header nested 100k deep.
BAD_HEADERS = {
    "list_value": lambda h: h | {"__metadata__": h["__metadata__"] | {"domain": [1, 2]}},
    "number_value": lambda h: h | {"__metadata__": h["__metadata__"] | {"pt_depth": 2}},
    "metadata_list": lambda h: h | {"__metadata__": [1]},
    "metadata_string": lambda h: h | {"__metadata__": "dmp-patch"},
    "deeply_nested": lambda h: b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}
