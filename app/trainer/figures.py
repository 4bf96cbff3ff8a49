"""PNG figures for docs/results.md: sample grids and the gate-activation heatmap (timestep x prompt, paper Fig. 5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.model.dmp.gatemap import gate_weights, heatmap_png
from app.model.vae import to_uint8


def save_grid(images: torch.Tensor, path, ncol: int = 10, scale: int = 2) -> Path:
    """images (B, C, H, W) in [-1, 1] -> one PNG grid with a 2-px gap."""
    pix = to_uint8(images).numpy()  # (B, H, W, C)
    b, h, w, c = pix.shape
    nrow = (b + ncol - 1) // ncol
    grid = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), 128, dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = pix[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return Path(path)


def gate_activations(model, patch, y: torch.Tensor, timesteps: int = 1000) -> torch.Tensor:
    """Gate weights (pt_depth, T, N) averaged over the conditions y, for every training timestep."""
    return gate_weights(model, patch, y, list(range(timesteps)))


def save_gate_heatmap(gates: torch.Tensor, path, title: str = "") -> Path:
    """Heatmap of gate weight (timestep up, prompt index across) for the first, middle and last block."""
    L = gates.shape[0]
    png = heatmap_png(gates, list(range(gates.shape[1])), sorted({0, L // 2, L - 1}), title=title, columns=3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)
    return Path(path)
