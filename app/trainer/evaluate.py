"""FID-like score (Fréchet distance on our classifier's features, never called FID), KID, class accuracy,
with the floor (train vs test real images) and ceiling (real vs noise) reported beside every score.
Scores are against the real train split and, as `*_test`, against the held-out test split."""
from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from scipy import linalg

from app.model.sampling import clips_x0, denoise_step, new_job
from app.trainer.classifier import load_classifier, save_classifier, train_classifier
from app.trainer.data import DataSet, load_splits


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) of two feature sets (N, F)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)  # (no `disp=`: newer SciPy removed it)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 20, subset_size: int = 200,
                              seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets (Bińkowski et al.)."""
    rng = np.random.default_rng(seed)
    d = f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    total = 0.0
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        total += ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return float(total / subsets)


class Evaluator:
    """Scores generated images of one data set against its real train split."""

    def __init__(self, dataset: str, image_size: int = 32, device="cpu", classifier_dir="runs/classifiers",
                 classifier_steps: int = 3000, progress: bool = True, data_kwargs: dict | None = None):
        self.device = device
        self.train, self.test = load_splits(dataset, image_size, **(data_kwargs or {}))
        eval_name = dataset.removesuffix("-captions")  # captioned digits use the digit classifier
        path = Path(classifier_dir) / f"{eval_name}-{image_size}.safetensors"
        if path.exists():
            self.clf, info = load_classifier(path, device)
            self.classifier_acc = info["test_accuracy"]
        else:
            self.clf, self.classifier_acc = train_classifier(self.train, self.test, steps=classifier_steps,
                                                             device=device, progress=progress)
            save_classifier(self.clf, path, test_accuracy=self.classifier_acc, dataset=eval_name,
                            steps=classifier_steps)
        self.ref = self.features(self.train.x)
        self.test_ref = test_f = self.features(self.test.x)
        noise = torch.rand(self.test.x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1  # uniform noise
        self.floor = {"fid_like": frechet_distance(self.ref, test_f),
                      "kid": kernel_inception_distance(self.ref, test_f), "class_acc": self.classifier_acc}
        noise_f = self.features(noise)
        self.ceiling = {"fid_like": frechet_distance(self.ref, noise_f),
                        "kid": kernel_inception_distance(self.ref, noise_f)}
        self.num_samples = len(self.test)

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 1000) -> np.ndarray:
        return torch.cat([self.clf.features(x[i:i + batch].to(self.device).float()).cpu()
                          for i in range(0, len(x), batch)]).double().numpy()

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """images (N, C, H, W) in [-1, 1]; labels: the class each image was asked for (class/text models)."""
        f = self.features(images)
        out = {"fid_like": frechet_distance(self.ref, f), "kid": kernel_inception_distance(self.ref, f),
               "fid_like_test": frechet_distance(self.test_ref, f),
               "kid_test": kernel_inception_distance(self.test_ref, f), "num_samples": len(images)}
        if labels is not None:
            preds = torch.cat([self.clf(images[i:i + 1000].to(self.device).float()).argmax(-1).cpu()
                               for i in range(0, len(images), 1000)])
            out["class_acc"] = (preds == labels.cpu()).float().mean().item()
        return out


def eval_conditions(model, test: DataSet) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditions for one sample per test image: its label, its caption embedding, or the null class."""
    if model.config.task == "text":
        assert test.text is not None, "a text data set carries its caption embeddings"
        return test.text, test.labels
    if model.config.task == "class":
        return test.labels, test.labels
    return torch.zeros(len(test), dtype=torch.long), None


class EvalSampling(TypedDict):
    sampler: str
    steps: int
    guidance_scale: float


# evaluation; a trained base's serving default
EVAL_SAMPLING: EvalSampling = {"sampler": "ddim", "steps": 50, "guidance_scale": 1.5}


@torch.no_grad()
def sample_images(model, y: torch.Tensor, *, patch=None, sampler=EVAL_SAMPLING["sampler"],
                  steps=EVAL_SAMPLING["steps"], guidance_scale=EVAL_SAMPLING["guidance_scale"], seed=0,
                  chunk=1000, dtype=torch.float32, progress=False) -> torch.Tensor:
    """Samples (N, C, H, W) in [-1, 1] for conditions y, in chunks of one job each (seed + chunk index)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    beta_schedule = getattr(model, "meta", {}).get("beta_schedule", "linear")
    outs = []
    for i in range(0, len(y), chunk):
        yc = y[i:i + chunk].to(device)
        job = new_job(model, y=yc, seed=seed * 100_003 + i, sampler=sampler, steps=steps, n=len(yc),
                      guidance_scale=guidance_scale, patch=patch, beta_schedule=beta_schedule,
                      clip_sample=clips_x0("pixel"),  # scored in pixels: the trainer's evaluation data
                      device=device)
        for _ in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
            denoise_step(model, [job], dtype=dtype)
        outs.append(job.latents.float().clamp(-1, 1).cpu())
    return torch.cat(outs)


def load_model_and_patch(base_path, patch_path=None, device="cpu"):
    """The base (or a full FT checkpoint) and an optional patch checked against it (PatchError if foreign)."""
    from app.model import load_base, load_patch

    model = load_base(base_path).to(device)
    patch = load_patch(patch_path, base=model).to(device).eval() if patch_path else None
    return model, patch


def evaluate(base_path, patch_path=None, dataset: str | None = None, *, sampler=EVAL_SAMPLING["sampler"],
             steps=EVAL_SAMPLING["steps"], guidance_scale=EVAL_SAMPLING["guidance_scale"], seed=0, device="cpu",
             evaluator: Evaluator | None = None, return_images=False, progress=False, classifier_steps: int = 3000,
             heldout=False):
    """Sample one image per test item and score it; returns metrics (and the images if asked).
    heldout: also the held-out loss per timestep decile, and with a patch its paired difference to the base."""
    model, patch = load_model_and_patch(base_path, patch_path, device)
    dataset = dataset or model.meta.get("dataset")
    if not dataset:
        raise ValueError("the base does not name its data set: pass --dataset")
    evaluator = evaluator or Evaluator(dataset, model.config.input_size, device=device, progress=progress,
                                       classifier_steps=classifier_steps,
                                       data_kwargs=data_kwargs_for(base_path, model, dataset))
    y, labels = eval_conditions(model, evaluator.test)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    images = sample_images(model, y, patch=patch, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                           seed=seed, dtype=dtype, progress=progress)
    result = evaluator.score(images, labels if model.config.task != "uncond" else None)
    result |= {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
               "floor": evaluator.floor, "ceiling": evaluator.ceiling, "classifier_acc": evaluator.classifier_acc}
    if heldout:
        result["heldout_deciles"] = heldout_deciles(model, patch, evaluator.test, device)
    return (result, images) if return_images else result


def data_kwargs_for(base_path, model, dataset: str) -> dict:
    """How to read `dataset` as this base sees it: a folder in the base's channels, its classes by the base's labels.
    Scoring is in pixels, so latent bases are refused."""
    from app.model.describe import describe

    desc = describe(base_path)
    if (desc.vae or "pixel") != "pixel":
        raise ValueError(f"{Path(base_path).name} is a latent model: evaluation scores pixel-space bases only")
    if not dataset.startswith("folder:"):
        return {}
    kw = {"channels": model.config.in_channels}
    if model.config.task == "class":
        kw["labels"] = desc.labels or [str(i) for i in range(model.config.num_classes)]
    elif model.config.task == "text":
        kw["text_encoder"] = desc.text_encoder or "minilm"
    return kw


def heldout_split(base_path, model, dataset: str) -> DataSet:
    """The held-out (test) split of `dataset`, at the base's size and channels."""
    from app.trainer.data import load_dataset

    data = load_dataset(dataset, "test", model.config.input_size, **data_kwargs_for(base_path, model, dataset))
    if data.x.shape[1:] != (model.config.in_channels, model.config.input_size, model.config.input_size):
        raise ValueError(f"{dataset} reads as {tuple(data.x.shape[1:])} images, the base makes "
                         f"{(model.config.in_channels, model.config.input_size, model.config.input_size)}")
    if data.task != model.config.task:
        raise ValueError(f"{dataset} is a {data.task} data set, the base a {model.config.task} model")
    return data


def heldout_deciles(model, patch, test: DataSet, device) -> dict:
    """Held-out loss per timestep decile of model+patch, paired with the same model unpatched."""
    from app.trainer.diffusion import Diffusion
    from app.trainer.heldout import decile_losses, paired_summary

    diffusion = Diffusion(getattr(model, "meta", {}).get("beta_schedule", "linear"), device)
    test = test.to(device)
    base = decile_losses(model, diffusion, test)
    if patch is None:
        return {"base": [round(v, 6) for v in base.mean(1).tolist()]}
    return paired_summary(base, decile_losses(model, diffusion, test, patch=patch))


def score_on_dataset(base_path, patch_path=None, dataset: str | None = None, *, num_samples: int = 0,
                     sampler=EVAL_SAMPLING["sampler"], steps=EVAL_SAMPLING["steps"],
                     guidance_scale=EVAL_SAMPLING["guidance_scale"], seed=0, device="cpu", resamples: int = 200,
                     heldout=False, classifier_steps: int = 0, extractors: tuple[str, ...] | None = None) -> dict:
    """The base (and, paired, base + patch) scored against the held-out split of `dataset` by the independent
    extractors (app/trainer/quality.py): FD, KID, precision/recall, with a 95 % paired interval of the change.
    classifier_steps > 0 on a bundled data set adds our classifier's column and class accuracy (labelled: it was
    trained on the generators' data); folders get none."""
    from app.trainer.extractors import INDEPENDENT
    from app.trainer.quality import Quality

    model, patch = load_model_and_patch(base_path, patch_path, device)
    dataset = dataset or model.meta.get("dataset")
    if not dataset:
        raise ValueError("the base does not name its data set: pass --dataset")
    test = heldout_split(base_path, model, dataset)
    if len(test) < 10:
        raise ValueError(f"{dataset} has {len(test)} held-out images (10 % of it): at least 10 are needed")
    print(f"[eval] {len(test)} held-out images of {dataset}, {tuple(test.x.shape[1:])}", flush=True)
    y, labels = eval_conditions(model, test)
    n = num_samples or len(test)
    reps = -(-n // len(test))
    y = y.repeat(reps, *([1] * (y.dim() - 1)))[:n]  # the held-out conditions, cycled to n samples
    labels = labels.repeat(reps)[:n] if labels is not None else None
    clf = None
    if classifier_steps > 0 and not dataset.startswith("folder:"):
        clf = Evaluator(dataset, model.config.input_size, device=device, classifier_steps=classifier_steps).clf
    quality = Quality(test.x, clf, names=extractors or INDEPENDENT)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    kw = dict(sampler=sampler, steps=steps, guidance_scale=guidance_scale, seed=seed, dtype=dtype, progress=True)
    print(f"[eval] sampling {n} images from the base", flush=True)
    base_images = sample_images(model, y, **kw)
    result = {"dataset": dataset, "num_heldout": len(test), "sampler": sampler, "steps": steps,
              "guidance_scale": guidance_scale, "seed": seed}
    if patch is None:
        result["base"] = quality.score(base_images, labels)
    else:
        print(f"[eval] sampling {n} images with the patch (same noise and conditions)", flush=True)
        patched = sample_images(model, y, patch=patch, **kw)
        print("[eval] scoring (paired bootstrap)", flush=True)
        result |= quality.paired(base_images, patched, labels, resamples=resamples, seed=seed)
        result["patch"] = result.pop("arm")
    if heldout:
        result["heldout_deciles"] = heldout_deciles(model, patch, test, device)
    return result


def quality_table(result: dict) -> str:
    """The scores as a markdown table: one row per extractor, base (and patch, and the change with its 95 % CI)."""
    from app.trainer.extractors import DESCRIPTIONS

    paired = "patch" in result
    head = "| extractor | FD base | KID base | P / R base |"
    head += " FD patch | KID patch | P / R patch | Δ FD (%) [95 % CI] |" if paired else ""
    lines = [head, "|" + "---|" * head.count(" | ")]
    for name, b in result["base"]["extractors"].items():
        row = f"| {name} | {b['fd']:.4g} | {b['kid']:.3g} | {b['precision']:.3f} / {b['recall']:.3f} |"
        if paired:
            a, d = result["patch"]["extractors"][name], result["delta"][name]
            lo, hi = d["ci95_pct"]
            row += (f" {a['fd']:.4g} | {a['kid']:.3g} | {a['precision']:.3f} / {a['recall']:.3f} | "
                    f"{d['d_fd_pct']:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
        lines.append(row)
    notes = [f"{k}: {v[0]}" for k, v in DESCRIPTIONS.items() if k in result["base"]["extractors"]]
    return "\n".join(lines) + "\n" + "; ".join(notes) + f". Against {result['num_heldout']} held-out images.\n"
