"""POST /generate through the ASGI app: every task kind, formats, raw PNG, determinism alone vs in a batch."""
from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.conftest import batched_forwards


def image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("body", [
    {"model": "digits", "class_label": 3},
    {"model": "digits", "class_label": 3, "patch": "digits-dmp", "guidance_scale": 2.0},
    {"model": "blobs"},
    {"patch": "blobs-dmp"},
    {"model": "captions", "caption": "a small grey cat"},
    {"model": "captions", "caption": "a small grey cat", "patch": "captions-dmp", "sampler": "dpm"},
])
def test_every_task_kind(client, body):
    r = client.post("/generate", json=body | {"steps": 2, "seed": 5, "num_images": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["images"]) == 2 and out["seed"] == 5
    assert out["model"] == body.get("model", body.get("patch", "").removesuffix("-dmp"))
    if "patch" in body:
        assert out["patch"]["name"] == body["patch"] and len(out["patch"]["version"]) == 16
    else:
        assert out["patch"] is None
    assert set(out["timings"]) == {"queue_ms", "sample_ms", "decode_ms"}
    img = image(out["images"][0])
    assert img.format == "PNG" and img.size == (8, 8)


def test_patch_changes_the_image(client):
    body = {"model": "digits", "class_label": 1, "steps": 3, "seed": 9}
    plain = client.post("/generate", json=body).json()["images"][0]
    patched = client.post("/generate", json=body | {"patch": "digits-dmp"}).json()["images"][0]
    assert plain != patched


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client, fmt, pil):
    r = client.post("/generate", json={"model": "blobs", "steps": 2, "seed": 1, "output_format": fmt})
    assert r.status_code == 200
    assert image(r.json()["images"][0]).format == pil


def test_raw_png_with_accept_header_and_request_id(client):
    body = {"model": "digits", "class_label": 7, "steps": 2, "seed": 11}
    r = client.post("/generate", json=body, headers={"Accept": "image/png", "X-Request-ID": "abc-123"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-request-id"] == "abc-123" and r.headers["x-seed"] == "11"
    as_json = client.post("/generate", json=body).json()["images"][0]
    assert base64.b64decode(as_json) == r.content
    assert client.get("/models").headers["x-request-id"]  # generated when not sent


def test_seed_reproduces_and_differs(client):
    body = {"model": "digits", "class_label": 2, "steps": 3}
    a = client.post("/generate", json=body | {"seed": 1}).json()
    b = client.post("/generate", json=body | {"seed": 1}).json()
    c = client.post("/generate", json=body | {"seed": 2}).json()
    assert a["images"] == b["images"] and a["images"] != c["images"]
    unseeded = client.post("/generate", json=body).json()
    assert isinstance(unseeded["seed"], int)


def test_same_pixels_alone_and_in_a_batch(client):
    """The request's image must not depend on its batch-mates (other patches, steps, samplers, seeds)."""
    probe = {"model": "digits", "class_label": 4, "steps": 6, "seed": 123, "patch": "digits-dmp"}
    alone = client.post("/generate", json=probe).json()["images"]
    before = batched_forwards(client)
    mates = [{"model": "digits", "class_label": i % 10, "steps": 6 + i % 5, "seed": i, "num_images": 1 + i % 2,
              "sampler": ["ddim", "ddpm", "dpm"][i % 3], **({"patch": "digits-dmp"} if i % 2 else {})}
             for i in range(10)]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(client.post, "/generate", json=m) for m in mates[:5]]
        probes = [pool.submit(client.post, "/generate", json=probe) for _ in range(2)]
        futures += [pool.submit(client.post, "/generate", json=m) for m in mates[5:]]
        assert all(f.result().status_code == 200 for f in futures)
        in_batch = [p.result().json()["images"] for p in probes]
    assert all(images == alone for images in in_batch)
    count, total = batched_forwards(client)
    assert total - before[1] > count - before[0], "requests never shared a forward: the test proves nothing"



def test_models_describe_enough_to_build_a_patch(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"digits", "blobs", "captions"}
    assert models["digits"]["task"] == "class" and models["digits"]["num_classes"] == 10
    assert models["blobs"]["task"] == "uncond" and models["captions"]["task"] == "text"
    d = models["digits"]
    assert (d["hidden_size"], d["depth"], d["num_tokens"], d["image_size"]) == (32, 2, 16, 8)
    assert len(d["fingerprint"]) == 64 and d["default_sampler"] == "ddim" and d["default_steps"] == 3
    assert d["patches"] == ["digits-dmp"]


def test_health_metrics_and_ui(client):
    assert client.get("/health/live").json() == {"status": "live", "detail": None}
    assert client.get("/health/ready").status_code == 200
    assert client.post("/generate", json={"model": "blobs", "steps": 2, "seed": 1}).status_code == 200  # a series
    text = client.get("/metrics").text
    for name in ("dmp_requests_total", "dmp_queue_seconds", "dmp_sample_seconds", "dmp_decode_seconds",
                 "dmp_generate_seconds", "dmp_queue_depth", "dmp_batch_size", "dmp_batch_occupancy",
                 "dmp_images_generated_total", "dmp_patch_slots_in_use", "dmp_patch_installs_total"):
        assert name in text
    assert 'route="/generate"' in text
    r = client.get("/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/ui/"
    assert client.get("/ui/").status_code == 200


def test_deadline_drops_the_work(class_only_dirs, tmp_path):
    from conftest import asgi_client, copy_dirs, wait_ready

    with asgi_client(copy_dirs(class_only_dirs, tmp_path), request_timeout=0.1, warmup=False) as c:
        wait_ready(c)
        r = c.post("/generate", json={"class_label": 1, "steps": 1000, "num_images": 8, "seed": 1})
        assert r.status_code == 503 and r.json()["error_type"] == "deadline_exceeded"
        dropped = lambda: sum(float(line.split()[-1]) for line in c.get("/metrics").text.splitlines()  # noqa: E731
                              if line.startswith('dmp_requests_dropped_total{reason="deadline"}'))
        end = time.monotonic() + 5
        while dropped() < 1:  # the runner stops the work, counted as a deadline cut even if the handler gave up first
            assert time.monotonic() < end
            time.sleep(0.05)
        assert c.post("/generate", json={"class_label": 1, "steps": 2, "seed": 1}).status_code == 200


def test_cpu_compiled_step_serves_the_eager_pixels(class_only_dirs, tmp_path):
    """DMP_CPU_COMPILE: compiled bucket steps (fp32 here; GEMMs autotuned, the default) give the eager service's
    images, and say so in /metrics."""
    import numpy as np
    from conftest import asgi_client, copy_dirs, wait_ready

    # one image, one bucket: each autotuned bucket takes ~a minute to compile on 2 cores
    body = {"model": "digits", "class_label": 3, "patch": "digits-dmp", "guidance_scale": 2.0, "steps": 3,
            "seed": 42, "num_images": 1, "sampler": "ddpm"}
    pixels = {}
    for compiled in (False, True):
        dirs = copy_dirs(class_only_dirs, tmp_path / str(compiled))
        with asgi_client(dirs, cpu_compile=compiled, max_batch=1, device="cpu", warm_compositions=False) as c:
            wait_ready(c, timeout=300)
            r = c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            pixels[compiled] = [np.asarray(image(b)).astype(int) for b in r.json()["images"]]
            graphs = [line for line in c.get("/metrics").text.splitlines()
                      if line.startswith("dmp_cuda_graph_forwards") and 'kind="graphs"' in line]
            # the one bucket's graph served it
            assert graphs == (['dmp_cuda_graph_forwards{kind="graphs",model="digits"} 1.0'] if compiled else [])
    for eager, comp in zip(pixels[False], pixels[True], strict=True):
        assert np.abs(eager - comp).max() <= 1
