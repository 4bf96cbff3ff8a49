"""`eval --dataset folder:PATH`: any channel count and size, read as the base sees it, scored against the folder's
held-out part by the independent extractors; bad input exits 2 with one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BASE_META, make_patch_bytes, tiny_base
from PIL import Image

from app.model import save_base
from app.trainer.__main__ import main


def write_images(folder, n: int, mode: str, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalbases")
    gray = tiny_base("class", seed=0)  # 1 channel, 8x8, labels "0".."9"
    save_base(gray, root / "gray.safetensors", **BASE_META, name="gray", labels=json.dumps([str(i) for i in range(10)]))
    (root / "gray-dmp.safetensors").write_bytes(make_patch_bytes(gray, "gray", seed=1))
    from app.model import DiT, DiTConfig

    rgb = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                        learn_sigma=False, num_classes=0)).eval()
    save_base(rgb, root / "rgb.safetensors", **BASE_META, name="rgb")
    return root


def test_eval_reads_an_rgb_class_folder_as_the_1_channel_base_sees_it(bases, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DMP_DATA_CACHE", str(tmp_path / "cache"))
    for c in ("3", "7"):  # RGB 20x20 files for a 1-channel 8x8 base: the crash of issue 26
        write_images(tmp_path / "data" / c, 60, "RGB", 20, seed=int(c))
    out = tmp_path / "r.json"
    assert main(["eval", "--base", str(bases / "gray.safetensors"), "--patch", str(bases / "gray-dmp.safetensors"),
                 "--dataset", f"folder:{tmp_path / 'data'}", "--steps", "2", "--num-samples", "24",
                 "--device", "cpu", "--json", str(out), "--heldout", "--classifier-steps", "10"]) == 0
    text = capsys.readouterr().out
    assert "held-out images" in text and "| pca |" in text and "| mobilenet |" in text and "Δ FD" in text
    result = json.loads(out.read_text())
    assert result["num_heldout"] == 12 and result["base"]["num_samples"] == 24
    assert set(result["delta"]) == {"pca", "randcnn", "mobilenet"}  # no classifier of another data set, even when asked
    assert "ImageNet" in text  # the table says what each extractor is
    assert "heldout_deciles" in result


def test_eval_reads_a_grayscale_folder_for_a_3_channel_base(bases, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DMP_DATA_CACHE", str(tmp_path / "cache"))
    write_images(tmp_path / "faces", 100, "L", 12, seed=0)  # unconditional: images straight under the root
    assert main(["eval", "--base", str(bases / "rgb.safetensors"), "--dataset", f"folder:{tmp_path / 'faces'}",
                 "--steps", "2", "--device", "cpu"]) == 0
    assert "| randcnn |" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "too_few", "foreign_class", "class_for_uncond"])
def test_eval_bad_dataset_exits_2_with_one_line(bases, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("DMP_DATA_CACHE", str(tmp_path / "cache"))
    base = bases / ("rgb.safetensors" if case == "class_for_uncond" else "gray.safetensors")
    data = tmp_path / "d"
    if case == "too_few":
        write_images(data / "3", 20, "L", 8, seed=0)
    elif case == "foreign_class":
        write_images(data / "cats", 100, "L", 8, seed=0)
    elif case == "class_for_uncond":
        for c in ("a", "b"):
            write_images(data / c, 60, "L", 8, seed=0)
    assert main(["eval", "--base", str(base), "--dataset", f"folder:{data}", "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()  # after any "reading images" progress bar: one error line
    assert err.splitlines()[-1].startswith("error: ") and err.count("error") == 1 and "Traceback" not in err


def test_eval_on_a_bundled_set_can_add_the_labelled_classifier_column(bases, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the classifier cache (runs/classifiers) goes here, not into the repo's runs/
    out = tmp_path / "r.json"
    assert main(["eval", "--base", str(bases / "gray.safetensors"), "--dataset", "digits", "--steps", "2",
                 "--num-samples", "40", "--classifier-steps", "10", "--device", "cpu", "--json", str(out),
                 "--extractors", "pca", "randcnn"]) == 0
    result = json.loads(out.read_text())
    assert set(result["base"]["extractors"]) == {"pca", "randcnn", "classifier"} and "class_acc" in result["base"]
    assert "generators' data" in capsys.readouterr().out  # the column says what it is
