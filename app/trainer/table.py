"""The comparison table of docs/results.md: base vs +FT vs +PT vs +DMP after the same further steps, ablations,
sample grids and gate heatmaps. Resumable: finished runs (their JSON) are skipped on a rerun."""
from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import statistics
import time
from pathlib import Path

import torch

METHOD_ROWS = (("base", "base"), ("ft", "+FT"), ("pt", "+PT"), ("dmp", "+DMP"))


def tasks_of(plan: dict) -> list[dict]:
    """Every run in the plan: (domain, method, seed, label, overrides)."""
    out = []  # first seeds first, so a run cut short still has one full row per domain
    for i in range(max(len(d["seeds"]) for d in plan["domains"])):
        for dom in plan["domains"]:
            for seed in dom["seeds"][i:i + 1]:
                for method in dom.get("methods", [m for m, _ in METHOD_ROWS]):
                    out.append({"domain": dom, "method": method, "seed": seed, "label": method, "overrides": {}})
    for dom in plan["domains"]:
        for label, overrides in (plan.get("ablations", {}) if dom.get("ablations") else {}).items():
            for seed in dom.get("ablation_seeds", dom["seeds"][:1]):
                out.append({"domain": dom, "method": "dmp", "seed": seed, "label": label, "overrides": overrides})
    return out


def size_of(plan: dict, dom: dict) -> int:
    """Image size of a domain: its own entry, else the plan's."""
    return dom.get("image_size", plan.get("image_size", 32))


def slug(label: str, seed: int) -> str:
    """File stem of a run: its label made filename-safe, plus the seed."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    return f"{safe}-s{seed}"


def grid_indices(labels: torch.Tensor | None, n: int, per_class: int = 10) -> list[int]:
    """10 samples of each class in order (or the first 100 for unconditional rows)."""
    if labels is None:
        return list(range(min(100, n)))
    idx = []
    for c in range(int(labels.max()) + 1):
        idx += (labels == c).nonzero().flatten()[:per_class].tolist()
    return idx


def run_one(task: dict, plan: dict, runs: str, device: str) -> dict:
    """Train (unless base) and evaluate one row; the JSON result is the run's 'done' marker."""
    from app.trainer.evaluate import Evaluator, eval_conditions, evaluate
    from app.trainer.figures import save_grid
    from app.trainer.train import TrainConfig, Trainer

    dom, seed, label = task["domain"], task["seed"], task["label"]
    folder = Path(runs) / dom["name"]
    stem = slug(label, seed)
    result_path = folder / f"{stem}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    train_info = {}
    base, patch = dom["base"], None
    if task["method"] != "base":
        out = folder / f"{stem}.safetensors"
        cfg = TrainConfig(method=task["method"], dataset=dom["dataset"], out=str(out), base=dom["base"],
                          domain=dom["name"], image_size=size_of(plan, dom), steps=plan["further_steps"],
                          batch_size=plan["batch_size"], seed=seed, device=device,
                          eval_every=max(1, plan["further_steps"] // 4), checkpoint_every=plan["further_steps"],
                          **task["overrides"])
        trainer = Trainer(cfg, progress=False)
        trainer.run()
        train_info = trainer.metrics()
        if task["method"] == "ft":
            base = str(out)
        else:
            patch = str(out)
    evaluator = Evaluator(dom["dataset"], size_of(plan, dom), device=device, progress=False,
                          classifier_steps=plan.get("classifier_steps", 3000))
    result, images = evaluate(base, patch, dom["dataset"], sampler=plan["sampler"], steps=plan["sample_steps"],
                              guidance_scale=plan["guidance_scale"], seed=seed, device=device,
                              evaluator=evaluator, return_images=True)
    from app.model import load_base

    _, labels = eval_conditions(load_base(base), evaluator.test)
    save_grid(images[grid_indices(labels, len(images))], folder / f"{stem}.png")
    result |= {"domain": dom["name"], "method": task["method"], "label": label, "seed": seed, "train": train_info,
               "overrides": task["overrides"],
               "further_steps": plan["further_steps"] if task["method"] != "base" else 0}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def _worker(args):
    task, plan, runs, device, threads = args
    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = run_one(task, plan, runs, device)
    print(f"[table] {task['domain']['name']:>15} {task['label']:>18} s{task['seed']}: "
          f"fid_like={result['fid_like']:.2f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return result


def prepare(plan: dict, device: str) -> None:
    """Classifiers and caption embeddings are built once here, before workers race to build them."""
    from app.trainer.evaluate import Evaluator

    for dom in plan["domains"]:
        ev = Evaluator(dom["dataset"], size_of(plan, dom), device=device,
                       classifier_steps=plan.get("classifier_steps", 3000))
        print(f"[table] {dom['name']}: classifier test accuracy {ev.classifier_acc:.4f}, "
              f"floor {ev.floor['fid_like']:.2f}, ceiling {ev.ceiling['fid_like']:.1f}", flush=True)


def heatmaps(plan: dict, runs: str, device: str, out_dir: Path) -> list[Path]:
    from app.trainer.data import load_dataset
    from app.trainer.evaluate import eval_conditions, load_model_and_patch
    from app.trainer.figures import gate_activations, save_gate_heatmap

    paths = []
    for dom in plan["domains"]:
        patch_path = Path(runs) / dom["name"] / f"dmp-s{dom['seeds'][0]}.safetensors"
        if not patch_path.exists():
            continue
        model, patch = load_model_and_patch(dom["base"], patch_path, device)
        test = load_dataset(dom["dataset"], "test", size_of(plan, dom))
        y, labels = eval_conditions(model, test)
        pick = grid_indices(labels, len(y), per_class=5) if labels is not None else [0]
        gates = gate_activations(model, patch, y[pick])
        paths.append(save_gate_heatmap(gates, out_dir / f"gates-{dom['name']}.png",
                                       title=f"{dom['name']}: mean gate weight (DMP, seed {dom['seeds'][0]})"))
    return paths


def finished(tasks: list[dict], runs: str) -> list[dict]:
    paths = [Path(runs) / t["domain"]["name"] / f"{slug(t['label'], t['seed'])}.json" for t in tasks]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def run_table(plan_path: str, runs: str, jobs: int = 1, device: str = "auto", doc: str = "docs/results.md",
              report_only: bool = False):
    from app.trainer.train import resolve_device

    plan = json.loads(Path(plan_path).read_text())
    device = str(resolve_device(device))
    tasks = tasks_of(plan)
    threads = max(1, torch.get_num_threads() // jobs)  # honours OMP_NUM_THREADS / taskset
    args = [(t, plan, runs, device, threads) for t in tasks]
    out_dir = Path(doc).parent / "results"
    if report_only:  # the finished runs, else the committed results of the last full run
        results = finished(tasks, runs) or json.loads((out_dir / "results.json").read_text())
    elif jobs > 1:
        prepare(plan, device)
        with mp.get_context("spawn").Pool(jobs) as pool:
            results = pool.map(_worker, args, chunksize=1)
    else:
        prepare(plan, device)
        results = [_worker(a) for a in args]
    copy_figures(results, runs, out_dir)
    if not report_only:
        heatmaps(plan, runs, device, out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    write_doc(plan, results, Path(doc), out_dir)


def copy_figures(results: list[dict], runs: str, out_dir: Path) -> None:
    for r in results:
        if r["seed"] != min(x["seed"] for x in results if x["domain"] == r["domain"]):
            continue
        stem = slug(r["label"], r["seed"])
        src = Path(runs) / r["domain"] / f"{stem}.png"
        if src.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, out_dir / f"{r['domain']}-{stem}.png")


def _stat(values: list[float], fmt: str = ".2f") -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def write_doc(plan: dict, results: list[dict], doc: Path, out_dir: Path) -> None:
    """Tables of measured numbers; the hand-written analysis lives in docs/results_analysis.md."""
    rel = out_dir.name
    lines = ["# Results: base vs +FT vs +PT vs +DMP at demo scale", "",
             "Generated by `python -m app.trainer table` (see `patches/recipe.sh`); every number below is measured.",
             f"Sampler: {plan['sampler']}, {plan['sample_steps']} steps, guidance {plan['guidance_scale']} "
             f"(class and text models). Further training: {plan['further_steps']} steps, batch "
             f"{plan['batch_size']}, on the same training split the base was pretrained on. FID-like = Fréchet "
             "distance on the 128-d penultimate features of our own small classifier (not FID; not comparable to "
             "published FIDs). KID (cubic-kernel MMD², unbiased, so it can dip below 0) on the same features. "
             "One sample per test item; mean ± std over seeds "
             "(seed = patch-training seed and sampling seed). Δ vs base: the paired difference of FID-like from the "
             "base's at the same seed (same sampling noise), in % of the base, mean ± standard error over seeds.", ""]
    analysis = doc.parent / "results_analysis.md"
    for dom in plan["domains"]:
        rows = [r for r in results if r["domain"] == dom["name"]]
        if not rows:
            lines += [f"## {dom['name']} ({dom['dataset']})", "", "Not run (see the notes below).", ""]
            continue
        first = rows[0]
        lines += [f"## {dom['name']} ({dom['dataset']})", "",
                  f"Classifier test accuracy {first['classifier_acc']:.4f}. Floor (train vs test real): FID-like "
                  f"{first['floor']['fid_like']:.2f}, KID {first['floor']['kid']:.3g}. Ceiling (uniform "
                  f"noise): FID-like {first['ceiling']['fid_like']:.1f}. Samples per score: {first['num_samples']}.",
                  "", HEADER.format("row"), "|---|---|---|---|---|---|---|---|---|---|"]
        base = {r["seed"]: r["fid_like"] for r in rows if r["label"] == "base"}
        for method, name in METHOD_ROWS:
            rs = [r for r in rows if r["label"] == method]
            lines.append(_row(name, rs, rel, dom, base))
        abl = [r for r in rows if r["label"] not in dict(METHOD_ROWS)]
        planned = list(plan.get("ablations", {})) if dom.get("ablations") else []
        if planned:
            lines += ["", f"Ablations ({dom['name']}, DMP, same steps):", "",
                      HEADER.format("variant"), "|---|---|---|---|---|---|---|---|---|---|"]
            for label in planned:
                lines.append(_row(label, [r for r in abl if r["label"] == label], rel, dom, base))
        heat = out_dir / f"gates-{dom['name']}.png"
        if heat.exists():
            lines += ["", f"Gate activations of the DMP patch: ![gates]({rel}/{heat.name})"]
        lines.append("")
    if analysis.exists():
        lines += [analysis.read_text()]
    doc.write_text("\n".join(lines) + "\n")


HEADER = ("| {} | seeds | FID-like | Δ vs base (paired, %) | KID | class acc | trained params | train s | sampler "
          "| grid |")


def paired_delta(rs: list[dict], base: dict[int, float]) -> str:
    """100 (row - base) / base at each seed both have: the value for one seed, else mean ± standard error."""
    d = [100 * (r["fid_like"] - base[r["seed"]]) / base[r["seed"]] for r in rs if r["seed"] in base]
    if not d or rs[0]["label"] == "base":
        return "—"
    if len(d) == 1:
        return f"{d[0]:+.2f}"
    return f"{statistics.mean(d):+.2f} ± {statistics.stdev(d) / len(d) ** 0.5:.2f}"


def _row(name: str, rs: list[dict], rel: str, dom: dict, base: dict[int, float]) -> str:
    if not rs:
        return f"| {name} | 0 | not run | — | — | — | — | — | — | — |"
    acc = [r["class_acc"] for r in rs if "class_acc" in r]
    secs = [r["train"].get("train_seconds", 0) for r in rs if r["train"]]
    stem = slug(rs[0]["label"], rs[0]["seed"])
    params = rs[0]["train"].get("trainable_params", "—") if rs[0]["train"] else 0
    return (f"| {name} | {len(rs)} | {_stat([r['fid_like'] for r in rs])} | {paired_delta(rs, base)} | "
            f"{_stat([r['kid'] for r in rs], '.3g')} | {_stat(acc, '.3f') if acc else '—'} | {params} | "
            f"{_stat(secs, '.0f') if secs else '—'} | {rs[0]['sampler']} {rs[0]['steps']}, cfg "
            f"{rs[0]['guidance_scale']} | ![]({rel}/{dom['name']}-{stem}.png) |")
