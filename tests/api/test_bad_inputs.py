"""A table of bad requests: each gets a 4xx with {error, error_type}, never a 500."""
from __future__ import annotations

import pytest

BAD_GENERATE = [
    ("class_label names no class", {"model": "digits", "class_label": "three"}, 400),  # names: docs/design.md §4b
    ("class_label is an empty name", {"model": "digits", "class_label": ""}, 422),
    ("class_label is a float", {"model": "digits", "class_label": 3.5}, 422),
    ("class_label is a bool", {"model": "digits", "class_label": True}, 422),
    ("class_label out of range", {"model": "digits", "class_label": 10}, 422),
    ("negative class_label", {"model": "digits", "class_label": -1}, 422),
    ("no class_label on a class model", {"model": "digits"}, 422),
    ("caption on a class model", {"model": "digits", "caption": "a cat"}, 422),
    ("class_label on a text model", {"model": "captions", "class_label": 1}, 422),
    ("no caption on a text model", {"model": "captions"}, 422),
    ("blank caption", {"model": "captions", "caption": "   "}, 422),
    ("huge caption", {"model": "captions", "caption": "x" * 20_000}, 422),
    ("caption over DMP_MAX_CAPTION_CHARS", {"model": "captions", "caption": "y" * 1500}, 422),
    ("condition on an uncond model", {"model": "blobs", "class_label": 0}, 422),
    ("unknown model", {"model": "nope", "class_label": 1}, 404),
    ("unknown patch", {"model": "digits", "class_label": 1, "patch": "nope"}, 404),
    ("patch of another model", {"model": "digits", "class_label": 1, "patch": "blobs-dmp"}, 422),
    ("no model with several bases", {"class_label": 1}, 422),
    ("zero steps", {"model": "blobs", "steps": 0}, 422),
    ("too many steps", {"model": "blobs", "steps": 5000}, 422),
    ("1000 DPM-Solver steps (NaN)", {"model": "blobs", "steps": 1000, "sampler": "dpm"}, 422),
    ("steps is a string", {"model": "blobs", "steps": "ten"}, 422),
    ("zero images", {"model": "blobs", "num_images": 0}, 422),
    ("too many images", {"model": "blobs", "num_images": 9}, 422),
    ("unknown sampler", {"model": "blobs", "sampler": "euler"}, 422),
    ("negative guidance", {"model": "digits", "class_label": 1, "guidance_scale": -1}, 422),
    ("guidance is a string", {"model": "digits", "class_label": 1, "guidance_scale": "high"}, 422),
    ("negative seed", {"model": "blobs", "seed": -5}, 422),
    ("seed too large", {"model": "blobs", "seed": 2**70}, 422),
    ("unknown output format", {"model": "blobs", "output_format": "gif"}, 422),
    ("unknown field", {"model": "blobs", "prompt": "hi"}, 422),
    ("model is a number", {"model": 3}, 422),
]


@pytest.mark.parametrize("why,body,status", BAD_GENERATE, ids=[b[0] for b in BAD_GENERATE])
def test_bad_generate_bodies(client, why, body, status):
    r = client.post("/generate", json=body)
    assert r.status_code == status, (why, r.status_code, r.text)
    out = r.json()
    assert set(out) == {"error", "error_type"} and out["error"] and out["error_type"]


RAW_BODIES = [
    ("not JSON", b"{not json", "application/json", 400),
    ("JSON list", b"[1, 2]", "application/json", 400),
    ("JSON string", b'"hello"', "application/json", 400),
    ("empty body", b"", "application/json", 422),
    ("plain text", b"model=digits", "text/plain", 400),
]


@pytest.mark.parametrize("why,data,ctype,status", RAW_BODIES, ids=[b[0] for b in RAW_BODIES])
def test_non_json_bodies(client, why, data, ctype, status):
    r = client.post("/generate", content=data, headers={"Content-Type": ctype})
    assert r.status_code == status, (why, r.text)
    assert set(r.json()) == {"error", "error_type"}


def test_huge_body_is_413_before_parsing(client):
    def chunks():  # no Content-Length: the bytes are counted as they arrive
        yield b'{"caption": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}'

    for body in (b'{"caption": "' + b"x" * 2_000_000 + b'"}', chunks()):
        r = client.post("/generate", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/nowhere", 404), ("DELETE", "/models", 405), ("GET", "/patches/nope", 404),
    ("GET", "/patches/bad name!", 422), ("GET", "/generate", 405),
])
def test_routing_errors_have_the_error_shape(client, method, path, status):
    r = client.request(method, path)
    assert r.status_code == status
    assert set(r.json()) == {"error", "error_type"}


def test_405_allow_lists_every_method_of_the_path(client):
    r = client.post("/patches/digits-dmp")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PUT"


def test_unhandled_error_is_a_500_in_our_shape_with_request_id(class_only_dirs, tmp_path):
    """A bug in a route still answers {error, error_type} with the caller's X-Request-ID, and is counted."""
    from conftest import copy_dirs
    from fastapi.testclient import TestClient

    from app.api.main import create_app
    from app.core.config import Settings

    dirs = copy_dirs(class_only_dirs, tmp_path)
    app = create_app(Settings(model_dir=dirs["models"], patch_dir=dirs["patches"], warmup=False))

    def boom():
        raise RuntimeError("a bug")

    app.router.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom", headers={"X-Request-ID": "req-500"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "req-500"
        assert r.json() == {"error": "internal server error", "error_type": "internal"}
        metrics = c.get("/metrics").text
        assert 'dmp_requests_total{error_type="internal",method="GET",route="/boom",status="500"} 1.0' in metrics
