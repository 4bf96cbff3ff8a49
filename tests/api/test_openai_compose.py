"""/v1 extras of issue 23 (patch_scale, patches, seeds, negative_class_label) and client.models.retrieve, driven by
the real `openai` client against a real `python -m app serve`."""
from __future__ import annotations

import openai
import pytest

from tests.api.test_compose import compose_dirs
from tests.conftest import ServerProcess

EXTRA = {"steps": 3, "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def oai(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-compose")
    dirs = compose_dirs(tiny_dirs, root)
    proc = ServerProcess({"DMP_MODEL_DIR": str(dirs["models"]), "DMP_PATCH_DIR": str(dirs["patches"]),
                          "DMP_TORCH_THREADS": "1"}, root / "server.log")
    proc.wait_ready(timeout=180)
    yield openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    proc.stop()


def images(oai, model="digits", **extra):
    r = oai.images.generate(model=model, prompt="3", n=extra.pop("n", 1), response_format="b64_json",
                            extra_body=EXTRA | extra)
    return r, [d.b64_json for d in r.data]


def test_patch_scale_and_compositions_as_extras(oai):
    _, base = images(oai, seed=4)
    r, patched = images(oai, "digits-dmp", seed=4)
    assert base != patched and [p["name"] for p in r.patches] == ["digits-dmp"]  # extra fields of the response
    assert images(oai, "digits-dmp", seed=4, patch_scale=0)[1] == base
    mix = [{"name": "digits-dmp", "scale": 0.5}, {"name": "digits-b", "scale": -1}]
    r, mixed = images(oai, seed=4, patches=mix)
    assert [(p["name"], p["scale"]) for p in r.patches] == [("digits-dmp", 0.5), ("digits-b", -1.0)]
    assert mixed not in (base, patched)
    assert images(oai, seed=4, patches=mix)[1] == mixed


def test_seeds_per_image_as_extras(oai):
    r, three = images(oai, n=3, seed=30)
    assert r.seeds == [30, 31, 32]
    assert images(oai, seed=31)[1] == three[1:2]
    r, listed = images(oai, n=2, seeds=[32, 30])
    assert r.seeds == [32, 30] and listed == [three[2], three[0]]


def test_negative_class_as_extra(oai):
    assert images(oai, seed=2, negative_class_label=5)[1] != images(oai, seed=2)[1]


@pytest.mark.parametrize("extra,param", [
    ({"patch_scale": 1e9}, "patch_scale"),
    ({"patches": [{"name": "digits-dmp"}] * 5}, "patches"),
    ({"patches": [{"name": "digits-dmp"}, {"name": "blobs-dmp"}]}, None),
    ({"seeds": [1, 2]}, "seeds"),
    ({"negative_class_label": 99}, "negative_class_label"),
])
def test_bad_extras_are_openai_400s(oai, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        images(oai, **extra)
    assert e.value.body["param"] == param and e.value.body["message"]


def test_models_retrieve(oai):
    base = oai.models.retrieve("digits")
    assert base.id == "digits" and base.owned_by == "dmp"
    patch = oai.models.retrieve("digits-b")
    assert patch.id == "digits-b" and patch.owned_by == "digits" and patch.parent == "digits"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
