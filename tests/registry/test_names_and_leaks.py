"""Issue 25 item 9 (registry parts): a patch named like a base is refused, clients never see the trainer's file
paths, and a deleted patch leaves no metric series behind."""
from __future__ import annotations

import json

import pytest
from conftest import AUTH, admin_client, make_patch_bytes, with_header


@pytest.fixture(scope="module")
def c(class_only_dirs, tmp_path_factory):
    with admin_client(class_only_dirs, tmp_path_factory.mktemp("names"), warmup=False) as client:
        yield client


def test_a_patch_named_like_a_base_is_refused(c, class_only_dirs):
    digits = class_only_dirs["bases"]["digits"]
    r = c.put("/patches/digits", content=make_patch_bytes(digits, "digits", 1), headers=AUTH)
    assert r.status_code == 422 and r.json()["error_type"] == "name_is_a_base", r.text
    assert c.get("/patches/digits").status_code == 404


def test_clients_never_see_the_trainers_paths(c, class_only_dirs):
    digits = class_only_dirs["bases"]["digits"]
    config = {"out": "/home/alice/secret-runs/x.safetensors", "base": "C:\\models\\m.safetensors", "lr": 0.001,
              "data": ["/srv/data/a", "rel/b"]}
    data = with_header(make_patch_bytes(digits, "digits", 2),
                       lambda h: h | {"__metadata__": h["__metadata__"] | {"train_config": json.dumps(config)}})
    assert c.put("/patches/trained", content=data, headers=AUTH).status_code == 201
    shown = c.get("/patches/trained").text
    assert "alice" not in shown and "/srv" not in shown and "models\\\\" not in shown, shown
    cfg = json.loads(c.get("/patches/trained").json()["metadata"]["train_config"])
    assert cfg == {"out": "x.safetensors", "base": "m.safetensors", "lr": 0.001, "data": ["a", "b"]}
    for route in ("/patches", "/models"):
        assert str(c.dirs["models"].parent) not in c.get(route).text


def test_a_deleted_patch_leaves_no_metric_series(c, class_only_dirs):
    digits = class_only_dirs["bases"]["digits"]
    for i in range(2):  # the first cycle creates every per-patch series, the second must not add to them
        assert c.put("/patches/cycled", content=make_patch_bytes(digits, "digits", 3 + i),
                     headers=AUTH).status_code == 201
        assert c.post("/generate", json={"patch": "cycled", "class_label": 1, "steps": 2}).status_code == 200
        series = [line for line in c.get("/metrics").text.splitlines() if 'patch="cycled"' in line]
        assert series  # the generation made them
        assert c.delete("/patches/cycled", headers=AUTH).status_code == 200
        left = [line for line in c.get("/metrics").text.splitlines() if 'patch="cycled"' in line]
        assert left == [], left
