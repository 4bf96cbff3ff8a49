"""The pre-registered study of docs/results.md: FT / PT / DMP arms and controls on one base, 5 training seeds,
each run scored against held-out real images by every extractor at the serving guidance and on a guidance sweep.
Resumable: every run (and every lr pick) writes its own JSON; a rerun skips what exists and trains the rest."""
from __future__ import annotations

import fcntl
import json
import math
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

SEEDS = (0, 1, 2, 3, 4)
STEPS, BATCH = 1000, 64
N_PRIMARY, GUIDANCE = 2000, 1.5  # the serving default; the primary endpoint
FRONTIER, N_FRONTIER = (1.0, 2.0, 2.5), 500
# Post hoc (2026-12-06, after the primary result; not pre-registered): the base between its 1.5 and 2.0 points at
# N_PRIMARY samples each, so an arm at 1.5 can be set against raising guidance alone at the same class accuracy.
BASE_SWEEP = (1.6, 1.7, 1.8)
LR_GRID = (3e-4, 1e-3, 3e-3)  # prompt arms: lr picked at seed 0 by final held-out loss, never by FD
# the official code's run: gate x1, importance weight 1, no EMA
DMP: dict[str, Any] = {"gate_lr_mult": 1.0, "w_importance": 1.0}
# label -> (method, TrainConfig overrides, fixed lr or None = pick from LR_GRID); the run order is this order
ARMS: dict[str, tuple[str, dict[str, Any], float | None]] = {
    "PT": ("pt", {}, None),
    "DMP (official: gate x1)": ("dmp", DMP, None),
    "DMP gate x64": ("dmp", DMP | {"gate_scale": 64.0}, None),
    "FT lr 1e-4": ("ft", {}, 1e-4),
    "FT lr 3e-5": ("ft", {}, 3e-5),
    "DMP hard top-k 75 %": ("dmp", DMP | {"top_k": 0.75, "selection": "hard"}, None),
    "DMP hard top-k 25 %": ("dmp", DMP | {"top_k": 0.25, "selection": "hard"}, None),
    "control: frozen uniform gate": ("dmp", DMP | {"freeze_gate": True, "noisy_gating": False, "w_importance": 0.0,
                                                   "w_load": 0.0}, None),
    "control: gate sees a shuffled timestep": ("dmp", DMP | {"shuffle_gate_t": True}, None),
}
PRIMARY = ("DMP (official: gate x1)", ("PT", "FT"))  # DMP - PT and DMP - FT (the FT lr with the lower held-out loss)
PREREGISTERED = ("pca", "randcnn")  # the primary family's extractors; any other independent one was added post hoc


def slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-").replace("--", "-")


class Study:
    """One study directory: lr picks, trained files, per-run result JSONs, the cached samples."""

    def __init__(self, base: str, runs: str, dataset: str = "mnist", device: str = "cpu", progress: bool = True,
                 classifier_dir: str = "runs/classifiers", classifier_steps: int = 1500, extractors=None):
        from app.model import load_base
        from app.trainer.extractors import INDEPENDENT

        self.base, self.runs, self.dataset, self.device, self.progress = base, Path(runs), dataset, device, progress
        self.extractors = tuple(extractors or INDEPENDENT)
        self.classifier_dir, self.classifier_steps = classifier_dir, classifier_steps
        self.size = load_base(base).config.input_size
        self._quality = None

    @property
    def quality(self):
        """The scorer, built on first use: held-out split, independent extractors, the project's classifier."""
        if self._quality is None:
            from app.trainer.evaluate import Evaluator
            from app.trainer.quality import Quality

            ev = Evaluator(self.dataset, self.size, device=self.device, progress=self.progress,
                           classifier_dir=self.classifier_dir, classifier_steps=self.classifier_steps)
            self._quality = Quality(ev.test.x, ev.clf, names=self.extractors)
        return self._quality

    @staticmethod
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # one line per stage, even when quiet

    def train(self, label: str, lr: float, seed: int) -> tuple[Path, dict]:
        """Train one run (resuming its checkpoint); returns its file and the trainer's metrics."""
        out = self.runs / slug(label) / f"lr{lr:g}-s{seed}.safetensors"
        info = out.with_suffix(".train.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        with lock_file(out.with_suffix(".lock")):  # a second process waits, then reads the first one's file
            if info.exists():
                return out, json.loads(info.read_text())
            return out, self._train(label, lr, seed, out, info)

    def _train(self, label: str, lr: float, seed: int, out: Path, info: Path) -> dict:
        from app.trainer.train import TrainConfig, Trainer

        method, overrides, _ = ARMS[label]
        cfg = TrainConfig(method=method, dataset=self.dataset, out=str(out), base=self.base, domain=self.dataset,
                          image_size=self.size, steps=STEPS, batch_size=BATCH, lr=lr, seed=seed, device=self.device,
                          eval_every=250, checkpoint_every=250, **overrides)
        self.log(f"train {label} lr {lr:g} seed {seed}")
        trainer = Trainer(cfg, progress=self.progress)
        trainer.run()
        metrics = trainer.metrics()
        info.write_text(json.dumps(metrics))
        return metrics

    def pick_lr(self, label: str) -> float:
        """The arm's lr: fixed, or the one of LR_GRID with the lowest final held-out loss at seed 0."""
        fixed = ARMS[label][2]
        if fixed is not None:
            return fixed
        f = self.runs / slug(label) / "lr_pick.json"
        if f.exists():
            return json.loads(f.read_text())["lr"]
        losses = {lr: self.train(label, lr, 0)[1]["heldout_loss"] for lr in LR_GRID}
        lr = min(losses, key=losses.__getitem__)
        f.write_text(json.dumps({"lr": lr, "heldout_loss": {f"{k:g}": v for k, v in losses.items()}}))
        return lr

    def score(self, path, seed: int) -> dict:
        """Every extractor at the primary guidance (N_PRIMARY samples) and at each FRONTIER guidance."""
        from app.trainer.samples import arm_images

        out = {}
        for g, n in ((GUIDANCE, N_PRIMARY), *((g, N_FRONTIER) for g in FRONTIER)):
            images, labels = arm_images(self.base, path, n=n, seed=seed, guidance=g, cache=self.runs / "images",
                                        progress=self.progress)
            out[f"{g:g}"] = self.quality.score(images, labels)
        return out

    def run_one(self, label: str | None, seed: int) -> dict:
        """One result file: the base (label None) or one arm's run at this seed, trained if needed and scored."""
        f = self.runs / "results" / f"{slug(label or 'base')}-s{seed}.json"
        if f.exists():
            return json.loads(f.read_text())
        result = {"arm": label or "base", "seed": seed, "base": self.base}
        path = None
        if label is not None:
            lr = self.pick_lr(label)
            path, metrics = self.train(label, lr, seed)
            result |= {"lr": lr, "train": metrics, "file": str(path)}
        self.log(f"score {label or 'base'} seed {seed}")
        result["scores"] = self.score(path, seed)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(result, indent=1))
        return result

    def run_base_sweep(self, seeds=SEEDS) -> None:
        """The base at each BASE_SWEEP guidance, guidance-major (a cut-short sweep has its lowest points first)."""
        from app.trainer.samples import arm_images

        for g in BASE_SWEEP:
            for seed in seeds:
                f = self.runs / "base_sweep" / f"base-g{g:g}-s{seed}.json"
                if f.exists():
                    continue
                self.log(f"score base at guidance {g:g} seed {seed}")
                images, labels = arm_images(self.base, None, n=N_PRIMARY, seed=seed, guidance=g,
                                            cache=self.runs / "images", progress=self.progress)
                result = {"arm": "base", "seed": seed, "guidance": g, "n": N_PRIMARY, "base": self.base,
                          "scores": self.quality.score(images, labels)}
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(json.dumps(result, indent=1))

    def run(self, seeds=SEEDS, arms=None) -> None:
        """Seed-major, so a cut-short study has every arm at its first seeds."""
        for seed in seeds:
            for label in [None, *(arms or ARMS)]:
                self.run_one(label, seed)

    def add_extractor(self, name: str, seeds=SEEDS, arms=None) -> None:
        """Post hoc: score every finished run, and the base sweep, with an independent extractor their result files
        lack: the primary endpoint first, then the base sweep, then the frontier's guidances, seed-major in each.
        Cached samples are reused; a run whose samples are gone is sampled again (trained again if its file is gone
        too), and then the pre-registered extractors' FDs and the class accuracy of the re-made samples are stored
        beside the originals ("remade"), so the file shows whether they are the same samples. Several processes may
        share the work: each (run, guidance) is claimed by the first one to reach it."""
        from app.trainer.extractors import INDEPENDENT
        from app.trainer.quality import Quality
        from app.trainer.samples import arm_images

        if name not in INDEPENDENT or name in PREREGISTERED:
            raise ValueError(f"{name!r}: not an independent extractor outside the pre-registered {PREREGISTERED}")
        quality = self.quality  # one scorer: the added extractor, and the pre-registered ones for re-made samples
        if name not in quality.extractors:
            quality = Quality(quality.heldout, quality.classifier, names=(*PREREGISTERED, name))
        claims = self.runs / "claims"
        claims.mkdir(parents=True, exist_ok=True)
        def runs_at(g, n):
            return [(g, n, seed, label) for seed in seeds for label in [None, *(arms or ARMS)]]
        work = [*runs_at(GUIDANCE, N_PRIMARY), *((g, N_PRIMARY, seed, "sweep") for g in BASE_SWEEP for seed in seeds),
                *(item for g in FRONTIER for item in runs_at(g, N_FRONTIER))]  # the sweep's samples are all cached
        for g, n, seed, label in work:
            if label == "sweep":
                f, key = self.runs / "base_sweep" / f"base-g{g:g}-s{seed}.json", None
            else:
                f, key = self.runs / "results" / f"{slug(label or 'base')}-s{seed}.json", f"{g:g}"
            lock = claims / f"{f.parent.name}-{f.stem}.lock"
            if not f.exists() or not claim(claims / f"{f.parent.name}-{f.stem}-g{g:g}.{name}"):
                continue
            with lock_file(lock):
                r = json.loads(f.read_text())
            scores = r["scores"] if key is None else r["scores"][key]
            if name in scores["extractors"]:
                continue
            path = None if label in (None, "sweep") else self.train(label, r["lr"], seed)[0]
            cache = dict(n=n, seed=seed, guidance=g, cache=self.runs / "images", progress=self.progress)
            try:
                images, labels = arm_images(self.base, path, cached_only=True, **cache)
                remade = False
            except FileNotFoundError:
                self.log(f"sample again: {label or 'base'} seed {seed} guidance {g:g}")
                images, labels = arm_images(self.base, path, **cache)
                remade = True
            self.log(f"score {label or 'base'} seed {seed} guidance {g:g} with {name}")
            scored = quality.score(images, labels)
            added = scored["extractors"][name]
            with lock_file(lock):  # another process may have added another guidance meanwhile
                r = json.loads(f.read_text())
                scores = r["scores"] if key is None else r["scores"][key]
                scores["extractors"][name] = added | {"post_hoc": True}
                if remade:
                    scores.setdefault("remade", {})[name] = {
                        "class_acc": scored.get("class_acc"),
                        "fd": {e: scored["extractors"][e]["fd"] for e in PREREGISTERED}}
                tmp = f.with_suffix(".tmp")
                tmp.write_text(json.dumps(r, indent=1))
                tmp.replace(f)


@contextmanager
def lock_file(path: Path):
    """An exclusive flock on `path` (created) for the block."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def claim(path: Path) -> bool:
    """True if this process now owns `path`'s work: the claim file is new, or its owner is no longer running."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = int(path.read_text() or 0)
            os.kill(owner, 0)
            return owner == os.getpid()
        except PermissionError:  # alive, another user's
            return False
        except (ValueError, ProcessLookupError):
            path.unlink(missing_ok=True)  # its owner died: take it over
            return claim(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True


#################################################################################
#                                    Report                                     #
#################################################################################

def holm(pvalues: dict) -> dict:
    """Holm-adjusted p-values of a family {name: p}."""
    order = sorted(pvalues, key=pvalues.__getitem__)
    out, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[name]))
        out[name] = running
    return out


def load_results(runs) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for f in sorted((Path(runs) / "results").glob("*.json")):
        r = json.loads(f.read_text())
        out.setdefault(r["arm"], {})[r["seed"]] = r
    return out


def load_base_sweep(runs) -> dict[int, dict[float, dict]]:
    """{seed: {guidance: scores}} of the post-hoc base points."""
    out: dict[int, dict[float, dict]] = {}
    for f in sorted((Path(runs) / "base_sweep").glob("*.json")):
        r = json.loads(f.read_text())
        out.setdefault(r["seed"], {})[r["guidance"]] = r["scores"]
    return out


def base_curve(base_run: dict, sweep: dict[float, dict]) -> dict[float, dict]:
    """{guidance: scores} of one base seed at every N_PRIMARY-sample point: the primary guidance and the sweep."""
    return {GUIDANCE: base_run["scores"][f"{GUIDANCE:g}"], **sweep}


def matched_fd(arm_scores: dict, curve: dict[float, dict], extractor: str) -> tuple[float, float] | None:
    """(Δ FD in % of the base at the arm's class accuracy, the guidance that reaches it); None when the arm is more
    (or less) accurate than every base point. The base's FD there: the parabola through the three base points
    nearest that accuracy (FD rises convexly with guidance, so a straight chord would overstate it), or the chord
    when the base has only two."""
    points = sorted((sc["class_acc"], g, sc["extractors"][extractor]["fd"]) for g, sc in curve.items())
    acc = arm_scores["class_acc"]
    for i, ((a0, g0, f0), (a1, g1, f1)) in enumerate(zip(points, points[1:], strict=False)):
        if a0 <= acc <= a1:
            w = (acc - a0) / (a1 - a0) if a1 > a0 else 0.0
            fd = f0 + w * (f1 - f0)
            windows = [points[j:j + 3] for j in (i - 1, i) if 0 <= j and j + 3 <= len(points)]
            if windows:  # the third point nearest in accuracy
                near = min(windows, key=lambda pts: max(abs(p[0] - acc) for p in pts))
                accs = [p[0] for p in near]
                if len(set(accs)) == 3:
                    fd = float(np.polyval(np.polyfit(accs, [p[2] for p in near], 2), acc))
            return 100 * (arm_scores["extractors"][extractor]["fd"] - fd) / fd, g0 + w * (g1 - g0)
    return None


def has(extractor: str, *runs: dict, g: str = f"{GUIDANCE:g}") -> bool:
    """Whether every run was scored by this extractor at guidance g (a post-hoc one may be partway)."""
    return all(extractor in r["scores"][g]["extractors"] for r in runs)


def ordered_extractors(res: dict[str, dict[int, dict]]) -> list[str]:
    """Every extractor some run was scored by: the pre-registered ones, those added post hoc, then ours."""
    found = {e for by_seed in res.values() for r in by_seed.values()
             for e in r["scores"][f"{GUIDANCE:g}"]["extractors"]}
    later = sorted(found - {*PREREGISTERED, "classifier"})
    return [e for e in (*PREREGISTERED, *later, "classifier") if e in found]


def d_pct(arm: dict, base: dict, extractor: str, g: str = f"{GUIDANCE:g}") -> float:
    b = base["scores"][g]["extractors"][extractor]["fd"]
    return 100 * (arm["scores"][g]["extractors"][extractor]["fd"] - b) / b


def mean_ci(values: list[float]) -> str:
    """mean [95 % t interval over training seeds]; the mean alone with one seed."""
    from scipy import stats

    if len(values) < 2:
        return f"{values[0]:+.2f}" if values else "—"
    m, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    h = stats.t.ppf(0.975, len(values) - 1) * se
    return f"{m:+.2f} [{m - h:+.2f}, {m + h:+.2f}]"


Points = dict[str, dict[float, tuple[float, dict]]]  # {arm: {guidance: (class accuracy, {extractor: FD})}}


def frontier(res: dict[str, dict[int, dict]], runs=None) -> tuple[list[int], Points]:
    """(the seeds every arm has finished, {arm: {guidance: (class accuracy, {extractor: FD})}} as means over them),
    so every arm's curve averages the same sampling seeds; the base also at the post-hoc sweep's guidances."""
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in res.values()))) if res else []
    sweep = load_base_sweep(runs) if runs is not None else {}
    swept = [g for g in BASE_SWEEP if all(g in sweep.get(i, {}) for i in seeds)] if seeds else []
    points: Points = {}
    for arm, by_seed in res.items() if seeds else ():
        points[arm] = {}
        for g in sorted((*FRONTIER, GUIDANCE, *(swept if arm == "base" else ()))):
            sc = [sweep[i][g] if g in swept else by_seed[i]["scores"][f"{g:g}"] for i in seeds]
            points[arm][g] = (statistics.fmean(x["class_acc"] for x in sc),
                              {e: statistics.fmean(x["extractors"][e]["fd"] for x in sc)
                               for e in set.intersection(*(set(x["extractors"]) for x in sc))})
    return seeds, points


def matched_section(res: dict[str, dict[int, dict]], sweep: dict[int, dict[float, dict]], extractors) -> list[str]:
    """Each arm at the primary guidance vs the base at the same class accuracy, per training seed (post hoc)."""
    base, g0 = res.get("base", {}), f"{GUIDANCE:g}"
    seeds = [s for s in base if s in sweep]
    if not seeds:
        return []
    top = ", ".join(f"{g:g}" for g in sorted({GUIDANCE, *(g for s in seeds for g in sweep[s])}))
    lines = ["", f"Against guidance alone at matched class accuracy (post hoc, not pre-registered): per training seed, "
             f"the base's FD at the arm's class accuracy, on the parabola through the 3 nearest of the base's "
             f"{N_PRIMARY}-sample points at guidance {top} (same sampling seed; a chord where only 2); Δ FD in % of "
             "it, mean [95 % t interval]; 'outside' counts seeds whose arm's class accuracy lies outside the base's "
             "points (no extrapolation).", "",
             "| arm | seeds matched | outside | " + " | ".join(f"Δ FD {e} (%)" for e in extractors)
             + " | base guidance matched |", "|---|---|---|" + "---|" * (len(extractors) + 1)]
    for arm, by_seed in res.items():
        if arm == "base":
            continue
        def matched(e: str, by_seed: dict[int, dict] = by_seed) -> tuple[list[tuple[float, float]], int]:
            """(the seeds' (Δ FD %, guidance) where the base's points reach the arm's accuracy, how many do not)."""
            found = [matched_fd(by_seed[s]["scores"][g0], curve, e) for s in seeds if s in by_seed
                     for curve in [base_curve(base[s], sweep[s])]
                     if has(e, by_seed[s]) and all(e in c["extractors"] for c in curve.values())]
            return [m for m in found if m is not None], sum(m is None for m in found)

        ref, outside = matched(PREREGISTERED[0])  # the counts: every run has the pre-registered extractors
        gs, cells = [m[1] for m in ref], []
        for e in extractors:
            got = matched(e)[0]
            some = "" if len(got) == len(ref) else f" ({len(got)} seeds)"
            cells.append(mean_ci([m[0] for m in got]) + some if got else "—")
        matched_g = f"{statistics.fmean(gs):.2f}" if gs else "—"
        lines.append(f"| {arm} | {len(gs)} | {outside} | " + " | ".join(cells) + f" | {matched_g} |")
    return lines


def gate_section(res: dict[str, dict[int, dict]], extractors) -> list[str]:
    """DMP (official) minus each other DMP arm, paired per training seed: what the gate and its settings add."""
    dmp, base = PRIMARY[0], res.get("base", {})
    others = [a for a, (method, _, _) in ARMS.items() if method == "dmp" and a != dmp and a in res]
    if dmp not in res or not others:
        return []
    lines = ["", f"The gate's contribution (secondary, no multiplicity correction): {dmp} minus each other DMP arm, "
             "paired per training seed, points of Δ FD %, mean [95 % t interval].", "",
             "| comparison | seeds | " + " | ".join(extractors) + " |", "|---|---|" + "---|" * len(extractors)]
    for other in others:
        seeds = sorted(set(res[dmp]) & set(res[other]) & set(base))
        cells = []
        for e in extractors:
            done = [s for s in seeds if has(e, res[dmp][s], res[other][s], base[s])]
            cells.append(mean_ci([d_pct(res[dmp][s], base[s], e) - d_pct(res[other][s], base[s], e) for s in done])
                         + ("" if len(done) == len(seeds) else f" ({len(done)} seeds)"))
        lines.append(f"| {dmp} − {other} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def remade_section(res: dict[str, dict[int, dict]]) -> list[str]:
    """How closely samples made again for a post-hoc extractor reproduce the stored runs' pre-registered FDs."""
    found = [(r["arm"], r["seed"], g, added, e, m["fd"][e], sc["extractors"][e]["fd"])
             for by_seed in res.values() for r in by_seed.values() for g, sc in r["scores"].items()
             for added, m in sc.get("remade", {}).items() for e in m["fd"]]
    if not found:
        return []
    worst = max(found, key=lambda f: abs(f[5] - f[6]) / f[6])
    runs_ = {(arm, seed, g) for arm, seed, g, *_ in found}
    return ["", f"Samples made again for a post-hoc extractor: {len(runs_)} (run, guidance) sets; their "
            f"{', '.join(PREREGISTERED)} FDs against the stored ones: largest relative difference "
            f"{abs(worst[5] - worst[6]) / worst[6]:.1e} ({worst[0]} seed {worst[1]}, guidance {worst[2]}, {worst[4]})."]


def report(runs) -> str:
    """The study's tables from whatever result files exist: Δ FD per extractor with t intervals over training
    seeds, precision/recall and class accuracy, the guidance frontier, the primary paired t-tests with Holm."""
    from scipy import stats

    res = load_results(runs)
    base = res.get("base", {})
    if not base:
        return "No result files yet: nothing has finished.\n"
    extractors = ordered_extractors(res)
    g0 = f"{GUIDANCE:g}"
    lines = [f"Finished runs: {', '.join(f'{a} ({len(s)})' for a, s in res.items())}.", "",
             f"Δ FD vs the base at the same sampling seed, in % of the base (negative = closer to held-out real "
             f"images), guidance {GUIDANCE}, {N_PRIMARY} samples per run; mean [95 % t interval over training "
             "seeds]. P / R: precision / recall (k = 3), mean over seeds.", "",
             "| arm | seeds | lr | " + " | ".join(f"Δ FD {e} (%)" for e in extractors)
             + " | " + " | ".join(f"P / R {e}" for e in extractors if e != "classifier") + " | class acc |",
             "|---|---|---|" + "---|" * (2 * len(extractors) - ("classifier" in extractors)) + "---|"]
    for arm, by_seed in res.items():
        seeds = [s for s in by_seed if s in base]
        runs_ = [by_seed[s] for s in seeds]
        sc = [r["scores"][g0] for r in runs_]
        cells, pr = [], []
        for e in extractors:  # a post-hoc extractor may have scored fewer seeds so far: then their count is given
            done = [s for s in seeds if has(e, by_seed[s], base[s])]
            some = "" if len(done) == len(seeds) else f" ({len(done)} seeds)"
            sc_e = [by_seed[s]["scores"][g0]["extractors"][e] for s in done]
            if not done:
                cells.append("—")
            elif arm == "base":
                cells.append(f"FD {statistics.fmean(x['fd'] for x in sc_e):.3g}{some}")
            else:
                cells.append(mean_ci([d_pct(by_seed[s], base[s], e) for s in done]) + some)
            if e != "classifier":
                pr.append(f"{statistics.fmean(x['precision'] for x in sc_e):.3f} / "
                          f"{statistics.fmean(x['recall'] for x in sc_e):.3f}" if done else "—")
        acc = f"{statistics.fmean(x['class_acc'] for x in sc):.3f}" if sc and "class_acc" in sc[0] else "—"
        lr = f"{runs_[0]['lr']:g}" if runs_ and "lr" in runs_[0] else "—"
        lines.append(f"| {arm} | {len(seeds)} | {lr} | " + " | ".join(cells) + " | " + " | ".join(pr)
                     + f" | {acc} |")
    common, points = frontier(res, runs)
    columns = sorted({g for by_g in points.values() for g in by_g})
    swept = [g for g in columns if g in BASE_SWEEP]
    lines += ["", "Guidance frontier (mean over the seeds every arm has finished: "
              f"{', '.join(map(str, common)) or 'none'}; class accuracy / FD per extractor; {N_FRONTIER} samples "
              f"at {', '.join(map(str, FRONTIER))}, {N_PRIMARY} at {GUIDANCE}"
              + (f" and at the base's post-hoc {', '.join(map(str, swept))}" if swept else "") + "):", "",
              "| arm | " + " | ".join(f"g {g:g}" for g in columns) + " |", "|---|" + "---|" * len(columns)]
    for arm, by_g in points.items():
        lines.append(f"| {arm} | " + " | ".join(
            f"{by_g[g][0]:.3f} / " + ", ".join(f"{by_g[g][1][e]:.3g}" if e in by_g[g][1] else "—" for e in extractors)
            if g in by_g else "—"
            for g in columns) + " |")
    lines += matched_section(res, load_base_sweep(runs), extractors) + gate_section(res, extractors)
    lines += remade_section(res)
    lines += ["", "Primary tests (paired t-test over training seeds on Δ FD %, Holm over comparisons x the "
              f"pre-registered extractors {', '.join(PREREGISTERED)}; an independent extractor added after the "
              "primary result is its own post-hoc family, Holm over its comparisons):", ""]
    dmp, versus = PRIMARY
    tests: dict[str, dict[str, float]] = {"primary": {}, "post hoc": {}}
    rows: list[str | tuple[str, str]] = []  # a line, or (Holm key, line) of a tested comparison
    for other in versus:
        if other == "FT":  # the FT lr with the lower mean held-out loss
            fts = {a: statistics.fmean(r["train"]["heldout_loss"] for r in res[a].values())
                   for a in res if a.startswith("FT")}
            other = min(fts, key=fts.__getitem__) if fts else "FT lr 1e-4"
        seeds = sorted(set(res.get(dmp, {})) & set(res.get(other, {})) & set(base))
        for e in extractors:
            paired = [s for s in seeds if has(e, res[dmp][s], res[other][s], base[s])]
            diffs = [d_pct(res[dmp][s], base[s], e) - d_pct(res[other][s], base[s], e) for s in paired]
            if len(diffs) < 2:
                rows.append(f"- {dmp} − {other}, {e}: {len(diffs)} paired seed(s), no test yet.")
                continue
            t = stats.ttest_rel([d_pct(res[dmp][s], base[s], e) for s in paired],
                                [d_pct(res[other][s], base[s], e) for s in paired])
            if e != "classifier":
                tests["primary" if e in PREREGISTERED else "post hoc"][f"{other}|{e}"] = float(t.pvalue)
            rows.append((f"{other}|{e}", f"- {dmp} − {other}, {e}: {mean_ci(diffs)} points of %, "
                         f"{len(paired)} seeds, t = {t.statistic:.2f}, p = {t.pvalue:.3g}"))
    adjusted = {family: holm(pvalues) for family, pvalues in tests.items()}
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        key, text = row
        if key in adjusted["primary"]:
            lines.append(f"{text}, Holm p = {adjusted['primary'][key]:.3g}")
        elif key in adjusted["post hoc"]:
            lines.append(f"{text}, Holm p = {adjusted['post hoc'][key]:.3g} (post hoc: its own family)")
        else:
            lines.append(f"{text} (not in the Holm family: trained on the generators' data)")
    return "\n".join(lines) + "\n"


def save_frontier(runs, path) -> Path:
    """Class accuracy vs FD per extractor (one panel each), every arm a line through the guidance sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    res = load_results(runs)
    seeds, points = frontier(res, runs)
    if "base" not in points:
        raise ValueError(f"{runs}: no seed finished by the base and every arm, nothing to draw")
    # a post-hoc extractor is drawn once every seed of the base has it
    extractors = [e for e in ordered_extractors(res) if e in points["base"][GUIDANCE][1]]
    served = [by_g[GUIDANCE][0] for by_g in points.values()]
    window = (min(served) - 0.01, max(served) + 0.01)  # the zoom row: class accuracies the arms serve at
    fig, axes = plt.subplots(2, len(extractors), figsize=(4.2 * len(extractors), 7.4), dpi=100, squeeze=False)
    for col, e in enumerate(extractors):
        for row, ax in enumerate(axes[:, col]):
            inside = []
            for arm, by_g in points.items():
                acc, fd = [a for a, f in by_g.values() if e in f], [f[e] for _, f in by_g.values() if e in f]
                inside += [f for a, f in zip(acc, fd, strict=True) if window[0] <= a <= window[1]]
                style = dict(color="black", linewidth=2.2) if arm == "base" else {}
                (line,) = ax.plot(acc, fd, marker="o", markersize=3, label=arm, **style)
                served_acc, served_fd = by_g[GUIDANCE]  # the serving default, ringed
                if e in served_fd:  # a post-hoc extractor may not have scored this arm yet
                    ax.plot(served_acc, served_fd[e], marker="o", markersize=8, fillstyle="none",
                            color=line.get_color())
            ax.set(xlabel="class accuracy", ylabel=f"FD ({e})",
                   title=e if row == 0 else f"{e}: zoom on guidance {GUIDANCE:g}")
            if row == 0:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
            else:
                pad = 0.1 * (max(inside) - min(inside)) or 0.05 * max(inside)
                ax.set(xlim=window, ylim=(min(inside) - pad, max(inside) + pad))
            ax.grid(alpha=0.3)
    guidances = list(points["base"])
    axes[0][0].legend(fontsize=7, title=f"guidance {guidances[0]:g} → {guidances[-1]:g}", title_fontsize=7)
    fig.suptitle("Guidance frontier: lower right is better (more accurate at the same FD); ring = guidance "
                 f"{GUIDANCE:g}; mean over training seeds {', '.join(map(str, seeds))}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def main_study(args) -> None:
    unknown = [a for a in args.arm if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}: one of {list(ARMS)}")
    if args.report_only:
        text = report(args.runs)
    else:
        study = Study(args.base, args.runs, args.dataset, args.device, progress=not args.quiet)
        if args.add_extractor:
            study.add_extractor(args.add_extractor, args.seeds, args.arm or None)
        elif args.base_sweep:
            study.run_base_sweep(args.seeds)
        else:
            study.run(args.seeds, args.arm or None)
        text = report(args.runs)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.figure:
        print(f"frontier figure: {save_frontier(args.runs, args.figure)}")
