"""PNG figures for docs/results.md: sample grids and the gate-activation heatmap (timestep x prompt, paper Fig. 5)."""
from __future__ import annotations

import json
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
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
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


def heldout_curve(paths: list) -> list[tuple[int, float]]:
    """Held-out loss (step, loss) of a base and the runs that continued it, steps counted from the first's start."""
    from app.model.dmp import read_header

    curve, offset = [], 0
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: not a file")
        meta = read_header(Path(path).read_bytes()).get("__metadata__") or {}
        metrics = json.loads(meta.get("metrics", "{}"))
        if not metrics.get("heldout_loss_curve"):
            raise ValueError(f"{path} records no held-out loss curve (not made by this project's trainer?)")
        curve += [(offset + int(s), float(v)) for s, v in metrics["heldout_loss_curve"]]
        offset += int(metrics.get("steps", 0))
    return curve


def flatness(curve: list[tuple[int, float]], tail: float = 0.2) -> dict:
    """Relative change of the held-out loss over the last `tail` of the steps (from the last eval at or before
    (1 - tail) x the final step): 'flat' in docs/results_analysis.md means |change| < 0.5 %."""
    end_step, end = curve[-1]
    before = [(s, v) for s, v in curve if s <= (1 - tail) * end_step]
    start_step, start = before[-1] if before else curve[0]
    change = 100 * (end - start) / start
    return {"from_step": start_step, "to_step": end_step, "from": start, "to": end, "change_pct": change,
            "flat": abs(change) < 0.5}


def save_loss_curve(curves: dict[str, list[tuple[int, float]]], path, title: str = "") -> Path:
    """Held-out loss against step (log y) for each named curve, the last 20 % of each shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, curve in curves.items():
        steps, losses = zip(*curve, strict=True)
        ax.plot(steps, losses, marker=".", label=name)
        ax.axvspan(0.8 * steps[-1], steps[-1], alpha=0.08)
    ax.set(xlabel="training step", ylabel="held-out loss (test split, fixed noise)", yscale="log", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
