"""The gates routes never stall a replica: bounded work, off the event loop, admitted, keyed, cached by bytes, and
captions drawn as plain text."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import BASE_META, TINY, asgi_client, copy_dirs, make_patch_bytes, wait_ready

from app.model import DiT, DiTConfig, save_base

KEY = "sk-gates-0123456789abcdef"


@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory):
    """A class base with 6 blocks x 64 prompts (the issue's 6 x T x 64 maps) and its patch."""
    root = tmp_path_factory.mktemp("wide")
    (root / "models").mkdir()
    (root / "patches").mkdir()
    model = DiT(DiTConfig(**(TINY | dict(input_size=16, depth=6)), num_classes=10)).eval()
    save_base(model, root / "models" / "wide.safetensors", **(BASE_META | dict(name="wide", task="class")))
    (root / "patches" / "wide-dmp.safetensors").write_bytes(make_patch_bytes(model, "wide", seed=3))
    return {"models": root / "models", "patches": root / "patches"}


def probe(client: httpx.Client) -> float:
    """Seconds /health/live took to answer, after a short pause."""
    time.sleep(0.05)
    t0 = time.perf_counter()
    assert client.get("/health/live", timeout=60).status_code == 200
    return time.perf_counter() - t0


def test_probes_stay_fast_with_many_gates_requests_in_flight(start_server, wide_dirs):
    """20 gates GETs in flight (half over the cap, half at it, all distinct): /health/live answers at once."""
    server = start_server(model_dir=wide_dirs["models"], patch_dir=wide_dirs["patches"], warmup="false")
    cap = 65536 // (6 * 64)  # DMP_GATE_MAX_VALUES // (blocks x prompts)
    queries = [{"timesteps": 1000 - i, "class_label": i % 10} for i in range(10)]
    queries += [{"timesteps": cap - i, "class_label": i % 10} for i in range(10)]
    url = server.url + "/patches/wide-dmp/gates"
    # clients made before timing: each new httpx client loads the CA bundle (~65 ms of this process's GIL), and 20 made
    # at once in this process delayed the first probe by 2 s on the client side
    with httpx.Client(base_url=server.url) as prober, httpx.Client() as getter:
        idle = [probe(prober) for _ in range(10)]  # this machine's own latency (shared CPUs are slow)
        with ThreadPoolExecutor(len(queries)) as pool:
            replies = [pool.submit(getter.get, url, params=q, timeout=120) for q in queries]
            probes = []
            while not all(r.done() for r in replies):
                probes.append(probe(prober))
        codes = [r.result().status_code for r in replies]
    assert probes and max(probes) < 1.0 + 2 * max(idle), (idle, probes)
    assert codes == [422] * 10 + [200] * 10, codes
    over = replies[0].result().json()
    assert over["error_type"] == "invalid_request" and f"at most {cap}" in over["error"]
    body = replies[10].result().content
    assert len(json.loads(body)["weights"][0]) == cap
    assert len(body) < 8 * 6 * cap * 64 + 1000  # compact: at most 7 characters and a comma per weight


@pytest.fixture(scope="module")
def keyed(class_only_dirs, tmp_path_factory):
    dirs = copy_dirs(class_only_dirs, tmp_path_factory.mktemp("gkeys"))
    with asgi_client(dirs, api_keys=f"gates:{KEY}", warmup=False, gate_cache_bytes=60_000) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("path", ["/patches/digits-dmp/gates", "/patches/digits-dmp/gates.png"])
def test_keyed_server_refuses_unauthenticated_gates(keyed, path):
    r = keyed.get(path, params={"timesteps": 3})
    assert r.status_code == 401 and r.json()["error_type"] == "missing_api_key"
    r = keyed.get(path, params={"timesteps": 3}, headers={"Authorization": "Bearer sk-wrong-0123456789"})
    assert r.status_code == 401
    r = keyed.get(path, params={"timesteps": 3}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200


def test_cache_is_bounded_in_bytes(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    for label in range(10):
        for timesteps in (200, 300, 400):
            r = keyed.get("/patches/digits-dmp/gates", params={"class_label": label, "timesteps": timesteps},
                          headers=auth)
            assert r.status_code == 200
    maps = keyed.app.state.gate_maps
    assert 0 < len(maps.cache) < 30
    assert maps.cached_bytes == sum(e.nbytes for e, _ in maps.cache.values()) <= 60_000


def test_gates_are_admitted_like_generations(class_only_dirs, tmp_path_factory):
    """With DMP_MAX_QUEUE places all taken, a gates request that must compute is refused with 429."""
    dirs = copy_dirs(class_only_dirs, tmp_path_factory.mktemp("gqueue"))
    with asgi_client(dirs, warmup=False, max_queue=1) as c:
        wait_ready(c)
        engine = c.app.state.engine
        with engine.admission():
            r = c.get("/patches/digits-dmp/gates", params={"timesteps": 4})
        assert r.status_code == 429 and r.json()["error_type"] == "overloaded" and "Retry-After" in r.headers
        assert c.get("/patches/digits-dmp/gates", params={"timesteps": 4}).status_code == 200


@pytest.mark.parametrize("caption", ["$\\frac{$", "$$", "{" * 400 + "}" * 400, "$" + "{" * 400 + "$",
                                     "$x^2$ and $\\alpha$"])
def test_captions_are_drawn_as_plain_text(client, caption):
    r = client.get("/patches/captions-dmp/gates.png", params={"caption": caption, "timesteps": 4})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
