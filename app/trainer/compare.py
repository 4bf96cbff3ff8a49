"""Paired comparison of a base with patches or FT models: the same sampling seeds for every arm, FID-like against
the train and the test split with a bootstrap SE of the paired difference, class accuracy, and the held-out loss
per timestep decile (same images, timesteps and noise). Sampled features are cached, so reruns only add arms."""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from app.trainer.evaluate import EVAL_SAMPLING, Evaluator, eval_conditions, frechet_distance, sample_images


def file_key(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def is_patch(path) -> bool:
    from app.model.dmp import read_header

    data = Path(path).read_bytes()
    return (read_header(data).get("__metadata__") or {}).get("format") == "dmp-patch"


def load_arm(base_path, path):
    """(model, patch) for one arm: a patch rides on the base; anything else is a full model (FT)."""
    from app.model import load_base, load_patch

    if path is None:
        return load_base(base_path), None
    if is_patch(path):
        model = load_base(base_path)
        return model, load_patch(path, base=model).eval()
    return load_base(path), None


def arm_features(ev: Evaluator, base_path, path, seed: int, sampler: str, steps: int, guidance: float,
                 cache: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Classifier features (n, F) of one arm's samples at one seed, and the predicted classes; cached on disk."""
    key = f"{file_key(path or base_path)}-{file_key(base_path)}-{sampler}{steps}-g{guidance}-s{seed}"
    f_path, p_path = cache / f"{key}.npy", cache / f"{key}.pred.npy"
    if f_path.exists():
        return np.load(f_path), (np.load(p_path) if p_path.exists() else None)
    model, patch = load_arm(base_path, path)
    model.eval()
    y, labels = eval_conditions(model, ev.test)
    images = sample_images(model, y, patch=patch, sampler=sampler, steps=steps, guidance_scale=guidance, seed=seed)
    feats = ev.features(images)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(f_path, feats)
    if labels is None:
        return feats, None
    with torch.no_grad():
        preds = torch.cat([ev.clf(images[i:i + 1000].float()).argmax(-1) for i in range(0, len(images), 1000)])
    np.save(p_path, preds.numpy())
    return feats, preds.numpy()


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


SUMMARY_KEYS = ("d_fid_like", "d_fid_like_pct", "d_fid_like_test", "d_fid_like_test_pct", "d_class_acc")


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
    return {"rel_diff_pct": [round(x, 3) for x, _ in deciles], "rel_diff_se_pct": [round(s, 3) for _, s in deciles],
            "all_rel_diff_pct": round(m, 3), "all_rel_diff_se_pct": round(se, 3), "se_over": "training runs"}


def compare(base_path, arms: dict[str, str | list[str]], seeds: list[int], *, sampler=EVAL_SAMPLING["sampler"],
            steps=EVAL_SAMPLING["steps"], guidance=EVAL_SAMPLING["guidance_scale"],
            cache="runs/compare", device="cpu", heldout=True, boots=100, classifier_dir="runs/classifiers",
            classifier_steps=3000, seed_per_run=False) -> dict:
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
    ev = Evaluator(base.meta.get("dataset"), base.config.input_size, device=device, progress=False,
                   classifier_dir=classifier_dir, classifier_steps=classifier_steps)
    labels = eval_conditions(base, ev.test)[1]
    cache = Path(cache)
    out = {"base": str(base_path), "seeds": seeds, "sampler": f"{sampler} {steps}, guidance {guidance}",
           "num_samples": len(ev.test), "floor": ev.floor["fid_like"], "seed_per_run": seed_per_run, "arms": {}}
    base_feats = {s: arm_features(ev, base_path, None, s, sampler, steps, guidance, cache) for s in seeds}
    base_losses = None
    if heldout:
        diffusion = Diffusion(base.meta.get("beta_schedule", "linear"), device)
        base_losses = decile_losses(base, diffusion, ev.test)
    out["base_scores"] = {s: {"fid_like": frechet_distance(ev.ref, f), "fid_like_test": frechet_distance(ev.test_ref, f),
                              **({"class_acc": float((p == labels.numpy()).mean())} if p is not None else {})}
                          for s, (f, p) in base_feats.items()}
    for label, paths in arms.items():
        runs = []
        for i, path in enumerate(paths):
            rows = {}
            for s in [seeds[i]] if seed_per_run else seeds:
                bf, bp = base_feats[s]
                af, ap = arm_features(ev, base_path, path, s, sampler, steps, guidance, cache)
                row = {}
                for name, ref in (("fid_like", ev.ref), ("fid_like_test", ev.test_ref)):
                    fb, fa, se = paired_fid(ref, bf, af, boots=boots, seed=s)
                    row |= {name: fa, f"d_{name}": fa - fb, f"d_{name}_pct": 100 * (fa - fb) / fb,
                            f"d_{name}_se": se}
                if ap is not None:
                    row |= {"class_acc": float((ap == labels.numpy()).mean()),
                            "d_class_acc": float((ap == labels.numpy()).mean() - (bp == labels.numpy()).mean())}
                rows[s] = row
            run = {"file": str(path), "per_seed": rows}
            model, patch = load_arm(base_path, path)
            if patch is not None:
                run |= patch_size_rms(model, patch, eval_conditions(model, ev.test)[0])
            if heldout:
                patched = decile_losses(model, diffusion, ev.test, patch=patch)
                run["heldout_deciles"] = paired_summary(base_losses, patched)
            runs.append(run)
        arm = {"runs": runs, "summary": summarise(runs)}
        if heldout:
            arm["heldout_deciles"] = pool_heldout([r["heldout_deciles"] for r in runs])
        out["arms"][label] = arm
    return out


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
        for key in ("d_fid_like_pct", "d_fid_like_test_pct"):
            diffs = [[run["per_seed"][s][key] - other["per_seed"][s][key] for s in run["per_seed"]]
                     for run, other in zip(arm["runs"], ref_runs)]
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
                     seed_per_run=args.seed_per_run)
    if args.versus:
        result["versus"] = {"ref": args.versus, "arms": versus(result, args.versus)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    for label, arm in result["arms"].items():
        s = arm["summary"]
        line = f"{label}: dFID-like {s['d_fid_like_pct']['mean']:+.2f}% (train ref), " \
               f"{s['d_fid_like_test_pct']['mean']:+.2f}% (test ref)"
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
    fids = ", ".join(f"{base[s]['fid_like']:.2f}" for s in seeds)
    fids_test = ", ".join(f"{base[s]['fid_like_test']:.2f}" for s in seeds)
    lines = [f"Base `{result['base']}`, {result['sampler']}, {result['num_samples']} samples per arm and seed, "
             f"sampling seeds {', '.join(map(str, seeds))} shared by every arm; floor (train vs test real) "
             f"{result['floor']:.2f}. Base FID-like per seed: {fids} (train ref), {fids_test} (test ref). "
             + ("Training run i of an arm is sampled at the i-th seed only, paired with the base at that seed. "
                if result.get("seed_per_run") else "") +
             "± is the standard error over the arm's training runs (each averaged over the sampling seeds) where it "
             "has several, else over the sampling seeds.", "",
             "| arm | training runs | Δ FID-like vs base, train ref (%) | Δ FID-like, test ref (%) | Δ class acc | "
             "Δ held-out loss (%) | Δ held-out loss per decile t∈[0,100) … [900,1000) (%) | added g·P rms |",
             "|---|---|---|---|---|---|---|---|"]
    for label, arm in result["arms"].items():
        s, runs = arm["summary"], arm["runs"]

        def cell(key):
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
        lines.append(f"| {label} | {len(runs)} | {cell('d_fid_like_pct')} | {cell('d_fid_like_test_pct')} | {acc} | "
                     f"{held} | {dec} | {size} |")
    if "versus" in result:
        ref = result["versus"]["ref"]
        lines += ["", f"Each arm minus **{ref}**, paired run by run at the same sampling seed (points of % of the "
                  "base's FID-like; negative = the arm is better than it):", "",
                  "| arm | vs train ref | vs test ref | per run (train ref) |", "|---|---|---|---|"]
        for label, row in result["versus"]["arms"].items():
            a, b = row["d_fid_like_pct"], row["d_fid_like_test_pct"]
            per = ", ".join(f"{v:+.2f}" for v in a["per_run"])
            lines.append(f"| {label} | {pm(a['mean'], a['se'])} | {pm(b['mean'], b['se'])} | {per} |")
    return "\n".join(lines) + "\n"
