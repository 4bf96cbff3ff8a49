"""Writes lost across Redis restarts (issue 25 item 3): two real server replicas on one real redis-server; each trial
restarts Redis empty, at once PUTs a new version (odd trials) or DELETEs the name (even trials) through replica A,
waits 6 s and checks what both replicas serve. No timing is forced: the replicas refill Redis when they notice.

    PYTHONPATH=. python tests/bench/redis_restart_writes.py [--trials 10] [--repo PATH-OF-THE-CODE-TO-TEST]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ADMIN_TOKEN, RedisServer, free_port, make_patch_bytes, tiny_base

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/octet-stream"}


SERVERS: list[subprocess.Popen] = []


def serve(repo: Path, env: dict, log: Path) -> str:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("DMP_")} | env | {"PYTHONPATH": str(repo)}
    SERVERS.append(subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port)], cwd=repo, env=full,
                     stdout=open(log, "wb"), stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(log.read_text()[-2000:])


def version(url: str, name: str):
    r = httpx.get(f"{url}/patches/{name}", timeout=5)
    return r.json()["version"] if r.status_code == 200 else None


def until(fn, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    args = p.parse_args()
    from app.model import save_base

    work = Path(tempfile.mkdtemp(prefix="dmp-restart-"))
    (work / "models").mkdir()
    base = tiny_base("class", seed=0)
    save_base(base, work / "models" / "digits.safetensors", name="digits", task="class", vae="pixel",
              default_sampler="ddim", default_steps="3", default_guidance="1.0", beta_schedule="linear",
              clip_sample="true", labels='["0","1","2","3","4","5","6","7","8","9"]')
    redis_server = RedisServer(work)
    redis_server.start()
    env = {"DMP_MODEL_DIR": str(work / "models"), "DMP_REDIS_URL": redis_server.url, "DMP_WARMUP": "false",
           "DMP_ADMIN_TOKEN": ADMIN_TOKEN}
    a, b = (serve(args.repo, env | {"DMP_PATCH_DIR": str(work / f"p{i}")}, work / f"r{i}.log") for i in range(2))
    lost, seed = [], 0
    try:
        for trial in range(1, args.trials + 1):
            seed += 1
            first = httpx.put(a + "/patches/x", content=make_patch_bytes(base, "digits", seed), headers=AUTH)
            assert until(lambda first=first: version(b, "x") == first.json()["version"], 10), "b never saw the upload"
            redis_server.kill()
            redis_server.start()
            delete = trial % 2 == 0
            seed += 1
            data = make_patch_bytes(base, "digits", seed)

            def write(delete=delete, data=data):
                r = httpx.delete(a + "/patches/x", headers=AUTH) if delete else \
                    httpx.put(a + "/patches/x", content=data, headers=AUTH)
                return r.status_code == 200 and r
            reply = until(write, 10)
            want = None if delete else reply.json()["version"]
            time.sleep(6)
            seen = (version(a, "x"), version(b, "x"))
            ok = seen == (want, want)
            lost += [] if ok else [trial]
            print(f"trial {trial}: {'DELETE' if delete else 'PUT'} acknowledged; want {want}, replicas serve {seen}"
                  f" -> {'kept' if ok else 'LOST'}", flush=True)
            if delete or not ok:
                httpx.delete(a + "/patches/x", headers=AUTH)
    finally:
        for server in SERVERS:
            server.kill()
        redis_server.kill()
    print(f"writes lost: {len(lost)} of {args.trials} trials {lost} (code: {args.repo})")


if __name__ == "__main__":
    main()
