"""PNG figures for docs/results.md: sample grids and the gate-activation heatmap (timestep x prompt, paper Fig. 5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


@torch.no_grad()
def gate_activations(model, patch, y: torch.Tensor, timesteps: int = 1000) -> torch.Tensor:
    """Gate weights (pt_depth, T, N) averaged over the conditions y, for every training timestep."""
    device = next(model.parameters()).device
    patch = patch.eval()
    out = []
    for t in range(timesteps):
        tt = torch.full((len(y),), float(t), device=device)
        t_emb = model.t_embedder(tt)
        c = t_emb + model.y_embedder(y.to(device), False)
        out.append(patch.gates(c, t_emb).mean(dim=1))  # (L, N)
    return torch.stack(out, dim=1).cpu()  # (L, T, N)


def save_gate_heatmap(gates: torch.Tensor, path, title: str = "") -> Path:
    """Heatmap per block of gate weight, timestep on the y axis and prompt index on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = gates.shape[0]
    shown = sorted({0, L // 2, L - 1})
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4), squeeze=False)
    for ax, l in zip(axes[0], shown):
        im = ax.imshow(gates[l].numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        ax.set_title(f"block {l}")
        ax.set_xlabel("prompt (token) index")
        ax.set_ylabel("timestep t")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
