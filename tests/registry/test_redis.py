"""Redis-backed registry with real redis-server and real server processes: replicas, Redis loss, result cache."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import ADMIN_TOKEN, asgi_client, copy_dirs, make_patch_bytes, wait_ready

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/octet-stream"}
pytestmark = pytest.mark.redis


def poll(fn, timeout: float, every: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(every)
    return None


def test_two_replicas_see_each_others_uploads(start_server, redis_server, class_only_dirs, tmp_path):
    common = dict(model_dir=class_only_dirs["models"], redis_url=redis_server.url, admin_token=ADMIN_TOKEN)
    a = start_server(patch_dir=class_only_dirs["patches"], **common)
    b = start_server(patch_dir=tmp_path / "empty", **common)  # starts later, has no files: loads all from Redis
    assert httpx.get(b.url + "/patches/digits-dmp").json()["state"] == "ready"
    digits = class_only_dirs["bases"]["digits"]
    for src, dst, seed in ((a, b, 1), (b, a, 2)):
        data = make_patch_bytes(digits, "digits", seed=seed)
        version = httpx.put(src.url + "/patches/shared", content=data, headers=AUTH).json()["version"]
        t0 = time.monotonic()
        seen = poll(lambda dst=dst, version=version:
                    httpx.get(dst.url + "/patches/shared").json().get("version") == version, 1.0)
        assert seen, f"replica did not load version {version} within a second"
        body = {"patch": "shared", "class_label": 3, "steps": 2, "seed": 4}
        r_src, r_dst = (httpx.post(s.url + "/generate", json=body).json() for s in (src, dst))
        assert r_src["images"] == r_dst["images"] and r_dst["patch"]["version"] == version
        print(f"replica saw the upload after {1000 * (time.monotonic() - t0):.0f} ms")
    assert httpx.delete(a.url + "/patches/shared", headers=AUTH).status_code == 200
    assert poll(lambda: httpx.get(b.url + "/patches/shared").status_code == 404, 1.0)


def test_redis_killed_and_restarted_mid_load(start_server, redis_server, class_only_dirs):
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"],
                          redis_url=redis_server.url, admin_token=ADMIN_TOKEN, redis_timeout=0.5)
    codes, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            r = httpx.post(server.url + "/generate", json={"patch": "digits-dmp", "class_label": 2, "steps": 3},
                           timeout=30)
            codes.append(r.status_code)

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(1)
    redis_server.kill()
    down = poll(lambda: httpx.get(server.url + "/health/ready", timeout=5).status_code == 503, 10)
    assert down, "ready stayed 200 with Redis gone"
    assert httpx.get(server.url + "/health/ready").json()["error_type"] == "registry_unavailable"
    assert httpx.get(server.url + "/health/live", timeout=5).status_code == 200
    time.sleep(1)
    redis_server.start()  # same port, empty (no persistence): the replica refills it
    up = poll(lambda: httpx.get(server.url + "/health/ready", timeout=5).status_code == 200, 15)
    stop.set()
    worker.join(30)
    assert up, "ready did not recover without a restart"
    assert codes and set(codes) == {200}, sorted(set(codes))  # patches stay installed: serving never stopped
    assert httpx.get(server.url + "/patches/digits-dmp").json()["state"] == "ready"
    import redis

    assert redis.Redis.from_url(redis_server.url).hget("dmp:patch-versions", "digits-dmp")


def test_result_cache(redis_server, class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    with asgi_client(dirs, redis_url=redis_server.url, cache_ttl=60, admin_token=ADMIN_TOKEN) as c:
        wait_ready(c)
        body = {"patch": "digits-dmp", "class_label": 6, "steps": 3, "seed": 8}
        first, second = c.post("/generate", json=body).json(), c.post("/generate", json=body).json()
        assert not first["cached"] and second["cached"] and first["images"] == second["images"]
        unseeded = [c.post("/generate", json=body | {"seed": None}).json() for _ in range(2)]
        assert not any(u["cached"] for u in unseeded)
        new = make_patch_bytes(class_only_dirs["bases"]["digits"], "digits", seed=50)
        assert c.put("/patches/digits-dmp", content=new, headers=AUTH).status_code == 200
        third = c.post("/generate", json=body).json()  # a new patch version is a new key
        assert not third["cached"] and third["images"] != first["images"]
        metrics = c.get("/metrics").text
        assert 'dmp_result_cache_total{outcome="hit"} 1.0' in metrics
        # the hit generated nothing: counted apart, not as an image or a 0 s latency
        patched = 'model="digits",patch="digits-dmp"'
        assert f"dmp_images_cached_total{{{patched}}} 1.0" in metrics
        assert f"dmp_images_generated_total{{{patched}}} 4.0" in metrics
        assert f"dmp_generate_seconds_count{{{patched}}} 4.0" in metrics


def test_hung_redis_never_hangs_a_probe(redis_server, class_only_dirs, tmp_path):
    """A Redis that stops answering (SIGSTOP, connection kept open) turns ready to 503 within the timeout."""
    import signal

    dirs = copy_dirs(class_only_dirs, tmp_path)
    with asgi_client(dirs, redis_url=redis_server.url, redis_timeout=0.3, warmup=False) as c:
        wait_ready(c)
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            assert poll(lambda: c.get("/health/ready").status_code == 503, 2)  # no hung Redis call behind a probe
            assert c.get("/health/ready").json()["error_type"] == "registry_unavailable"
            gen = c.post("/generate", json={"patch": "digits-dmp", "class_label": 1, "steps": 2, "seed": 1})
            assert gen.status_code == 200  # installed patches keep serving
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        assert poll(lambda: c.get("/health/ready").status_code == 200, 10)
