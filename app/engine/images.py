"""uint8 image tensors -> PNG / JPEG / WebP bytes (Pillow)."""
from __future__ import annotations

import io
from typing import Any, Literal, get_args

import torch
from PIL import Image

OutputFormat = Literal["png", "jpeg", "webp"]  # the request schema's type, the keys of FORMATS
FORMATS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "png": ("PNG", "image/png", {}), "jpeg": ("JPEG", "image/jpeg", {"quality": 95}),
    "webp": ("WEBP", "image/webp", {"lossless": True})}
assert tuple(FORMATS) == get_args(OutputFormat), "one list of output formats"


def encode_images(images: torch.Tensor, fmt: str) -> list[bytes]:
    """(n, H, W, C) uint8 -> one encoded file per image; 1 channel = grayscale, 3 = RGB."""
    pil_format, _, options = FORMATS[fmt]
    out = []
    for img in images.numpy():
        arr = img[..., 0] if img.shape[-1] == 1 else img[..., :3]
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=pil_format, **options)
        out.append(buf.getvalue())
    return out


def media_type(fmt: str) -> str:
    return FORMATS[fmt][1]
