"""Evaluation metrics (FD, KID, precision/recall, paired bootstrap), the extractors, and the study's bookkeeping."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from app.trainer.extractors import ImageNetMobileNet, PixelPCA, RandomCNN, features
from app.trainer.quality import FrechetToReal, Quality, frechet, kid, paired_interval, precision_recall
from app.trainer.study import holm


def blobs(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=torch.float64) + shift


def test_fd_and_kid_of_a_set_with_itself_are_zero_and_grow_with_a_shift():
    a = blobs(400, 0)
    assert frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    assert abs(kid(a, a, subsets=10, subset_size=100)) < 0.05
    assert frechet(a, blobs(400, 1, shift=1.0)) == pytest.approx(8.0, rel=0.15)  # ||mu||^2 = 8, same covariance
    assert kid(a, blobs(400, 1, shift=1.0), subsets=10, subset_size=100) > 10 * abs(kid(a, a, 10, 100))


def test_precision_recall_identical_is_one_disjoint_is_zero_and_collapse_keeps_precision():
    a = blobs(300, 0)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, blobs(300, 1, shift=100.0)) == (0.0, 0.0)
    mode = blobs(300, 2) * 0.05  # all fakes near the real mean: inside the real manifold, covering little of it
    p, r = precision_recall(a, mode)
    assert p > 0.9 and r < 0.2


def test_paired_bootstrap_interval_covers_a_known_mean_and_is_paired():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, 500)
    ci = paired_interval(lambda i: float(x[i].mean()), len(x), resamples=300)
    assert ci["low"] < 2.0 < ci["high"] and ci["se"] == pytest.approx(1 / np.sqrt(500), rel=0.3)
    base = torch.rand(200, 1, 8, 8) * 2 - 1
    q = Quality(torch.rand(150, 1, 8, 8) * 2 - 1)
    same = q.paired(base, base.clone(), resamples=20)["delta"]
    assert all(d["d_fd"] == 0 and d["ci95_pct"] == [0.0, 0.0] for d in same.values())  # paired: exactly zero


def test_extractors_are_fixed_and_pca_fits_its_set():
    x = torch.rand(64, 3, 8, 8)
    assert torch.equal(features(RandomCNN(3), x), features(RandomCNN(3), x))  # the seed alone makes the network
    assert features(RandomCNN(3), x).shape == (64, 384) and features(RandomCNN(1), x[:, :1]).shape == (64, 384)
    pca = PixelPCA(x)
    f = features(pca, x)
    assert f.shape == (64, 32) and f.mean(0).abs().max() < 1e-4  # centred on its fit set
    assert f.var(0)[0] >= f.var(0)[-1]


def test_mobilenet_features_are_fixed_and_grey_is_its_rgb_repeat():
    net = ImageNetMobileNet()
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    f = features(net, x)
    assert f.shape == (6, 1280) and torch.equal(f, features(ImageNetMobileNet(), x))
    assert torch.allclose(features(net, x.expand(-1, 3, -1, -1)), f)
    assert not torch.allclose(f[0], f[1])


@pytest.mark.parametrize("n,dim", [(300, 1280), (400, 32)])
def test_fd_to_a_fixed_real_set_equals_torchmetrics(n, dim):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, dim, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, dim, dtype=torch.float64)
    fake = torch.randn(n, dim, generator=g, dtype=torch.float64) * 1.2 + 0.1  # n < dim: a rank-deficient covariance
    assert FrechetToReal(real)(fake) == pytest.approx(frechet(real, fake), rel=1e-6)


def test_holm_adjusts_in_order():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})


def test_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    """A miniature of the pre-registered study: lr picked on held-out loss, one result file per run, a rerun
    trains and samples nothing, and the report has the primary test once two seeds are paired."""
    import app.trainer.study as study
    from app.trainer.train import TrainConfig, Trainer

    base = tmp_path / "digits.safetensors"
    Trainer(TrainConfig(method="pretrain", dataset="digits", out=str(base), steps=5, image_size=8, hidden_size=32,
                        depth=2, num_heads=2, patch_size=2, batch_size=16, device="cpu"), progress=False).run()
    monkeypatch.setattr(study, "STEPS", 2)
    monkeypatch.setattr(study, "BATCH", 8)
    monkeypatch.setattr(study, "N_PRIMARY", 20)
    monkeypatch.setattr(study, "N_FRONTIER", 10)
    monkeypatch.setattr(study, "FRONTIER", (2.0,))
    monkeypatch.setattr(study, "LR_GRID", (1e-3, 1e-2))
    runs = tmp_path / "study"
    s = study.Study(str(base), str(runs), "digits", progress=False, classifier_dir=str(tmp_path / "clf"),
                    classifier_steps=20, extractors=study.PREREGISTERED)  # as the study ran; mobilenet came later
    arms = ["PT", "DMP (official: gate x1)", "control: gate sees a shuffled timestep"]
    s.run([0, 1], arms)
    pick = json.loads((runs / "pt" / "lr_pick.json").read_text())
    assert pick["lr"] == min((float(k) for k in pick["heldout_loss"]), key=lambda k: pick["heldout_loss"][f"{k:g}"])
    files = sorted((runs / "results").glob("*.json"))
    assert len(files) == 2 * 4  # the base and 3 arms at 2 seeds
    stamps = [f.stat().st_mtime_ns for f in files]
    s.run([0, 1], arms)  # resumed: everything is there
    assert [f.stat().st_mtime_ns for f in sorted((runs / "results").glob("*.json"))] == stamps
    text = study.report(runs)
    assert "| PT | 2 |" in text and "DMP (official: gate x1) − PT, pca:" in text and "Holm p" in text
    assert "| DMP (official: gate x1) − control: gate sees a shuffled timestep | 2 |" in text  # the gate's share
    png = study.save_frontier(runs, tmp_path / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # three panels drawn, not an empty canvas
    with pytest.raises(ValueError, match="no seed finished by the base"):
        study.save_frontier(tmp_path / "empty", tmp_path / "none.png")
    assert "matched class accuracy" not in text  # no base sweep yet
    monkeypatch.setattr(study, "BASE_SWEEP", (1.75,))
    s.run_base_sweep([0, 1])
    assert sorted(f.name for f in (runs / "base_sweep").glob("*.json")) == ["base-g1.75-s0.json", "base-g1.75-s1.json"]
    text = study.report(runs)
    assert "| g 1.75 |" in text and "matched class accuracy" in text and "| PT | " in text.split("matched class")[1]

    # post hoc: a new extractor scores every run from the cached samples; a run whose samples are gone is sampled
    # again, and its re-made samples' pre-registered FDs are recorded beside the originals
    from app.trainer.samples import file_key

    before = {f.name: json.loads(f.read_text()) for f in (runs / "results").glob("*.json")}
    pt1 = before["pt-s1.json"]
    gone = runs / "images" / f"{file_key(pt1['file'])}-{file_key(base)}-learned-ddim50-g1.5-n20-s1.npz"
    gone.unlink()
    s.add_extractor("mobilenet", [0, 1], arms)
    after = {f.name: json.loads(f.read_text()) for f in (runs / "results").glob("*.json")}
    assert after.keys() == before.keys()
    for name, r in after.items():
        for g, sc in r["scores"].items():
            assert sc["extractors"]["mobilenet"]["post_hoc"] is True
            assert {e: sc["extractors"][e] for e in ("pca", "randcnn", "classifier")} == \
                   {e: before[name]["scores"][g]["extractors"][e] for e in ("pca", "randcnn", "classifier")}
            assert ("remade" in sc) == (name == "pt-s1.json" and g == "1.5")
    remade = after["pt-s1.json"]["scores"]["1.5"]["remade"]["mobilenet"]
    for e in ("pca", "randcnn"):  # sampled again on the same machine: the same samples
        assert remade["fd"][e] == pytest.approx(before["pt-s1.json"]["scores"]["1.5"]["extractors"][e]["fd"], rel=1e-6)
    assert all("mobilenet" in json.loads(f.read_text())["scores"]["extractors"] for f in (runs / "base_sweep").iterdir()
               if f.suffix == ".json")
    stamps = {f: f.stat().st_mtime_ns for f in (runs / "results").glob("*.json")}
    s.add_extractor("mobilenet", [0, 1], arms)  # resumed: nothing left to add
    assert {f: f.stat().st_mtime_ns for f in (runs / "results").glob("*.json")} == stamps
    text = study.report(runs)
    assert "Δ FD mobilenet (%)" in text and "mobilenet: " in text and "(post hoc: its own family)" in text
    assert "Samples made again for a post-hoc extractor: 1 (run, guidance) sets" in text
    with pytest.raises(ValueError, match="pre-registered"):
        s.add_extractor("pca", [0], arms)


def test_a_claim_is_owned_once_and_taken_over_from_a_dead_owner(tmp_path):
    import subprocess
    import sys

    from app.trainer.study import claim

    f = tmp_path / "work"
    assert claim(f) and claim(f)  # this process owns it, and still does
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    f.write_text(dead.stdout.strip())  # an owner that has exited
    assert claim(f) and f.read_text() == str(os.getpid())
    f.write_text("1")  # a live owner (init)
    assert not claim(f)


def test_matched_fd_interpolates_the_base_at_the_arms_class_accuracy():
    from app.trainer.study import matched_fd

    def scores(acc, fd):
        return {"class_acc": acc, "extractors": {"pca": {"fd": fd}}}

    curve = {1.5: scores(0.80, 2.0), 1.6: scores(0.90, 3.0)}
    delta, g = matched_fd(scores(0.85, 2.25), curve, "pca")  # the base reads 2.5 at 0.85, at guidance 1.55
    assert delta == pytest.approx(-10.0) and g == pytest.approx(1.55)
    assert matched_fd(scores(0.95, 1.0), curve, "pca") is None  # more accurate than every base point
    assert matched_fd(scores(0.70, 1.0), curve, "pca") is None
    curve = {1.5: scores(0.8, 0.64), 1.6: scores(0.9, 0.81), 1.7: scores(1.0, 1.0)}  # FD = acc ** 2: convex
    delta, _ = matched_fd(scores(0.85, 0.7225 * 0.9), curve, "pca")  # the parabola's 0.7225, not the chord's 0.725
    assert delta == pytest.approx(-10.0)


def test_control_arms_frozen_gate_stays_uniform_and_shuffled_gate_trains(tmp_path):
    from app.model import load_base, load_patch
    from app.trainer.train import TrainConfig, Trainer

    tiny = dict(dataset="digits", image_size=8, batch_size=8, device="cpu", eval_every=2, checkpoint_every=2)
    base = tmp_path / "b.safetensors"
    Trainer(TrainConfig(method="pretrain", out=str(base), steps=2, hidden_size=32, depth=2, num_heads=2, patch_size=2,
                        **tiny), progress=False).run()
    frozen = Trainer(TrainConfig(method="dmp", out=str(tmp_path / "f.safetensors"), base=str(base), steps=3, lr=1e-2,
                                 freeze_gate=True, noisy_gating=False, w_importance=0.0, w_load=0.0, **tiny),
                     progress=False)
    patch = load_patch(frozen.run(), base=load_base(base))
    assert patch.gate.weight.abs().sum() == 0 and patch.gate.bias.abs().sum() == 0  # uniform 1/N throughout
    assert patch.prompts.abs().sum() > 0
    shuffled = Trainer(TrainConfig(method="dmp", out=str(tmp_path / "s.safetensors"), base=str(base), steps=3,
                                   lr=1e-2, shuffle_gate_t=True, **tiny), progress=False)
    perm = shuffled.draw()["gate_t_perm"]
    assert sorted(perm.tolist()) == list(range(8))  # a permutation of the batch's rows
    assert shuffled.local_perm(perm, slice(0, 4)).sort().values.tolist() == [0, 1, 2, 3]
    assert load_patch(shuffled.run(), base=load_base(base)).gate.weight.abs().sum() > 0
