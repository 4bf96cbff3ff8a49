"""Patch-aware routing: two real replicas behind the real HAProxy with deploy/haproxy/haproxy.cfg. Requests for one
patch land on one replica (its swap-in counter moves, the other's does not) while load still spreads: different
patches go to both, requests without the header go round robin, and a burst for one hot patch overflows."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, copy_dirs, free_port, make_patch_bytes

PATCHES = [f"tenant-{i}" for i in range(8)]


def series(url: str, metric: str) -> dict[str, float]:
    """patch label -> value of one per-patch counter of a replica."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.labels["patch"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == metric}


@pytest.fixture
def haproxy(tmp_path):
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.skip("haproxy is not installed (apt-get install -y haproxy)")
    procs = []

    def start(replicas: list[str]) -> str:
        port = free_port()
        env = os.environ | {"DMP_LB_BIND": f"127.0.0.1:{port}", "DMP_REPLICA_1": replicas[0], "DMP_REPLICA_2": replicas[1]}
        procs.append(subprocess.Popen([binary, "-db", "-f", str(REPO / "deploy/haproxy/haproxy.cfg")], env=env,
                                      stdout=open(tmp_path / "haproxy.log", "wb"), stderr=subprocess.STDOUT))
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.kill()
        p.wait()


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

    def generate(patch: str | None, steps: int = 2) -> None:
        headers = {"X-DMP-Patch": patch} if patch else {}
        r = httpx.post(router + "/generate", json={"patch": patch, "class_label": 1, "steps": steps},
                       headers=headers, timeout=60)
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

    hot = PATCHES[0]
    before = [i.get(hot, 0) for i in images]
    with ThreadPoolExecutor(8) as pool:  # more in flight than one replica's fair share: bounded load overflows
        list(pool.map(lambda _: generate(hot, steps=30), range(16)))
    after = [series(s.url, "dmp_images_generated_total").get(hot, 0) for s in replicas]
    assert after[1 - owners[hot]] > before[1 - owners[hot]]  # the other replica took part of the burst
    assert after[owners[hot]] - before[owners[hot]] > 16 / 2  # ... but the owner took most of it


ROUTING = ("balance hdr(X-DMP-Patch)", "hash-type consistent", "hash-balance-factor", "option httpchk GET /health/ready")


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
    lines = lambda text: {line.split("#")[0].strip() for line in text.splitlines()
                          if line.strip().startswith(tuple(r.split(" (")[0] for r in ROUTING))}
    assert lines(compose) == lines(router) and len(lines(compose)) == len(ROUTING)
    nginx = tmp_path / "nginx.conf"
    nginx.write_text((REPO / "deploy/nginx/nginx.conf").read_text().replace("dmp-1:8000", "127.0.0.1:1")
                     .replace("dmp-2:8000", "127.0.0.1:2"))
    check = subprocess.run(["nginx", "-t", "-c", str(nginx), "-p", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
