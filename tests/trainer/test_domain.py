"""A new domain from an image folder (issue 26): made-up domains, any image folder, the patch recipe as defaults,
threads, a quiet CLI and truthful metadata."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from app.model.dmp import read_header
from app.trainer.__main__ import RECIPES, build_parser, config_from, main, set_threads
from app.trainer.data import DataError, load_dataset, load_mnist_raw, to_model_range
from app.trainer.domains import ink_share, restyle

BASE = REPO / "models" / "mnist.safetensors"  # the shipped 16x16 base: a few steps of it take seconds


def centre_of_mass(images: np.ndarray) -> np.ndarray:
    w = images.astype(float)
    ys, xs = np.mgrid[:w.shape[1], :w.shape[2]]
    return np.array([(w * ys).sum() / w.sum(), (w * xs).sum() / w.sum()])


def test_styles_change_what_they_say():
    raw = load_mnist_raw()[0][:200]
    plain = ink_share(to_model_range(raw, 16))
    assert 0.08 < plain < 0.2
    assert ink_share(to_model_range(restyle(raw, "thick"), 16)) > 1.6 * plain
    assert ((restyle(raw, "inverted").astype(int) + raw) == 255).all()
    # a few touch the edge
    assert centre_of_mass(restyle(raw, "shifted")) - centre_of_mass(raw) == pytest.approx([4, 4], abs=0.1)
    with pytest.raises(DataError, match="unknown style"):
        restyle(raw, "wobbly")


def test_make_domain_writes_a_class_folder_the_base_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DMP_DATA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "inverted"
    assert main(["make-domain", "--style", "inverted", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [str(i) for i in range(10)]
    ds = load_dataset(f"folder:{out}", "all", 16, channels=1, labels=[str(i) for i in range(10)])
    assert len(ds) == 5000 and ds.x.shape[1:] == (1, 16, 16) and not ds.hflip
    assert ink_share(ds.x) > 0.8  # a white background
    assert main(["make-domain", "--style", "thick", "--out", str(out)]) == 2  # never writes into a full folder
    assert "not empty" in capsys.readouterr().err


def write_mixed_folder(root) -> None:
    """Class folders 0..9 with greyscale, RGB, RGBA and palette images of assorted sizes."""
    rng = np.random.default_rng(0)
    modes = ["L", "RGB", "RGBA", "P"]
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for i, mode in enumerate(modes):
            h, w = rng.integers(10, 40, 2)
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
            img.save(root / str(label) / f"{i}.png")


def test_folder_of_any_mode_and_size_takes_the_base_channels_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv("DMP_DATA_CACHE", str(tmp_path / "cache"))
    write_mixed_folder(tmp_path / "tree")
    grey = load_dataset(f"folder:{tmp_path / 'tree'}", "all", 16, channels=1, labels=[str(i) for i in range(10)])
    assert grey.x.shape == (40, 1, 16, 16) and grey.labels.tolist() == [i // 4 for i in range(40)]
    colour = load_dataset(f"folder:{tmp_path / 'tree'}", "all", 12, channels=3)
    assert colour.x.shape == (40, 3, 12, 12) and -1 <= colour.x.min() and colour.x.max() <= 1
    assert not grey.hflip and not colour.hflip  # flips only when asked for
    first_is_grey = load_dataset(f"folder:{tmp_path / 'tree'}", "all", 8)  # no base: the first image decides
    assert first_is_grey.x.shape[1] == 1


def test_patch_defaults_are_the_recipe_and_flags_override():
    parse = build_parser().parse_args
    cmd = ["patch", "--base", "B", "--dataset", "folder:/data/thick", "--out", "P"]
    cfg = config_from(parse(cmd), "dmp")
    assert {k: getattr(cfg, k) for k in RECIPES["dmp"]} == RECIPES["dmp"]
    assert (cfg.lr, cfg.gate_scale, cfg.ema_decay, cfg.hflip, cfg.domain) == (1e-3, 64.0, 0.995, "auto", "thick")
    ft = config_from(parse([*cmd, "--baseline", "ft"]), "ft")
    assert (ft.lr, ft.steps, ft.ema_decay) == (1e-4, 1000, 0.995)
    own = config_from(parse([*cmd, "--lr", "3e-4", "--steps", "7", "--hflip", "--domain", "bold"]), "dmp")
    assert (own.lr, own.steps, own.hflip, own.domain, own.gate_scale) == (3e-4, 7, "on", "bold", 64.0)
    pretrain = config_from(parse(["pretrain", "--dataset", "mnist", "--out", "P"]), "pretrain")
    assert (pretrain.lr, pretrain.gate_scale) == (3e-4, 1.0)  # the recipe is the patch command's alone


def test_threads_are_set_once_for_torch_and_openmp(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        import os

        assert os.environ["OMP_NUM_THREADS"] == "1"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(None) == 2 and torch.get_num_threads() == 2  # the environment's, when set
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_threads(None) == len(os.sched_getaffinity(0))  # else every core this process may use
    finally:
        torch.set_num_threads(before)


def test_quiet_patch_prints_one_line_and_records_the_truth(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("DMP_DATA_CACHE", str(tmp_path / "cache"))  # uncached: the image reader runs
    write_mixed_folder(tmp_path / "bold")
    out = tmp_path / "runs" / "bold-dmp.safetensors"
    before = torch.get_num_threads()
    try:
        assert main(["patch", "--base", str(BASE), "--dataset", f"folder:{tmp_path / 'bold'}", "--out", str(out),
                     "--steps", "2", "--batch-size", "8", "--threads", "1", "--quiet"]) == 0
    finally:
        torch.set_num_threads(before)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == f"wrote DMP patch {out}\n"
    meta = read_header(out.read_bytes())["__metadata__"]
    config = json.loads(meta["train_config"])
    # the base's real sizes, not TrainConfig's pretraining defaults (32 px, hidden 128, depth 8, patch 4)
    assert {k: config[k] for k in ("image_size", "hidden_size", "depth", "num_heads", "patch_size")} == \
        {"image_size": 16, "hidden_size": 64, "depth": 6, "num_heads": 4, "patch_size": 2}
    assert (config["dataset"], config["base"], config["out"]) == ("folder:bold", "mnist.safetensors",
                                                                  "bold-dmp.safetensors")
    assert config["text_encoder"] == "" and config["hflip"] == "auto"
    assert str(tmp_path) not in json.dumps(meta)  # no path of this machine anywhere in the header
    assert meta["domain"] == "bold"


def test_shipped_thick_patch_is_the_documented_command_and_thickens_the_same_seeds():
    from app.model import load_base, load_patch
    from app.model.dmp.bounds import PROMPT_FACTOR, activation_scale
    from app.trainer.evaluate import sample_images

    base = load_base(BASE)
    patch = load_patch(REPO / "patches" / "mnist-thick-dmp.safetensors", base=base)
    tokens, _ = activation_scale(base)
    assert patch.prompts.abs().max() < 0.05 * PROMPT_FACTOR * tokens  # far inside the server's bounds
    config = json.loads(patch.metadata["train_config"])
    assert {k: config[k] for k in RECIPES["dmp"]} == RECIPES["dmp"] and config["hflip"] == "auto"
    assert (config["dataset"], patch.metadata["domain"]) == ("folder:thick", "thick")
    labels = torch.arange(10).repeat(4)  # 40 samples, 4 of each digit, the same seeds with and without the patch
    plain = ink_share(sample_images(base, labels, seed=0, steps=20))
    thick = ink_share(sample_images(base, labels, patch=patch.eval(), seed=0, steps=20))
    assert thick > 1.4 * plain


def test_every_command_but_make_domain_takes_threads():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        flags = {s for a in sub._actions for s in a.option_strings}
        assert ("--threads" in flags) == (name != "make-domain"), name  # main() calls set_threads(args.threads)
