"""Scores the runs of patches/domain_table.sh with the independent extractors (pixels-PCA, random CNN;
app/trainer/quality.py): each run's samples against the held-out images of its target domain (how far it moves the
mnist base there) and against held-out MNIST (what it costs on the original domain), as the change of Fréchet
distance in % of the base's, paired with the base at the same sampling seed (= the training seed) and conditions.
The samples are `compare --dataset`'s (app/trainer/samples.py, same cache keys), so
`compare --dataset folder:OUT_DIR/data/STYLE --seed-per-run --cache OUT_DIR/samples` reads them back.

    python scripts/domain_table.py OUT_DIR [--samples N] [--sample-steps S] [--json F] [--markdown F] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from app.model import load_base
from app.trainer.domains import ink_share
from app.trainer.evaluate import EVAL_SAMPLING, eval_conditions, heldout_split
from app.trainer.extractors import DESCRIPTIONS
from app.trainer.quality import Quality, frechet
from app.trainer.samples import arm_images

BASE = "models/mnist.safetensors"
STYLES = ("thick", "inverted")
ROWS = (("dmp", "+DMP (default recipe)"), ("pt", "+PT (--baseline pt)"), ("ft", "+FT (--baseline ft)"))
SHIPPED = ("shipped", "+DMP shipped `mnist-thick-dmp` (1,000 steps)")
SEEDS = (0, 1, 2)
EXTRACTORS = ("pca", "randcnn")


def summary(values: list[float]) -> dict:
    """Mean, SE over training runs (None with one run) and range of one measure."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se, "min": min(values), "max": max(values), "n": len(values)}


def fds(refs: dict[str, Quality], images: torch.Tensor) -> dict[str, dict[str, float]]:
    """{reference: {extractor: FD of images to that reference's held-out images}}."""
    out = {}
    for ref, quality in refs.items():
        feats = quality.features(images)
        out[ref] = {e: frechet(quality.real[e], feats[e]) for e in EXTRACTORS}
    return out


def score_style(out: Path, style: str, mnist: Quality, cache: Path, n: int | None, steps: int) -> dict:
    """Every finished run of one style, each paired with the base at its training seed."""
    base = load_base(BASE).eval()
    target = heldout_split(BASE, base, f"folder:{out / 'data' / style}")
    conditions = eval_conditions(base, target)[0][:n]  # one sample per held-out image (its label)
    refs = {"target": Quality(target.x, names=EXTRACTORS), "mnist": mnist}
    sampling = {"guidance": EVAL_SAMPLING["guidance_scale"], "sampler": EVAL_SAMPLING["sampler"],
                "steps": steps, "cache": cache, "conditions": conditions, "n": len(conditions)}
    runs = [(row, s, out / f"{style}-{row}-s{s}.safetensors") for row, _ in ROWS for s in SEEDS]
    if style == "thick":
        runs.append((SHIPPED[0], 0, out / "mnist-thick-dmp.safetensors"))
    runs = [r for r in runs if r[2].exists()]
    result: dict = {"target_images": len(target), "mnist_images": len(mnist.heldout), "samples": len(conditions),
                    "real_ink": {"target": ink_share(target.x), "mnist": ink_share(mnist.heldout)},
                    "base": {}, "base_ink": {}, "runs": {}}
    for s in tqdm(SEEDS, desc=f"{style}: base", leave=False):
        images = arm_images(BASE, None, seed=s, **sampling)[0]
        result["base"][s], result["base_ink"][s] = fds(refs, images), ink_share(images)
    for row, seed, path in tqdm(runs, desc=f"{style}: runs", leave=False):
        images = arm_images(BASE, str(path), seed=seed, **sampling)[0]
        run_fd, base_fd = fds(refs, images), result["base"][seed]
        change = {ref: {e: 100 * (run_fd[ref][e] - base_fd[ref][e]) / base_fd[ref][e] for e in EXTRACTORS}
                  for ref in refs}
        ink, base_ink = ink_share(images), result["base_ink"][seed]
        gap = 100 * (ink - base_ink) / (result["real_ink"]["target"] - base_ink)  # share of the ink-share gap closed
        result["runs"].setdefault(row, []).append({"seed": seed, "file": path.name, "fd": run_fd, "d_fd_pct": change,
                                                   "ink": ink, "ink_gap_closed_pct": gap})
        print(style, row, seed, json.dumps(change), f"ink {ink:.3f} ({gap:+.0f} % of the gap)", flush=True)
    result["summary"] = {row: {ref: {e: summary([r["d_fd_pct"][ref][e] for r in rs]) for e in EXTRACTORS}
                               for ref in refs} | {"ink_gap_closed_pct": summary([r["ink_gap_closed_pct"] for r in rs])}
                         for row, rs in result["runs"].items()}
    return result


def cell(s: dict) -> str:
    """'mean ± SE [min, max]' of a % change; one run: its value."""
    if s["se"] is None:
        return f"{s['mean']:+.0f} % (1 run)"
    return f"{s['mean']:+.0f} % ± {s['se']:.0f} [{s['min']:+.0f}, {s['max']:+.0f}]"


def markdown(results: dict) -> str:
    lines = []
    for style, r in results.items():
        base = {ref: {e: statistics.fmean(b[ref][e] for b in r["base"].values()) for e in EXTRACTORS}
                for ref in ("target", "mnist")}
        lines += [(f"**{style}** ({r['samples']} samples per run, one per held-out {style} image; references: "
                   f"{r['target_images']} held-out {style} images, {r['mnist_images']} held-out MNIST images)"), "",
                  (f"| row | training seeds | Δ FD to {style}, pixels-PCA | Δ FD to {style}, random CNN | "
                   "Δ FD to MNIST, pixels-PCA | Δ FD to MNIST, random CNN | ink-share gap closed |"),
                  "|---|---|---|---|---|---|---|",
                  (f"| base (FD, mean of 3 sampling seeds) | — | {base['target']['pca']:.2f} | "
                   f"{base['target']['randcnn']:.2f} | {base['mnist']['pca']:.2f} | {base['mnist']['randcnn']:.2f} | "
                   f"ink {statistics.fmean(r['base_ink'].values()):.3f} (real: {r['real_ink']['target']:.3f}) |")]
        for row, name in (*ROWS, SHIPPED):
            if row not in r["summary"]:
                continue
            s = r["summary"][row]
            seeds = ", ".join(str(x["seed"]) for x in r["runs"][row])
            cells = [cell(s[ref][e]) for ref in ("target", "mnist") for e in EXTRACTORS]
            lines.append(f"| {name} | {seeds} | " + " | ".join([*cells, cell(s["ink_gap_closed_pct"])]) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--samples", type=int, default=None, help="samples per run (default: one per held-out image)")
    p.add_argument("--sample-steps", type=int, default=EVAL_SAMPLING["steps"], help="DDIM steps per sample")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    mnist = Quality(heldout_split(BASE, load_base(BASE), "mnist").x, names=EXTRACTORS)
    results = {style: score_style(args.out, style, mnist, args.out / "samples", args.samples, args.sample_steps)
               for style in STYLES}
    meta = {"base": BASE, "sampling": dict(EVAL_SAMPLING) | {"steps": args.sample_steps},
            "sampling_seed": "= the training seed (base: each seed)",
            "extractors": {e: DESCRIPTIONS[e][0] for e in EXTRACTORS},
            "d_fd_pct": "100 * (FD of the run's samples - FD of the base's at the same seed) / the base's"}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = markdown(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
