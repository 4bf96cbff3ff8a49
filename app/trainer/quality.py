"""Sample quality against held-out real images, per feature extractor: Fréchet distance and KID (torchmetrics, on
precomputed features), precision and recall (Kynkäänniemi et al. 2019, k-NN manifolds), and paired bootstrap
intervals of arm - base (scipy.stats.bootstrap over the paired samples)."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import bootstrap
from torch import nn

from app.trainer.extractors import INDEPENDENT, build_extractors, features

PR_K = 3  # the paper's default neighbourhood size


class Given(nn.Module):
    """Passes precomputed features (N, F) through, so torchmetrics' metrics run on them."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f


def frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of two feature sets (N, F), torchmetrics' FrechetInceptionDistance on them."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=Given(real.shape[1]), normalize=True)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


class FrechetToReal:
    """Fréchet distance of feature sets to one fixed real set, for the paired bootstrap's hundreds of resamples:
    torchmetrics takes the general eigenvalues of S_real·S_fake (0.8-2.3 s at 1280-d); the same trace comes from a
    symmetric eigenproblem, tr √(S_r S_f) = Σ √eig(YᵀY) = Σ √eig(YYᵀ), Y = centred fakes · S_r^½ / √(n−1), solved on
    the smaller side (0.04 s). Equal to `frechet` to float64 rounding (tests/trainer/test_quality.py)."""

    def __init__(self, real: torch.Tensor):
        real = real.double()
        self.mu = real.mean(0)
        cov = torch.cov(real.T)  # (F, F), unbiased as torchmetrics'
        w, v = torch.linalg.eigh(cov)
        self.sqrt_cov = (v * w.clamp(min=0).sqrt()) @ v.T  # (F, F)
        self.trace = cov.trace()

    def __call__(self, fake: torch.Tensor) -> float:
        fake = fake.double()
        mu = fake.mean(0)
        centred = fake - mu  # (n, F)
        y = centred @ self.sqrt_cov / (len(fake) - 1) ** 0.5  # (n, F)
        gram = y @ y.T if len(fake) < y.shape[1] else y.T @ y  # the smaller of (n, n) and (F, F)
        root_trace = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum()
        fake_trace = centred.square().sum() / (len(fake) - 1)  # tr S_f
        return float((self.mu - mu).square().sum() + self.trace + fake_trace - 2 * root_trace)


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 500, seed: int = 0) -> float:
    """Kernel inception distance (unbiased MMD², cubic kernel), mean over random subsets, torchmetrics'."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=Given(real.shape[1]), subsets=subsets, subset_size=size, normalize=True)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # its subsets come from torch's global generator
        return float(metric.compute()[0])


def knn_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (N,)."""
    d = torch.cdist(f, f)
    return d.kthvalue(k + 1, dim=1).values  # +1: the row itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_K) -> tuple[float, float]:
    """Precision: share of fakes inside the real manifold (union of k-NN balls of the reals); recall: share of reals
    inside the fake manifold."""
    real, fake = real.double(), fake.double()
    d = torch.cdist(fake, real)  # (Nf, Nr)
    precision = (d <= knn_radii(real, k)[None]).any(1).double().mean()
    recall = (d.T <= knn_radii(fake, k)[None]).any(1).double().mean()
    return float(precision), float(recall)


def paired_interval(stat, n: int, resamples: int = 200, seed: int = 0) -> dict:
    """95 % percentile bootstrap interval and SE of stat(idx), idx resampling n paired samples (scipy's bootstrap)."""
    res = bootstrap((np.arange(n),), lambda i: stat(i.astype(int)), vectorized=False, n_resamples=resamples,
                    method="percentile", random_state=np.random.default_rng(seed))
    ci = res.confidence_interval
    return {"low": float(ci.low), "high": float(ci.high), "se": float(res.standard_error)}


class Quality:
    """Scores images against held-out real images with every extractor (and class accuracy if given a classifier)."""

    def __init__(self, heldout: torch.Tensor, classifier=None, names=INDEPENDENT):
        self.heldout, self.classifier = heldout.float(), classifier
        self.extractors = build_extractors(self.heldout, classifier, names)
        self.real = {name: features(e, self.heldout) for name, e in self.extractors.items()}

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: features(e, images.float()) for name, e in self.extractors.items()}

    @torch.no_grad()
    def class_acc(self, images: torch.Tensor, labels: torch.Tensor | None) -> float | None:
        if self.classifier is None or labels is None:
            return None
        preds = torch.cat([self.classifier(images[i:i + 500].float()).argmax(-1) for i in range(0, len(images), 500)])
        return float((preds == labels).double().mean())

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """{extractor: {fd, kid, precision, recall}} and class_acc of one image set."""
        out: dict = {"num_samples": len(images), "num_real": len(self.heldout), "extractors": {}}
        for name, f in self.features(images).items():
            p, r = precision_recall(self.real[name], f)
            out["extractors"][name] = {"fd": frechet(self.real[name], f), "kid": kid(self.real[name], f),
                                       "precision": p, "recall": r}
        acc = self.class_acc(images, labels)
        if acc is not None:
            out["class_acc"] = acc
        return out

    def paired(self, base: torch.Tensor, arm: torch.Tensor, labels: torch.Tensor | None = None,
               resamples: int = 200, seed: int = 0) -> dict:
        """Both scores and, per extractor, the change of FD arm - base with a 95 % paired bootstrap interval of the
        difference (in % of the base's FD on all samples): sample i of both sets came from the same noise and
        condition."""
        if len(base) != len(arm):
            raise ValueError(f"paired sets differ in size: {len(base)} vs {len(arm)}")
        sb, sa = self.score(base, labels), self.score(arm, labels)
        fb, fa = self.features(base), self.features(arm)
        delta = {}
        for name in fb:
            fd, b0 = FrechetToReal(self.real[name]), sb["extractors"][name]["fd"]

            def change(i, name=name, fd=fd):  # absolute: resampling's duplicates bias both FDs alike
                return fd(fa[name][i]) - fd(fb[name][i])
            ci = paired_interval(change, len(base), resamples, seed)
            delta[name] = {"d_fd": sa["extractors"][name]["fd"] - b0,
                           "d_fd_pct": 100 * (sa["extractors"][name]["fd"] - b0) / b0,
                           "ci95_pct": [100 * ci["low"] / b0, 100 * ci["high"] / b0], "se_pct": 100 * ci["se"] / b0}
        return {"base": sb, "arm": sa, "delta": delta}
