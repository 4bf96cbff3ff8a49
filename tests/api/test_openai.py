"""The OpenAI-compatible routes, driven by the real `openai` client against a real `python -m app serve`."""
from __future__ import annotations

import base64
import io
import json
import time

import httpx
import openai
import pytest
from PIL import Image

from app.model import save_base
from tests.api.test_server import metric
from tests.conftest import BASE_META, ServerProcess, copy_dirs, tiny_base

EXTRA = {"steps": 3}


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    """The three tiny bases and their patches, keys off."""
    root = tmp_path_factory.mktemp("openai")
    dirs = copy_dirs(tiny_dirs, root)
    labels = json.dumps(["tabby cat, kitty", "dog"] + [f"thing {i}" for i in range(2, 10)])
    save_base(tiny_base("class", seed=9), dirs["models"] / "pets.safetensors", **BASE_META, name="pets", task="class",
              labels=labels)
    proc = ServerProcess({"DMP_MODEL_DIR": str(dirs["models"]), "DMP_PATCH_DIR": str(dirs["patches"]),
                          "DMP_TORCH_THREADS": "1"},  # no OpenMP spinning on a shared CPU
                         root / "server.log")
    proc.wait_ready(timeout=180)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_list_models_has_bases_and_patches(oai):
    models = {m.id: m for m in oai.models.list()}
    assert {"digits", "blobs", "captions", "digits-dmp", "blobs-dmp", "captions-dmp"} <= set(models)
    assert models["digits"].owned_by == "dmp" and models["digits"].object == "model"
    assert models["digits-dmp"].owned_by == "digits" and models["digits-dmp"].parent == "digits"
    assert models["captions"].sizes == ["8x8"]


@pytest.mark.parametrize("model,prompt", [("digits", "3"), ("blobs", ""), ("captions", "a small grey cat"),
                                          ("digits-dmp", "3"), ("captions-dmp", "a cat")])
def test_generate_each_task_kind_and_patch_as_model(oai, model, prompt):
    r = oai.images.generate(model=model, prompt=prompt, n=2, size="8x8", response_format="b64_json",
                            extra_body=EXTRA | {"seed": 7})
    assert len(r.data) == 2 and r.size == "8x8" and r.output_format == "png"
    assert png(r.data[0].b64_json).size == (8, 8)
    assert r.model_extra["model"] == model.removesuffix("-dmp") and r.model_extra["seed"] == 7


def test_patch_changes_the_image_and_seed_reproduces(oai):
    def one(model, seed):
        return oai.images.generate(model=model, prompt="5", extra_body=EXTRA | {"seed": seed}).data[0].b64_json

    a, b = one("digits", 3), one("digits", 3)
    assert a == b  # same seed -> same bytes
    assert one("digits", 4) != a and one("digits-dmp", 3) != a


def test_class_prompt_by_name(oai):
    def one(prompt):
        return oai.images.generate(model="pets", prompt=prompt, extra_body=EXTRA | {"seed": 2}).data[0].b64_json

    assert one("Kitty") == one("tabby cat") == one("0") != one("dog")
    with pytest.raises(openai.BadRequestError) as e:
        one("kiten")
    assert e.value.body["code"] == "unknown_class" and "kitty" in e.value.body["message"]  # close matches named


def test_output_format_and_extras(oai):
    r = oai.images.generate(model="blobs", prompt="", output_format="jpeg", size="auto",
                            extra_body={"seed": 1, "steps": 2, "sampler": "ddpm", "guidance_scale": 1.0})
    assert png(r.data[0].b64_json).format == "JPEG"


@pytest.mark.parametrize("kwargs,param,code", [
    (dict(model="digits", prompt="3", size="1024x1024"), "size", "unsupported_size"),
    (dict(model="digits", prompt="3", response_format="url"), "response_format", "unsupported_value"),
    (dict(model="digits", prompt="a dog"), "prompt", "unknown_class"),
    (dict(model="digits", prompt="3", n=99), "n", "invalid_value"),
    (dict(model="digits", prompt="3", output_format="gif"), "output_format", "invalid_value"),
    (dict(model="digits", prompt="3", partial_images=5, stream=True), "partial_images", "invalid_value"),
    (dict(model="digits", prompt="3", extra_body={"steps": 0}), "steps", "invalid_value"),
    (dict(model="captions", prompt=""), None, "invalid_request"),
])
def test_bad_requests(oai, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(**kwargs)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code and err["message"]
    if param == "size":
        assert "8x8" in err["message"]  # says which sizes the model has


def test_unknown_model_and_route(oai, server):
    with pytest.raises(openai.NotFoundError) as e:
        oai.images.generate(model="dall-e-3", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.put(server.url + "/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET" and r.json()["error"]["code"] == "method_not_allowed"


def test_stream_partial_images_then_completed(oai):
    events = list(oai.images.generate(model="digits", prompt="2", stream=True, partial_images=2,
                                      extra_body={"steps": 6, "seed": 11}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(e.size == "8x8" and e.output_format == "png" for e in events)
    assert png(events[0].b64_json).size == (8, 8)
    plain = oai.images.generate(model="digits", prompt="2", extra_body={"steps": 6, "seed": 11})
    assert events[-1].b64_json == plain.data[0].b64_json  # streaming does not change the pixels


def test_stream_without_partials(oai):
    events = list(oai.images.generate(model="blobs", prompt="", stream=True, extra_body={"steps": 2, "seed": 1}))
    assert [e.type for e in events] == ["image_generation.completed"]


# ---------------------------------------------------------------------------------------------------- API keys

METRICS_TOKEN = "metrics-token-0123456789"
KEYS = "alice:sk-alice-0123456789,sha256:" + __import__("hashlib").sha256(b"sk-bob-0123456789").hexdigest()


def test_keys_required_on_generation_routes(start_server, class_only_dirs):
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"], api_keys=KEYS,
                          admin_token="admin-token-0123456789")

    def client(key):
        return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    for key in ("sk-alice-0123456789", "sk-bob-0123456789"):
        assert client(key).images.generate(model="digits", prompt="1", extra_body=EXTRA).data
    with pytest.raises(openai.AuthenticationError) as e:
        client("sk-wrong").models.list()
    assert e.value.body["type"] == "authentication_error" and e.value.body["code"] == "invalid_api_key"
    body = {"model": "digits", "class_label": 1, "steps": 2}
    assert httpx.post(server.url + "/generate", json=body).status_code == 401
    assert httpx.post(server.url + "/generate", json=body,
                      headers={"Authorization": "Bearer sk-bob-0123456789"}).status_code == 200
    # the admin token is not an API key, and an API key is not the admin token
    assert httpx.post(server.url + "/generate", json=body,
                      headers={"Authorization": "Bearer admin-token-0123456789"}).status_code == 401
    refused = httpx.delete(server.url + "/patches/digits-dmp", headers={"Authorization": "Bearer sk-alice-0123456789"})
    assert refused.status_code == 403 and refused.json()["error_type"] == "not_admin"  # a key without +admin
    assert httpx.get(server.url + "/metrics").status_code == 401  # with keys on, /metrics is the operator's
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer admin-token-0123456789"}).text
    assert 'dmp_api_key_requests_total{key="alice",outcome="allowed"} 1.0' in metrics
    from app.core.apikeys import KeyRing

    bob_id = KeyRing.parse(KEYS).identify("sk-bob-0123456789")  # his entry has no id: an HMAC, not the hash
    assert bob_id != __import__("hashlib").sha256(b"sk-bob-0123456789").hexdigest()[:12]
    assert f'dmp_api_key_images_total{{key="{bob_id}"}} 2.0' in metrics
    assert "sk-alice" not in metrics and "sk-bob" not in metrics


def test_rate_limit_shared_by_replicas_through_redis(start_server, class_only_dirs, redis_server):
    settings = dict(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"], api_keys=KEYS,
                    redis_url=redis_server.url, key_requests_per_min=3, key_images_per_min=10,
                    metrics_token=METRICS_TOKEN)
    a, b = start_server(**settings), start_server(**settings)

    def alice(s):
        return openai.OpenAI(base_url=s.url + "/v1", api_key="sk-alice-0123456789", max_retries=0)
    for s in (a, b, a):
        alice(s).images.generate(model="digits", prompt="1", extra_body=EXTRA)
    with pytest.raises(openai.RateLimitError) as e:
        alice(b).images.generate(model="digits", prompt="1", extra_body=EXTRA)
    assert e.value.body["type"] == "rate_limit_error" and e.value.body["code"] == "rate_limited"
    assert int(e.value.response.headers["Retry-After"]) >= 1
    bob = openai.OpenAI(base_url=b.url + "/v1", api_key="sk-bob-0123456789", max_retries=0)
    assert bob.images.generate(model="digits", prompt="1", extra_body=EXTRA).data  # buckets are per key
    assert len(bob.images.generate(model="digits", prompt="1", n=8, extra_body=EXTRA).data) == 8
    with pytest.raises(openai.RateLimitError):  # one request token left, but 1 of 10 image tokens
        bob.images.generate(model="digits", prompt="1", n=2, extra_body=EXTRA)
    scrape = httpx.get(b.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert 'outcome="rate_limited"' in scrape.text


def test_leaving_an_openai_stream_cancels_the_work(server):
    """The openai client closing its stream mid-generation drops the work at the next step."""
    before = metric(server.url, 'dmp_requests_dropped_total{reason="disconnected"}')
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    stream = client.images.generate(model="digits", prompt="1", stream=True, partial_images=3,
                                    extra_body={"steps": 1000, "seed": 1})
    assert next(iter(stream)).type == "image_generation.partial_image"  # at step 250 of 1000: still running
    stream.close()
    end = time.monotonic() + 30
    while metric(server.url, 'dmp_requests_dropped_total{reason="disconnected"}') <= before:
        assert time.monotonic() < end, "the runner kept working for a client that left"
        time.sleep(0.1)
