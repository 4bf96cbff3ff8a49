"""Data loaders: the ImageFolder tree with its cache, the bundled sets and their splits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from app.trainer.data import DataError, load_animals_raw, load_dataset, load_splits


def test_image_folder_loads_resizes_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DMP_DATA_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "tree" / cls / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path / 'tree'}", "all", image_size=8, channels=3)
    assert ds.x.shape == (10, 3, 8, 8) and ds.task == "class" and ds.class_names == ("cats", "dogs")
    assert ds.labels.tolist() == [0] * 5 + [1] * 5 and -1 <= ds.x.min() and ds.x.max() <= 1
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    again = load_dataset(f"folder:{tmp_path / 'tree'}", "all", image_size=8, channels=3)
    assert torch.equal(again.x, ds.x)
    train, test = (load_dataset(f"folder:{tmp_path / 'tree'}", s, image_size=8) for s in ("train", "test"))
    assert len(train) + len(test) == 10


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet")


def test_bundled_sets_and_disjoint_splits():
    x, y = load_animals_raw()  # parsed from the package's files without unpickling
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and set(np.unique(y)) == set(range(10))
    train, test = load_dataset("mnist", "train", 32), load_dataset("mnist", "test", 32)
    assert train.x.shape[1:] == (1, 32, 32) and len(train) + len(test) == 5000 and len(test) == 500
    assert not set(map(bytes, train.x[:200].numpy())) & set(map(bytes, test.x.numpy()))
    both = load_splits("mnist", 32)  # one build, the same two splits
    assert torch.equal(both[0].x, train.x) and torch.equal(both[1].x, test.x)
    animals = load_dataset("animals", "test", 32)
    assert animals.task == "uncond" and animals.num_classes == 0 and animals.hflip
    assert (animals.cond(torch.arange(4)) == 0).all()
