"""Patch-aware routing: two real replicas behind the real HAProxy with deploy/haproxy/haproxy.cfg. Requests for one
patch land on one replica (its swap-in counter moves, the other's does not) with nothing but the patch in the body
(/generate's `patch`, a composition's first name, /v1's `model` from the real openai client), or the X-DMP-Patch
header when the body names none; load still spreads: different patches go to both, requests for no patch go round
robin, and a burst for one hot patch overflows. The router keeps /metrics internal and caps bodies."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import REPO, copy_dirs, free_port, make_patch_bytes
from prometheus_client.parser import text_string_to_metric_families

PATCHES = [f"tenant-{i}" for i in range(8)]


def series(url: str, metric: str, label: str = "patch") -> dict[str, float]:
    """label value -> value of one counter of a replica (summed over its other labels)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for s in (s for f in text_string_to_metric_families(text) for s in f.samples if s.name == metric):
        out[s.labels[label]] = out.get(s.labels[label], 0) + s.value
    return out


@pytest.fixture
def haproxy(tmp_path):
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.skip("haproxy is not installed (apt-get install -y haproxy)")
    procs = []

    def start(replicas: list[str]) -> str:
        port = free_port()
        env = os.environ | {"DMP_LB_BIND": f"127.0.0.1:{port}", "DMP_REPLICA_1": replicas[0],
                            "DMP_REPLICA_2": replicas[1]}
        procs.append(subprocess.Popen([binary, "-db", "-f", str(REPO / "deploy/haproxy/haproxy.cfg")], env=env,
                                      stdout=open(tmp_path / "haproxy.log", "wb"), stderr=subprocess.STDOUT))
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.kill()
        p.wait()
    log = tmp_path / "haproxy.log"
    if log.exists():  # shown only when the test fails: an unexplained ConnectError through the router was seen once
        print(log.read_text()[-4000:])


def test_one_patch_one_replica_and_load_still_spreads(class_only_dirs, tmp_path, start_server, haproxy):
    digits = class_only_dirs["bases"]["digits"]
    replicas = []
    for r in range(2):
        dirs = copy_dirs(class_only_dirs, tmp_path / f"replica{r}")
        for i, name in enumerate(PATCHES):
            (dirs["patches"] / f"{name}.safetensors").write_bytes(make_patch_bytes(digits, "digits", seed=500 + i))
        replicas.append(start_server(model_dir=dirs["models"], patch_dir=dirs["patches"], patch_slots=3,
                                     torch_threads=1, max_batch=4))
    router = haproxy([s.url.removeprefix("http://") for s in replicas])

    def generate(patch: str | None, steps: int = 2) -> None:  # no X-DMP-Patch header: the router reads the body
        r = httpx.post(router + "/generate", json={"patch": patch, "class_label": 1, "steps": steps}, timeout=60)
        assert r.status_code == 200, r.text

    end = time.monotonic() + 30  # health checks mark both replicas up; round robin then reaches both
    while not all(series(s.url, "dmp_images_generated_total").get("base") for s in replicas):
        assert time.monotonic() < end, "requests without X-DMP-Patch did not reach both replicas"
        try:
            generate(None)
        except httpx.HTTPError:
            time.sleep(0.2)

    for _ in range(3):
        for name in PATCHES:
            generate(name)
    images = [series(s.url, "dmp_images_generated_total") for s in replicas]
    swaps = [series(s.url, "dmp_patch_swap_ins_total") for s in replicas]
    owners = {}
    for name in PATCHES:
        served = [i.get(name, 0) for i in images]
        assert sorted(served) == [0, 3], (name, served)  # every request for a patch on one replica
        owners[name] = served.index(3)
        assert swaps[owners[name]].get(name, 0) >= 1 and swaps[1 - owners[name]].get(name, 0) == 0
    assert set(owners.values()) == {0, 1}  # different patches are spread over both

    # the real openai client names the patch only as `model`; the header alone routes a body without a patch (its
    # base images land on the patch's owner); a composition routes by its first patch
    oai = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0)
    before = [series(s.url, "dmp_images_generated_total") for s in replicas]
    calls = [series(s.url, "dmp_requests_total", "route").get("/generate", 0) for s in replicas]
    for name in PATCHES:
        oai.images.generate(model=name, prompt="1", extra_body={"steps": 2})
        r = httpx.post(router + "/generate", json={"class_label": 1, "steps": 2}, headers={"X-DMP-Patch": name})
        assert r.status_code == 200, r.text
        r = httpx.post(router + "/generate", json={"patches": [{"name": name, "scale": 1.0}], "class_label": 1,
                                                   "steps": 2})
        assert r.status_code == 200, r.text
    after = [series(s.url, "dmp_images_generated_total") for s in replicas]
    for name in PATCHES:
        gain = [a.get(name, 0) - b.get(name, 0) for a, b in zip(after, before, strict=True)]
        assert gain[owners[name]] == 2, (name, gain)  # `model=` and the composition, both on the patch's replica
    base_gain = [a.get("base", 0) - b.get("base", 0) for a, b in zip(after, before, strict=True)]
    assert base_gain == [sum(1 for o in owners.values() if o == r) for r in range(2)]
    composed = [series(s.url, "dmp_requests_total", "route").get("/generate", 0) - c
                for s, c in zip(replicas, calls, strict=True)]
    assert composed == [2 * sum(1 for o in owners.values() if o == r) for r in range(2)]  # header + composition

    assert httpx.get(router + "/metrics").status_code == 404 and httpx.get(router + "/%6detrics").status_code == 404
    assert httpx.post(router + "/generate", content=b"{" + b" " * 300_000 + b"}").status_code == 413

    hot = PATCHES[0]
    before = [i.get(hot, 0) for i in images]
    with ThreadPoolExecutor(8) as pool:  # more in flight than one replica's fair share: bounded load overflows
        list(pool.map(lambda _: generate(hot, steps=30), range(16)))
    after = [series(s.url, "dmp_images_generated_total").get(hot, 0) for s in replicas]
    assert after[1 - owners[hot]] > before[1 - owners[hot]]  # the other replica took part of the burst
    assert after[owners[hot]] - before[owners[hot]] > 16 / 2  # ... but the owner took most of it


ROUTING = ("option http-buffer-request", "http-request set-var", "http-request deny", "acl ", "timeout ",
           "balance hash var(txn.patch)", "hash-type consistent", "hash-balance-factor",
           "option httpchk GET /health/ready")


def test_compose_and_k8s_routers_are_valid_and_route_alike(tmp_path):
    """`haproxy -c` accepts both configs and they carry the same routing lines; `nginx -t` accepts its config."""
    import yaml

    if shutil.which("haproxy") is None or shutil.which("nginx") is None:
        pytest.skip("haproxy or nginx is not installed")
    compose = (REPO / "deploy/haproxy/haproxy.cfg").read_text()
    router = next(d for d in yaml.safe_load_all((REPO / "deploy/k8s/router.yaml").read_text())
                  if d["kind"] == "ConfigMap")["data"]["haproxy.cfg"]
    k8s = tmp_path / "k8s.cfg"
    k8s.write_text(router.replace("dmp-server-pods.dmp.svc.cluster.local", "localhost"))  # resolvable here
    local = os.environ | {"DMP_REPLICA_1": "127.0.0.1:1", "DMP_REPLICA_2": "127.0.0.1:2"}  # compose names don't resolve
    for cfg in (REPO / "deploy/haproxy/haproxy.cfg", k8s):
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, env=local)
        assert check.returncode == 0, check.stdout + check.stderr

    def lines(text):
        return {line.split("  #")[0].strip() for line in text.splitlines() if line.strip().startswith(ROUTING)}
    assert lines(compose) == lines(router)
    assert all(any(line.startswith(r) for line in lines(compose)) for r in ROUTING)
    nginx = tmp_path / "nginx.conf"
    nginx.write_text((REPO / "deploy/nginx/nginx.conf").read_text().replace("dmp-1:8000", "127.0.0.1:1")
                     .replace("dmp-2:8000", "127.0.0.1:2"))
    check = subprocess.run(["nginx", "-t", "-c", str(nginx), "-p", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_router_ends_requests_whose_head_never_completes(haproxy):
    """Slowloris: uvicorn has no header timeout, so the router's `timeout http-request` (10 s) must end them."""
    import socket

    router = haproxy(["127.0.0.1:1", "127.0.0.1:2"])  # no replica is needed: the head never completes
    host, port = router.removeprefix("http://").split(":")
    end = time.monotonic() + 10
    while True:  # the router is listening
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < end
            time.sleep(0.1)
    slow = []
    for _ in range(20):
        s = socket.create_connection((host, int(port)), timeout=20)
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and then nothing more
        slow.append(s)
    started = time.monotonic()
    answers = [s.recv(200) for s in slow]  # blocks until the router answers and closes
    took = time.monotonic() - started
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:2]
    assert 8 < took < 15, took
    for s in slow:
        s.close()
