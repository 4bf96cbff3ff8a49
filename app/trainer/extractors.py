"""Feature extractors for scoring samples, most of them independent of the data the generators learned from:
pixels-PCA fitted on held-out images, a randomly initialised CNN, and (labelled as such) the project's own classifier
trained on the generators' training split. No pretrained image network ships inside an installable package here
(pytorch-fid, clean-fid, torch-fidelity and piq download their weights at run time; lpips ships only its linear
heads), so none is used."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PCA_DIM = 32


class PixelPCA(nn.Module):
    """Images -> their first PCA_DIM principal components, fitted on a given set (N, C, H, W)."""

    mean: torch.Tensor  # registered buffers (dim-of-pixels,), (P, dim)
    components: torch.Tensor

    def __init__(self, fit: torch.Tensor, dim: int = PCA_DIM):
        super().__init__()
        flat = fit.flatten(1).double()
        self.num_features = min(dim, flat.shape[0] - 1, flat.shape[1])
        mean = flat.mean(0)
        _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)  # exact, so every run fits the same basis
        self.register_buffer("mean", mean.float())
        self.register_buffer("components", vh[:self.num_features].T.float())  # (P, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).float() - self.mean) @ self.components  # (B, dim)


class RandomCNN(nn.Module):
    """A fixed, randomly initialised CNN (seeded; never trained): mean- and max-pooled responses of three conv
    layers, 3 x 2 x 64 = 384 features. Random conv features separate image distributions without having seen any."""

    def __init__(self, in_channels: int, seed: int = 0, width: int = 64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        convs = [nn.Conv2d(c, width, 3, padding=1) for c in (in_channels, width, width)]
        self.convs = nn.ModuleList(convs)
        with torch.no_grad():
            for conv in convs:  # He-normal weights from the seed alone: the same network everywhere
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                assert conv.bias is not None  # Conv2d's default bias=True
                conv.bias.zero_()
        self.num_features = 3 * 2 * width
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x.float()
        for i, conv in enumerate(self.convs):
            h = F.relu(conv(h))
            feats += [h.mean((2, 3)), h.amax((2, 3))]
            if i < 2 and min(h.shape[-2:]) >= 4:
                h = F.avg_pool2d(h, 2)
        return torch.cat(feats, 1)  # (B, 384)


class ClassifierFeatures(nn.Module):
    """The project's classifier's 128-d penultimate features (trained on the generators' training split)."""

    def __init__(self, clf):
        super().__init__()
        self.clf, self.num_features = clf, clf.feature.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.features(x.float())


# name -> (what it is, whether it saw the generators' training data)
DESCRIPTIONS = {
    "pca": ("pixels-PCA-32 fitted on the held-out images", False),
    "randcnn": ("randomly initialised CNN, 384-d (seed 0, never trained)", False),
    "classifier": ("our classifier's 128-d features: the old 'FID-like' (trained on the generators' data)", True),
}


def build_extractors(heldout: torch.Tensor, classifier=None) -> dict[str, nn.Module]:
    """The independent extractors for images shaped like `heldout` (N, C, H, W), plus the classifier's if given."""
    out: dict[str, nn.Module] = {"pca": PixelPCA(heldout).eval(), "randcnn": RandomCNN(heldout.shape[1]).eval()}
    if classifier is not None:
        out["classifier"] = ClassifierFeatures(classifier).eval()
    return out


@torch.no_grad()
def features(extractor: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """(N, F) float64 features of images (N, C, H, W) in [-1, 1]."""
    return torch.cat([extractor(images[i:i + batch]) for i in range(0, len(images), batch)]).double()
