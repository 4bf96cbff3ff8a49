"""Shifted domains made from the shipped MNIST (thick strokes, inverted contrast, shifted position) as image folders,
and the simple measure that tells them apart: the share of inked pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from app.trainer.data import DataError, load_mnist_raw, to_model_range

STYLES = ("thick", "inverted", "shifted")
INK_LEVEL = 0.0  # a pixel in [-1, 1] is inked above mid-grey (for inverted images: the bright background)


def restyle(raw: np.ndarray, style: str) -> np.ndarray:
    """uint8 (N, 28, 28) digits -> the same digits in `style`, uint8 (N, 28, 28)."""
    x = torch.from_numpy(raw).float()[:, None]  # (N, 1, 28, 28)
    if style == "thick":  # grey dilation with a 3x3 square: strokes ~2 px wider at 28x28
        x = F.max_pool2d(x, 3, stride=1, padding=1)
    elif style == "inverted":
        x = 255.0 - x
    elif style == "shifted":  # 4 px right and down at 28x28: MNIST's 4 px margin, so the digit stays whole
        x = F.pad(x, (4, 0, 4, 0))[..., :28, :28]
    else:
        raise DataError(f"unknown style {style!r}: one of {', '.join(STYLES)}")
    return x[:, 0].clamp(0, 255).round().to(torch.uint8).numpy()


def make_domain(style: str, out: str | Path, size: int = 16, limit: int = 0) -> int:
    """Write the shipped MNIST digits in `style` as out/<label>/<index>.png at size x size; returns the image count."""
    from PIL import Image

    raw, labels = load_mnist_raw()
    if limit:
        raw, labels = raw[:limit], labels[:limit]
    x = to_model_range(restyle(raw, style), size)  # (N, 1, size, size) in [-1, 1]: the base's own resizing
    pixels = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    out = Path(out)
    for label in range(10):
        (out / str(label)).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(pixels, labels, strict=True)):
        Image.fromarray(img, mode="L").save(out / str(int(label)) / f"{i:05d}.png")
    return len(pixels)


def ink_share(images: torch.Tensor) -> float:
    """Share of pixels above mid-grey, over images (N, C, H, W) in [-1, 1] (MNIST 16x16: ~0.13)."""
    return float((images > INK_LEVEL).float().mean())
