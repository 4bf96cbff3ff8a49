"""Paired comparison of a base with patches or FT models: the same sampling seeds for every arm; Fréchet distance
against the held-out split by the independent extractors (pixels-PCA, random CNN) with a paired bootstrap SE; on the
bundled data sets also the old FID-like (our classifier, trained on the generators' data) against the train and the
test split and class accuracy; the held-out loss per timestep decile (same images, timesteps and noise). Sampled
images are cached, so reruns only add arms."""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.trainer.evaluate import EVAL_SAMPLING, Evaluator, eval_conditions, frechet_distance, heldout_split
from app.trainer.extractors import INDEPENDENT
from app.trainer.quality import FrechetToReal, Quality, frechet, paired_interval
from app.trainer.samples import arm_images, load_arm


def arm_features(ev: Evaluator | None, quality, base_path, path, seed: int, sampler: str, steps: int,
                 guidance: float, cache: Path, conditions: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """One arm's samples at one seed (cached images): features per independent extractor, and with a classifier
    its features ("fid_like") and predicted classes."""
    print(f"[compare] {Path(path or base_path).name} seed {seed}", flush=True)
    images, _ = arm_images(base_path, path, n=len(conditions), seed=seed, guidance=guidance, cache=cache,
                           sampler=sampler, steps=steps, conditions=conditions)
    out = {"independent": quality.features(images)}
    if ev is not None:
        out["fid_like"] = ev.features(images)
        if labels is not None:
            with torch.no_grad():
                out["pred"] = torch.cat([ev.clf(images[i:i + 1000].float()).argmax(-1)
                                         for i in range(0, len(images), 1000)]).numpy()
    return out


@torch.no_grad()
def patch_size_rms(model, patch, conditions: torch.Tensor) -> dict:
    """How far a patch moves the tokens: rms of its saved prompts, and of what it adds (g_n * P_n) over
    20 timesteps (0, 50, ..., 950), the first 10 evaluation conditions and every block."""
    from app.model.dmp.gatemap import gate_weights

    steps = list(range(0, 1000, 50))
    g = torch.stack([gate_weights(model, patch, conditions[i:i + 1], steps) for i in range(min(10, len(conditions)))])
    added = g[..., None] * patch.prompts.float().cpu()[None, :, None]  # (C, L, T, N, D)
    return {"prompt_rms": patch.prompts.float().pow(2).mean().sqrt().item(),
            "added_rms": added.pow(2).mean().sqrt().item()}


def paired_fid(ref: np.ndarray, base_f: np.ndarray, arm_f: np.ndarray, boots: int = 100, seed: int = 0):
    """FID-like of both, and the bootstrap SE of their difference resampling the paired samples together."""
    fb, fa = frechet_distance(ref, base_f), frechet_distance(ref, arm_f)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(boots):
        idx = rng.integers(0, len(base_f), len(base_f))
        diffs.append(frechet_distance(ref, arm_f[idx]) - frechet_distance(ref, base_f[idx]))
    return fb, fa, float(np.std(diffs, ddof=1))


def mean_se(values: list[float]) -> tuple[float, float | None]:
    if len(values) < 2:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


SUMMARY_KEYS = ("d_fid_like", "d_fid_like_pct", "d_fid_like_test", "d_fid_like_test_pct", "d_class_acc",
                *(f"d_fd_{e}{x}" for e in INDEPENDENT for x in ("", "_pct")))


def summarise(runs: list[dict]) -> dict:
    """Mean ± SE of each paired difference: over training runs (each averaged over its sampling seeds) when the
    arm has several, else over the sampling seeds of its one run."""
    summary = {}
    for key in SUMMARY_KEYS:
        if key not in next(iter(runs[0]["per_seed"].values())):
            continue
        if len(runs) > 1:
            m, se = mean_se([statistics.fmean(row[key] for row in r["per_seed"].values()) for r in runs])
            summary[key] = {"mean": m, "se": se, "se_over": "training runs"}
        else:
            m, se = mean_se([row[key] for row in runs[0]["per_seed"].values()])
            summary[key] = {"mean": m, "se": se, "se_over": "sampling seeds"}
    return summary


def pool_heldout(per_run: list[dict]) -> dict:
    """One run's paired held-out summary as is; several runs': per-decile means and SEs over the runs."""
    if len(per_run) == 1:
        return per_run[0]
    deciles = [mean_se([h["rel_diff_pct"][d] for h in per_run]) for d in range(len(per_run[0]["rel_diff_pct"]))]
    m, se = mean_se([h["all_rel_diff_pct"] for h in per_run])

    def rounded(x: float | None) -> float:
        assert x is not None, "several runs have a standard error"
        return round(x, 3)
    return {"rel_diff_pct": [round(x, 3) for x, _ in deciles], "rel_diff_se_pct": [rounded(s) for _, s in deciles],
            "all_rel_diff_pct": round(m, 3), "all_rel_diff_se_pct": rounded(se), "se_over": "training runs"}


def compare(base_path, arms: Mapping[str, str | list[str]], seeds: list[int], *, sampler=EVAL_SAMPLING["sampler"],
            steps=EVAL_SAMPLING["steps"], guidance=EVAL_SAMPLING["guidance_scale"],
            cache="runs/compare", device="cpu", heldout=True, boots=100, classifier_dir="runs/classifiers",
            classifier_steps=3000, seed_per_run=False, dataset: str | None = None, extractors=INDEPENDENT) -> dict:
    """Every arm against the base at every seed (same seeds, same conditions); arms map label -> file, or ->
    the files of several training runs (seeds) of the same recipe. seed_per_run: run i is sampled at seeds[i]
    only (and compared with the base at that seed), which costs one sampling pass per run instead of len(seeds)."""
    from app.model import load_base
    from app.trainer.diffusion import Diffusion
    from app.trainer.heldout import decile_losses, paired_summary

    arms = {label: [paths] if isinstance(paths, (str, Path)) else list(paths) for label, paths in arms.items()}
    for label, paths in arms.items():
        if seed_per_run and len(paths) != len(seeds):  # checked before any sampling
            raise ValueError(f"arm {label!r}: {len(paths)} training runs for {len(seeds)} seeds (one seed per run)")
    base = load_base(base_path)
    dataset = dataset or base.meta.get("dataset")
    if not dataset:
        raise ValueError("the base does not name its data set: pass --dataset")
    test = heldout_split(base_path, base, dataset)
    # the old FID-like needs our classifier of this data set: bundled sets only (a folder is scored independently)
    ev = None if dataset.startswith("folder:") else Evaluator(
        dataset, base.config.input_size, device=device, progress=False, classifier_dir=classifier_dir,
        classifier_steps=classifier_steps)
    quality = Quality(test.x, names=extractors)
    conditions, labels = eval_conditions(base, test)
    cache = Path(cache)
    out = {"base": str(base_path), "dataset": dataset, "seeds": seeds,
           "sampler": f"{sampler} {steps}, guidance {guidance}", "num_samples": len(test),
           "floor": ev.floor["fid_like"] if ev else None, "seed_per_run": seed_per_run, "arms": {}}

    def feats(path, s):
        return arm_features(ev, quality, base_path, path, s, sampler, steps, guidance, cache, conditions, labels)
    base_feats = {s: feats(None, s) for s in seeds}
    base_losses: torch.Tensor | None = None
    if heldout:
        diffusion = Diffusion(base.meta.get("beta_schedule", "linear"), device)
        base_losses = decile_losses(base, diffusion, test)
    out["base_scores"] = {s: base_scores(ev, quality, f, labels) for s, f in base_feats.items()}
    for label, paths in arms.items():
        runs = []
        for i, path in enumerate(paths):
            rows = {}
            for s in [seeds[i]] if seed_per_run else seeds:
                rows[s] = paired_row(ev, quality, base_feats[s], feats(path, s), labels, boots, s)
            run: dict[str, Any] = {"file": str(path), "per_seed": rows}
            model, patch = load_arm(base_path, path)
            if patch is not None:
                run |= patch_size_rms(model, patch, conditions)
            if heldout:
                patched = decile_losses(model, diffusion, test, patch=patch)
                assert base_losses is not None, "computed above when heldout"
                run["heldout_deciles"] = paired_summary(base_losses, patched)
            runs.append(run)
        arm: dict[str, Any] = {"runs": runs, "summary": summarise(runs)}
        if heldout:
            arm["heldout_deciles"] = pool_heldout([r["heldout_deciles"] for r in runs])
        out["arms"][label] = arm
    return out


def base_scores(ev, quality, f: dict, labels) -> dict:
    """The base's own scores at one seed: FD per independent extractor, and FID-like / class accuracy if any."""
    out = {f"fd_{e}": frechet(quality.real[e], x) for e, x in f["independent"].items()}
    if ev is not None:
        out |= {"fid_like": frechet_distance(ev.ref, f["fid_like"]),
                "fid_like_test": frechet_distance(ev.test_ref, f["fid_like"])}
    if "pred" in f:
        out["class_acc"] = float((f["pred"] == labels.numpy()).mean())
    return out


def paired_row(ev, quality, b: dict, a: dict, labels, boots: int, seed: int) -> dict:
    """Arm minus base at one seed, paired sample by sample: FD per independent extractor with a bootstrap SE, and
    with a classifier the FID-like against the train and test split and class accuracy."""
    row: dict[str, Any] = {}
    for e, real in quality.real.items():
        fb, fa = frechet(real, b["independent"][e]), frechet(real, a["independent"][e])
        fa_set, fb_set, fd = a["independent"][e], b["independent"][e], FrechetToReal(real)
        ci = paired_interval(lambda i, x=fa_set, y=fb_set, fd=fd: fd(x[i]) - fd(y[i]), len(fb_set), boots, seed)
        row |= {f"fd_{e}": fa, f"d_fd_{e}": fa - fb, f"d_fd_{e}_pct": 100 * (fa - fb) / fb, f"d_fd_{e}_se": ci["se"]}
    if ev is not None:
        for name, ref in (("fid_like", ev.ref), ("fid_like_test", ev.test_ref)):
            fb, fa, se = paired_fid(ref, b["fid_like"], a["fid_like"], boots=boots, seed=seed)
            row |= {name: fa, f"d_{name}": fa - fb, f"d_{name}_pct": 100 * (fa - fb) / fb, f"d_{name}_se": se}
    if "pred" in a:
        acc_a, acc_b = float((a["pred"] == labels.numpy()).mean()), float((b["pred"] == labels.numpy()).mean())
        row |= {"class_acc": acc_a, "d_class_acc": acc_a - acc_b}
    return row


def versus(result: dict, ref: str) -> dict:
    """Each arm minus the arm `ref`, paired run by run and seed by seed (run i of both saw the same sampling
    noise): mean ± SE over runs (or over seeds with one run) of the difference of their Δ FID-like %."""
    if ref not in result["arms"]:
        raise ValueError(f"--versus {ref!r} is not an arm ({', '.join(result['arms'])})")
    ref_runs = result["arms"][ref]["runs"]
    out = {}
    for label, arm in result["arms"].items():
        if label == ref or len(arm["runs"]) != len(ref_runs):
            continue
        row = {}
        for key in ("d_fid_like_pct", "d_fid_like_test_pct", *(f"d_fd_{e}_pct" for e in INDEPENDENT)):
            if key not in next(iter(arm["runs"][0]["per_seed"].values())):
                continue
            diffs = [[run["per_seed"][s][key] - other["per_seed"][s][key] for s in run["per_seed"]]
                     for run, other in zip(arm["runs"], ref_runs, strict=True)]
            values = [statistics.fmean(d) for d in diffs] if len(diffs) > 1 else diffs[0]
            m, se = mean_se(values)
            row[key] = {"mean": m, "se": se, "per_run": values}
        out[label] = row
    return out


def parse_arm(text: str) -> tuple[str, list[str]]:
    """'LABEL=FILE[,FILE...]': one recipe, one file per training run."""
    label, sep, files = text.partition("=")
    if not sep or not label or not files:
        raise ValueError(f"--arm wants LABEL=FILE[,FILE...], got {text!r}")
    return label, files.split(",")


def main_compare(args) -> None:
    arms = dict(parse_arm(a) for a in args.arm)
    if args.versus and args.versus not in arms:
        raise ValueError(f"--versus {args.versus!r} is not an arm ({', '.join(arms)})")
    result = compare(args.base, arms, args.seeds, sampler=args.sampler, steps=args.steps, guidance=args.guidance_scale,
                     cache=args.cache, device=args.device, heldout=not args.no_heldout, boots=args.boots,
                     seed_per_run=args.seed_per_run, dataset=args.dataset, extractors=args.extractors)
    if args.versus:
        result["versus"] = {"ref": args.versus, "arms": versus(result, args.versus)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    print(markdown(result))
    for label, arm in result["arms"].items():
        s = arm["summary"]
        line = f"{label}: " + ", ".join(f"dFD {e} {s[f'd_fd_{e}_pct']['mean']:+.2f}%" for e in INDEPENDENT
                                        if f"d_fd_{e}_pct" in s)
        if "d_fid_like_pct" in s:
            line += f", dFID-like (ours, classifier) {s['d_fid_like_pct']['mean']:+.2f}%"
        if "heldout_deciles" in arm:
            h = arm["heldout_deciles"]
            line += f", held-out loss {h['all_rel_diff_pct']:+.3f}% ± {h['all_rel_diff_se_pct']:.3f}"
        print(line)


def pm(mean: float, se: float | None, digits: int = 2) -> str:
    return f"{mean:+.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def markdown(result: dict) -> str:
    """The paired table: one row per arm, differences vs the base with their SE (over training runs when an arm
    has several, else over sampling seeds, else the bootstrap SE of one paired difference)."""
    seeds = result["seeds"]
    base = result["base_scores"]
    scored = (*(f"fd_{e}" for e in INDEPENDENT), "fid_like", "fid_like_test")
    names = [e for e in INDEPENDENT if f"fd_{e}" in base[seeds[0]]]
    per_seed = "; ".join(f"{k}: " + ", ".join(f"{base[s][k]:.3g}" for s in seeds)
                         for k in scored if k in base[seeds[0]])
    lines = [f"Base `{result['base']}` on `{result.get('dataset', '')}`, {result['sampler']}, {result['num_samples']} "
             f"samples per arm and seed (one per held-out image), sampling seeds {', '.join(map(str, seeds))} shared "
             f"by every arm. Base per seed: {per_seed}. "
             f"FD {' / '.join(names)}: against the held-out images, extractors that never saw the generators' data; "
             "FID-like: our classifier's features (trained on the generators' data: it rewards class sharpness), "
             "against the train / test split. "
             + ("Training run i of an arm is sampled at the i-th seed only, paired with the base at that seed. "
                if result.get("seed_per_run") else "") +
             "± is the standard error over the arm's training runs (each averaged over the sampling seeds) where it "
             "has several, else over the sampling seeds, else the paired bootstrap SE.", "",
             "| arm | training runs | " + "".join(f"Δ FD {e} (%) | " for e in names)
             + "Δ FID-like (ours), train ref (%) | Δ FID-like (ours), test ref (%) | Δ class acc | "
             "Δ held-out loss (%) | Δ held-out loss per decile t∈[0,100) … [900,1000) (%) | added g·P rms |",
             "|---|---|" + "---|" * (len(names) + 6)]
    for label, arm in result["arms"].items():
        s, runs = arm["summary"], arm["runs"]

        def cell(key, s=s, runs=runs):
            if key not in s:
                return "—"
            m, se = s[key]["mean"], s[key]["se"]
            if se is None:  # one run, one seed: the bootstrap SE of the paired difference, in % of the base
                k, row = key.removesuffix("_pct"), next(iter(runs[0]["per_seed"].values()))
                se = 100 * row[f"{k}_se"] / (row[k.removeprefix("d_")] - row[k])
            return pm(m, se)
        acc = pm(s["d_class_acc"]["mean"], s["d_class_acc"]["se"], 3) if "d_class_acc" in s else "—"
        h = arm.get("heldout_deciles")
        held = pm(h["all_rel_diff_pct"], h["all_rel_diff_se_pct"], 3) if h else "—"
        dec = ", ".join(f"{m:+.2f}" for m in h["rel_diff_pct"]) if h else "—"
        added = [r["added_rms"] for r in runs if "added_rms" in r]
        size = f"{statistics.fmean(added):.2g}" if added else "—"
        lines.append(f"| {label} | {len(runs)} | " + "".join(f"{cell(f'd_fd_{e}_pct')} | " for e in names)
                     + f"{cell('d_fid_like_pct')} | {cell('d_fid_like_test_pct')} | {acc} | {held} | {dec} | {size} |")
    if "versus" in result:
        ref = result["versus"]["ref"]
        keys = [k for k in (*(f"d_fd_{e}_pct" for e in names), "d_fid_like_pct", "d_fid_like_test_pct")
                if any(k in row for row in result["versus"]["arms"].values())]
        lines += ["", f"Each arm minus **{ref}**, paired run by run at the same sampling seed (points of % of the "
                  "base's value; negative = the arm is better than it):", "",
                  "| arm | " + " | ".join(k.removeprefix("d_").removesuffix("_pct") for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for label, row in result["versus"]["arms"].items():
            lines.append(f"| {label} | " + " | ".join(pm(row[k]["mean"], row[k]["se"]) if k in row else "—"
                                                        for k in keys) + " |")
    return "\n".join(lines) + "\n"
