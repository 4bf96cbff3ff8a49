"""A small CNN trained by the project on each data set: its penultimate features drive the FID-like score."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from app.trainer.data import DataSet

FEATURE_DIM = 128


class Classifier(nn.Module):
    """conv 32-64-128 with pooling (cheap enough for CPU), global average, a 128-d feature layer, then logits."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature = nn.Linear(128, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.feature(self.body(x)))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, classes)


@torch.no_grad()
def accuracy(clf: Classifier, x: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    clf.eval()
    preds = torch.cat([clf(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return (preds.cpu() == labels.cpu()).float().mean().item()


def train_classifier(train: DataSet, test: DataSet, steps: int = 3000, batch: int = 128, seed: int = 0,
                     device="cpu", progress: bool = True) -> tuple[Classifier, float]:
    """Adam with light shift augmentation; returns the classifier and its test accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    clf = Classifier(train.x.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x, y = train.x.to(device), train.labels.to(device)
    bar = tqdm(range(steps), desc=f"classifier {train.name}", disable=not progress)
    for _ in bar:
        clf.train()
        idx = torch.randint(0, len(x), (batch,), device=device, generator=gen)
        xb = x[idx]
        shift = torch.randint(-2, 3, (2,), generator=gen, device=device).tolist()
        xb = torch.roll(xb, shifts=shift, dims=(2, 3))  # small translations; flips would change digits
        loss = F.cross_entropy(clf(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    acc = accuracy(clf, test.x.to(device), test.labels)
    return clf.eval(), acc


def save_classifier(clf: Classifier, path, **meta) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    info = {"in_channels": clf.in_channels, "num_classes": clf.num_classes, **meta}
    save_file({k: v.cpu().contiguous() for k, v in clf.state_dict().items()}, str(path),
              metadata={"classifier": json.dumps(info)})


def load_classifier(path, device="cpu") -> tuple[Classifier, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["classifier"])
    clf = Classifier(info["in_channels"], info["num_classes"])
    clf.load_state_dict(load_file(str(path)))
    return clf.to(device).eval(), info
