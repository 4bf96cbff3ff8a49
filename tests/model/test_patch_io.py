"""Patch files (docs/design.md §3): round trip, and every refusal raises PatchError naming the problem."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from app.model import fingerprint
from app.model.dmp import PatchError, load_patch, new_patch_for, patch_metadata_for, patch_to_bytes, save_patch

from .conftest import randomize, tiny_config
from .test_dmp import inputs, randomize_patch


def good_meta(base):
    return patch_metadata_for(base, "tiny", domain="test", train_config={"steps": 1}, metrics={"loss": 0.1})


def test_roundtrip_preserves_output_and_metadata(tmp_path, tiny_class):
    patch = randomize_patch(new_patch_for(tiny_class, gate_input="t", top_k=0.5)).eval()
    path = save_patch(patch, tmp_path / "p.safetensors", **good_meta(tiny_class))
    loaded = load_patch(path, base=tiny_class)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(tiny_class(x, t, y, patch=loaded), tiny_class(x, t, y, patch=patch))
    m = loaded.metadata
    assert m["format"] == "dmp-patch" and m["format_version"] == "1" and m["gate_input"] == "t"
    assert m["base_fingerprint"] == fingerprint(tiny_class) and m["task"] == "class"
    assert json.loads(m["train_config"]) == {"steps": 1} and "created_at" in m
    assert (m["hidden_size"], m["num_tokens"], m["pt_depth"]) == ("32", "16", "3")


def write_tensors(path, tensors, meta):
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


def base_file(tiny_class):
    patch = new_patch_for(tiny_class)
    data = patch_to_bytes(patch, **good_meta(tiny_class))
    from app.model.dmp import read_header

    meta = read_header(data)["__metadata__"]
    tensors = {k: v.float().contiguous() for k, v in patch.state_tensors().items()}
    return tensors, meta


def refusal_cases(tiny_class, tmp_path):
    tensors, meta = base_file(tiny_class)
    other = randomize(type(tiny_class)(tiny_config()), seed=99)
    nan = dict(tensors, prompts=tensors["prompts"].clone().fill_(float("nan")))
    return {
        "pickle": (lambda p: p.write_bytes(pickle.dumps({"prompts": [1, 2]})), "not a safetensors"),
        "nan": (lambda p: write_tensors(p, nan, meta), "non-finite"),
        "wrong shape": (lambda p: write_tensors(p, dict(tensors, prompts=torch.zeros(3, 16, 31)), meta),
                        "shape"),
        "other base": (lambda p: write_tensors(p, tensors, dict(meta, base_fingerprint=fingerprint(other))),
                       "made for base"),
        "unknown format": (lambda p: write_tensors(p, tensors, dict(meta, format="lora")), "unknown format"),
        "version": (lambda p: write_tensors(p, tensors, dict(meta, format_version="9")), "format_version"),
        "missing metadata": (lambda p: write_tensors(p, tensors, {k: v for k, v in meta.items() if k != "task"}),
                             "missing task"),
        "extra tensor": (lambda p: write_tensors(p, dict(tensors, evil=torch.zeros(1)), meta), "unexpected"),
        "int dtype": (lambda p: write_tensors(p, dict(tensors, **{"gate.bias": torch.zeros(16, dtype=torch.int32)}),
                                              meta), "dtype"),
        "bad gate_input": (lambda p: write_tensors(p, tensors, dict(meta, gate_input="q")), "gate_input"),
        "task mismatch": (lambda p: write_tensors(p, tensors, dict(meta, task="text")), "task"),
        "too deep": (lambda p: write_tensors(p, dict(tensors, prompts=torch.zeros(4, 16, 32)),
                                             dict(meta, pt_depth="4")), "exceeds the base depth"),
        "truncated": (lambda p: p.write_bytes(patch_to_bytes(new_patch_for(tiny_class), **good_meta(tiny_class))[:-40]),
                      "corrupt|not a safetensors"),
        "empty": (lambda p: p.write_bytes(b""), "not a safetensors"),
    }


CASES = ["pickle", "nan", "wrong shape", "other base", "unknown format", "version", "missing metadata",
         "extra tensor", "int dtype", "bad gate_input", "task mismatch", "too deep", "truncated", "empty"]


@pytest.mark.parametrize("case", CASES)
def test_every_refusal_raises_patch_error(tmp_path, tiny_class, case):
    make, message = refusal_cases(tiny_class, tmp_path)[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(PatchError, match=message):
        load_patch(path, base=tiny_class)


def test_oversize_is_refused_before_reading(tmp_path, tiny_class):
    path = save_patch(new_patch_for(tiny_class), tmp_path / "p.safetensors", **good_meta(tiny_class))
    with pytest.raises(PatchError, match="cap"):
        load_patch(path, base=tiny_class, max_bytes=1000)


def test_patch_error_is_value_error():
    assert issubclass(PatchError, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(PatchError, match="cannot read"):
        load_patch(tmp_path / "nope.safetensors")
