"""A patch's gate weights over timesteps and their heatmap (the paper's Fig. 5), for the trainer's figures and the
server's /patches/{name}/gates alike."""
from __future__ import annotations

import io

import torch

CHUNK = 100  # timesteps per forward: (CHUNK * B, D) conditions at a time


@torch.no_grad()
def gate_weights(model, patch, y: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """Eval-mode gate weights (pt_depth, T, N) at these timesteps, averaged over the conditions y (B,) or (B, E)."""
    device = next(model.parameters()).device
    pdev = patch.prompts.device
    was_training = patch.training
    patch.eval()
    try:
        cond = model.y_embedder(y.to(device), False)  # (B, D)
        out = []
        for i in range(0, len(timesteps), CHUNK):
            t = torch.tensor(timesteps[i:i + CHUNK], dtype=torch.float32, device=device)
            t_emb = model.t_embedder(t)  # (T, D)
            c = (t_emb[:, None] + cond[None]).flatten(0, 1)  # (T * B, D)
            g = patch.gates(c.to(pdev), t_emb.repeat_interleave(len(cond), 0).to(pdev))  # (L, T * B, N)
            out.append(g.unflatten(1, (len(t), len(cond))).mean(dim=2).float().cpu())  # (L, T, N)
        return torch.cat(out, dim=1)
    finally:
        patch.train(was_training)


def heatmap_png(gates: torch.Tensor, timesteps: list[int], blocks: list[int] | None = None, title: str = "",
                columns: int = 4, dpi: int = 80) -> bytes:
    """PNG of one panel per block: prompt index across, timestep up, colour = gate weight.

    Its size depends only on the number of panels (no tight bounding box), so a page can rely on it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(range(gates.shape[0])) if blocks is None else blocks
    cols = min(columns, len(blocks))
    rows = (len(blocks) + cols - 1) // cols
    n = gates.shape[2]
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows + 0.5), squeeze=False)
    extent = (-0.5, n - 0.5, timesteps[0], timesteps[-1])
    for ax in axes.flat[len(blocks):]:
        ax.axis("off")
    for ax, block in zip(axes.flat, blocks, strict=False):  # the grid may have more cells than blocks (turned off)
        im = ax.imshow(gates[block].numpy(), aspect="auto", origin="lower", cmap="viridis",
                       interpolation="nearest", extent=extent, vmin=0)
        ax.set_title(f"block {block}")
        ax.set_xlabel("prompt index")
        ax.set_ylabel("timestep t")
        fig.colorbar(im, ax=ax, fraction=0.046, label="gate weight")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
