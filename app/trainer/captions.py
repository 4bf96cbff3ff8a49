"""Captions for digits built from the label and attributes measured on the image, so each caption is true of it."""
from __future__ import annotations

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Thresholds at MNIST's 28 px scale (chosen near the 20th / 80th percentiles of MNIST-5k); widths scale with size.
THIN_BELOW, THICK_ABOVE = 2.4, 3.4  # mean stroke width in pixels
SLANTED_ABOVE, BACKWARD_BELOW, UPRIGHT_WITHIN = 0.3, -0.15, 0.05  # horizontal shift per row (shear)


def stroke_width(img: np.ndarray) -> float:
    """Mean stroke width in 28-px units: 2 * ink area / ink boundary length; img (H, W) in [0, 1]."""
    ink = img > 0.5
    area = ink.sum()
    if area == 0:
        return 0.0
    pad = np.pad(ink, 1)
    interior = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    boundary = max(int(area - interior.sum()), 1)
    return float(2.0 * area / boundary) * 28.0 / img.shape[0]


def slant(img: np.ndarray) -> float:
    """Shear of the ink: how far x moves right per row upward (> 0 leans right, like italics)."""
    w = img.astype(np.float64)
    m = w.sum()
    if m == 0:
        return 0.0
    yy, xx = np.meshgrid(np.arange(w.shape[0]), np.arange(w.shape[1]), indexing="ij")
    my, mx = (w * yy).sum() / m, (w * xx).sum() / m
    cov = (w * (xx - mx) * (yy - my)).sum() / m
    var_y = (w * (yy - my) ** 2).sum() / m
    return float(-cov / max(var_y, 1e-8))


def attributes(img: np.ndarray) -> dict[str, str]:
    """Words that are true of the image: thickness (thin/thick) and slant (slanted/upright/backward-leaning)."""
    out = {}
    width, shear = stroke_width(img), slant(img)
    if width < THIN_BELOW:
        out["thickness"] = "thin"
    elif width > THICK_ABOVE:
        out["thickness"] = "thick"
    if shear > SLANTED_ABOVE:
        out["slant"] = "slanted"
    elif shear < BACKWARD_BELOW:
        out["slant"] = "backward-leaning"
    elif abs(shear) < UPRIGHT_WITHIN:
        out["slant"] = "upright"
    return out


def caption(img: np.ndarray, label: int) -> str:
    """E.g. 'a thick slanted seven'; img (H, W) in [0, 1]."""
    attrs = attributes(img)
    words = [w for w in (attrs.get("thickness"), attrs.get("slant"), DIGIT_WORDS[int(label)]) if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def label_of(text: str) -> int:
    """The digit a caption names (its last word)."""
    return DIGIT_WORDS.index(text.split()[-1])
