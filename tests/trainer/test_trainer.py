"""Trainer on scikit-learn digits (8x8, tiny DiT): a few steps each, CPU, seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import ndimage

from app.model import load_base, load_patch
from app.model.dmp import PatchError
from app.trainer.__main__ import main
from app.trainer.captions import caption, label_of
from app.trainer.data import load_dataset
from app.trainer.evaluate import Evaluator, evaluate
from app.trainer.train import TrainConfig, Trainer, heldout_loss

TINY = dict(image_size=8, hidden_size=32, depth=2, num_heads=2, patch_size=2, batch_size=32, eval_every=10,
            checkpoint_every=10, device="cpu")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("bases") / "digits.safetensors"
    Trainer(TrainConfig(method="pretrain", dataset="digits", out=str(path), steps=30, lr=1e-3, ema_decay=0.9,
                        **TINY), progress=False).run()
    return path


def patch_cfg(base, out, method="dmp", steps=20, **kw):
    return TrainConfig(method=method, dataset="digits", out=str(out), base=str(base), steps=steps,
                       **(TINY | {"lr": 1e-3} | kw))


def test_patch_loss_falls_and_only_patch_changes(base, tmp_path):
    before = load_file(str(base))
    trainer = Trainer(patch_cfg(base, tmp_path / "p.safetensors", steps=60, lr=1e-2), progress=False)
    start = heldout_loss(trainer.model, trainer.diffusion, trainer.test_data, trainer.patch)  # zero patch = base
    out = trainer.run()
    end = heldout_loss(trainer.model, trainer.diffusion, trainer.test_data, trainer.patch)
    assert end < start  # same test images, timesteps and noise before and after
    after = {k: v for k, v in trainer.model.state_dict().items()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)  # base bit-identical
    assert torch.equal(load_file(str(base))["x_embedder.proj.weight"], before["x_embedder.proj.weight"])
    patch = load_patch(out, base=load_base(base))
    assert patch.prompts.abs().sum() > 0 and patch.gate.weight.abs().sum() > 0
    meta = patch.metadata
    assert json.loads(meta["train_config"])["lr"] == 1e-2 and "heldout_loss" in json.loads(meta["metrics"])


def test_resume_continues_exactly(base, tmp_path):
    straight = Trainer(patch_cfg(base, tmp_path / "a.safetensors", steps=20), progress=False)
    straight.run()
    half = Trainer(patch_cfg(base, tmp_path / "b.safetensors", steps=10), progress=False)
    half.run()
    resumed = Trainer(patch_cfg(base, tmp_path / "b.safetensors", steps=20), progress=False)
    assert resumed.step == 10
    resumed.run()
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_baselines_run(base, tmp_path):
    assert main(["patch", "--base", str(base), "--dataset", "digits", "--image-size", "8", "--steps", "5",
                 "--batch-size", "16", "--baseline", "pt", "--out", str(tmp_path / "pt.safetensors"),
                 "--device", "cpu", "--quiet"]) == 0
    pt = load_patch(tmp_path / "pt.safetensors", base=load_base(base))
    assert pt.method == "pt" and not hasattr(pt, "gate")
    assert main(["patch", "--base", str(base), "--dataset", "digits", "--image-size", "8", "--steps", "5",
                 "--batch-size", "16", "--baseline", "ft", "--out", str(tmp_path / "ft.safetensors"),
                 "--device", "cpu", "--quiet"]) == 0
    ft, orig = load_base(tmp_path / "ft.safetensors"), load_base(base)
    assert not torch.equal(ft.blocks[0].attn.qkv.weight, orig.blocks[0].attn.qkv.weight)


def test_clear_errors(base, tmp_path, capsys):
    assert main(["patch", "--base", str(base), "--dataset", "no-such-set", "--out", str(tmp_path / "x.safetensors"),
                 "--device", "cpu", "--quiet"]) == 2
    assert "unknown data set" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    Trainer(TrainConfig(method="pretrain", dataset="digits", out=str(other), steps=2, seed=1, **TINY),
            progress=False).run()
    Trainer(patch_cfg(base, tmp_path / "p.safetensors", steps=2), progress=False).run()
    with pytest.raises(PatchError, match="made for base"):
        load_patch(tmp_path / "p.safetensors", base=load_base(other))
    assert main(["eval", "--base", str(other), "--patch", str(tmp_path / "p.safetensors"), "--device", "cpu"]) == 2
    assert "made for base" in capsys.readouterr().err


def test_evaluation_floor_below_ceiling(base, tmp_path):
    ev = Evaluator("digits", 8, classifier_dir=tmp_path, classifier_steps=150, progress=False)
    assert ev.classifier_acc > 0.5
    assert ev.floor["fid_like"] < ev.ceiling["fid_like"] and ev.floor["kid"] < ev.ceiling["kid"]
    result = evaluate(base, None, "digits", sampler="ddim", steps=4, evaluator=ev)
    assert result["num_samples"] == len(ev.test) and 0 <= result["class_acc"] <= 1
    assert np.isfinite(result["fid_like"]) and np.isfinite(result["fid_like_test"])
    assert result["fid_like_test"] != result["fid_like"]  # scored against the held-out split too


def test_ema_patch_is_saved_and_resumes_exactly(base, tmp_path):
    trainer = Trainer(patch_cfg(base, tmp_path / "e.safetensors", steps=20, lr=1e-2, ema_decay=0.8), progress=False)
    trainer.run()
    saved = load_patch(tmp_path / "e.safetensors")
    assert torch.equal(saved.prompts, trainer.ema.prompts) and not torch.equal(saved.prompts, trainer.patch.prompts)
    assert saved.prompts.abs().sum() > 0  # 20 steps at 0.8 leave little of the zero init
    Trainer(patch_cfg(base, tmp_path / "h.safetensors", steps=10, lr=1e-2, ema_decay=0.8), progress=False).run()
    Trainer(patch_cfg(base, tmp_path / "h.safetensors", steps=20, lr=1e-2, ema_decay=0.8), progress=False).run()
    a, b = load_file(str(tmp_path / "e.safetensors")), load_file(str(tmp_path / "h.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_decay_anneals_linearly_to_zero_and_resumes_exactly(base, tmp_path):
    lrs = []
    trainer = Trainer(patch_cfg(base, tmp_path / "d.safetensors", steps=8, lr_decay_steps=4), progress=False)
    step = trainer.opt.step
    trainer.opt.step = lambda: (lrs.append(trainer.opt.param_groups[0]["lr"]), step())[1]
    trainer.run()
    assert lrs == pytest.approx([1e-3] * 5 + [1e-3 * 3 / 4, 1e-3 / 2, 1e-3 / 4])  # last step: lr / decay steps
    Trainer(patch_cfg(base, tmp_path / "r.safetensors", steps=6, lr_decay_steps=4), progress=False).run()
    Trainer(patch_cfg(base, tmp_path / "r.safetensors", steps=8, lr_decay_steps=4), progress=False).run()
    a, b = load_file(str(tmp_path / "d.safetensors")), load_file(str(tmp_path / "r.safetensors"))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the schedule is set by the final --steps: 6 then 8 differs
    Trainer(patch_cfg(base, tmp_path / "q.safetensors", steps=8, lr_decay_steps=4, max_seconds=1e-9),
            progress=False).run()  # cut after one step, resumed with the same plan
    Trainer(patch_cfg(base, tmp_path / "q.safetensors", steps=8, lr_decay_steps=4), progress=False).run()
    c = load_file(str(tmp_path / "q.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_gate_scale_trains_and_saves_scaled_prompts(base, tmp_path):
    trainer = Trainer(patch_cfg(base, tmp_path / "g.safetensors", steps=5, gate_scale=16.0), progress=False)
    trainer.run()
    saved = load_patch(tmp_path / "g.safetensors", base=load_base(base))
    torch.testing.assert_close(saved.prompts, trainer.patch.prompts.detach() * 16)


def test_heldout_deciles_are_deterministic_and_paired(base, tmp_path):
    from app.trainer.heldout import DECILES, decile_losses, paired_summary

    trainer = Trainer(patch_cfg(base, tmp_path / "d.safetensors", steps=30, lr=1e-2), progress=False)
    trainer.run()
    model, diff, test = trainer.model, trainer.diffusion, trainer.test_data
    a, b = decile_losses(model, diff, test, reps=1), decile_losses(model, diff, test, reps=1)
    assert a.shape == (DECILES, len(test)) and torch.equal(a, b)
    assert a[0].mean() > a[-1].mean()  # the learned-variance term dominates at small t
    same = paired_summary(a, a)
    assert same["rel_diff_pct"] == [0.0] * DECILES and same["all_rel_diff_se_pct"] == 0.0
    patched = paired_summary(a, decile_losses(model, diff, test, patch=trainer.patch, reps=1))
    assert patched["all_rel_diff_pct"] != 0.0 and all(se > 0 for se in patched["rel_diff_se_pct"])


def _half_width(img: np.ndarray) -> float:
    """Half the stroke width by another method than captions.py's: distance from ink to background (90th pct)."""
    ink = img > 0.5
    return float(np.percentile(ndimage.distance_transform_edt(ink)[ink], 90)) if ink.any() else 0.0


def _lean(img: np.ndarray) -> float:
    """Rightward lean by another method than captions.py's: ink centre of the top half minus the bottom half's, per
    row between them (> 0: the top is further right)."""
    ys, xs = np.nonzero(img > 0.5)
    top, bottom = ys < np.median(ys), ys > np.median(ys)
    return float((xs[top].mean() - xs[bottom].mean()) / max(ys[bottom].mean() - ys[top].mean(), 1e-6))


def test_captions_are_true_of_their_images():
    """Caption words checked against measurements captions.py does not make: thick strokes are wider than thin ones
    by a distance transform, slanted digits lean right of upright and backward-leaning ones by their half centres."""
    ds = load_dataset("mnist", "test", 28)
    raw = (ds.x[:, 0].numpy() + 1) / 2
    width, lean = {}, {}
    for img, label in zip(raw[:400], ds.labels[:400].tolist(), strict=True):
        words = caption(img, label).split()
        assert label_of(" ".join(words)) == label
        for word in ("thin", "thick"):
            if word in words:
                width.setdefault(word, []).append(_half_width(img))
        for word in ("slanted", "upright", "backward-leaning"):
            if word in words:
                lean.setdefault(word, []).append(_lean(img))
    assert all(len(v) >= 20 for v in (*width.values(), *lean.values())), {k: len(v) for k, v in (width | lean).items()}
    p = np.percentile
    assert p(width["thick"], 10) > p(width["thin"], 90)
    assert p(lean["slanted"], 10) > p(lean["upright"], 90) and p(lean["upright"], 10) > p(lean["backward-leaning"], 50)
    assert abs(np.median(lean["upright"])) < 0.1


def test_caption_attributes_on_drawn_strokes():
    thin, thick = np.zeros((28, 28)), np.zeros((28, 28))
    thin[4:24, 14] = 1.0  # a 1-px vertical bar
    thick[4:24, 12:17] = 1.0  # a 5-px vertical bar
    assert caption(thin, 1) == "a thin upright one"
    assert caption(thick, 1) == "a thick upright one"
    leaning = np.zeros((28, 28))
    for row in range(4, 24):
        leaning[row, 20 - (row - 4) // 2: 22 - (row - 4) // 2] = 1.0  # top to the right: italic slant
    assert "slanted" in caption(leaning, 7)


def test_compare_pairs_seeds_and_a_copy_of_the_base_differs_by_zero(base, tmp_path):
    from app.trainer.compare import compare, markdown, versus

    Trainer(patch_cfg(base, tmp_path / "c.safetensors", steps=20, lr=1e-2), progress=False).run()
    arms = {"same": str(base), "dmp": str(tmp_path / "c.safetensors")}
    out = compare(base, arms, [0, 1], steps=4, cache=tmp_path / "cache", boots=10, classifier_dir=tmp_path,
                  classifier_steps=100)
    same, dmp = out["arms"]["same"], out["arms"]["dmp"]
    assert same["summary"]["d_fid_like"]["mean"] == 0.0 and same["runs"][0]["per_seed"][0]["d_fid_like_se"] == 0.0
    assert same["heldout_deciles"]["all_rel_diff_pct"] == 0.0
    assert dmp["summary"]["d_fid_like"]["mean"] != 0.0 and dmp["summary"]["d_fid_like"]["se"] > 0
    assert dmp["summary"]["d_fid_like"]["se_over"] == "sampling seeds"
    assert dmp["heldout_deciles"]["all_rel_diff_se_pct"] > 0
    assert len(list((tmp_path / "cache").glob("*.npz"))) > 0  # samples cached for reruns
    assert same["summary"]["d_fd_pca_pct"]["mean"] == 0.0 and dmp["summary"]["d_fd_randcnn_pct"]["se"] > 0
    assert "| same | 1 | +0.00 ± 0.00 |" in markdown(out)
    assert same["summary"]["d_fd_mobilenet_pct"]["mean"] == 0.0
    assert dmp["runs"][0]["per_seed"][0]["d_fd_mobilenet_se"] > 0
    assert "Δ FD mobilenet (%)" in markdown(out)
    vs_copy = versus(out, "same")["dmp"]["d_fid_like_pct"]  # minus an arm that is the base: the arm's own Δ
    assert vs_copy["mean"] == pytest.approx(dmp["summary"]["d_fid_like_pct"]["mean"])
    assert vs_copy["se"] == pytest.approx(dmp["summary"]["d_fid_like_pct"]["se"])
    assert "added_rms" not in same["runs"][0] and dmp["runs"][0]["added_rms"] > 0  # an FT/base file adds no prompts
    # two training runs of one recipe: the SE is taken over the runs' seed-averaged differences
    fast = ("pca", "randcnn")  # mobilenet's 1280-d FD takes seconds: checked once, above
    two = compare(base, {"runs": [arms["same"], arms["dmp"]]}, [0, 1], steps=4, cache=tmp_path / "cache", boots=10,
                  classifier_dir=tmp_path, extractors=fast)["arms"]["runs"]
    per_run = [sum(r["per_seed"][s]["d_fid_like_pct"] for s in (0, 1)) / 2 for r in two["runs"]]
    assert two["summary"]["d_fid_like_pct"]["se_over"] == "training runs"
    assert two["summary"]["d_fid_like_pct"]["mean"] == pytest.approx(sum(per_run) / 2)
    assert two["summary"]["d_fid_like_pct"]["se"] == pytest.approx(abs(per_run[0] - per_run[1]) / 2)
    assert two["heldout_deciles"]["all_rel_diff_pct"] == pytest.approx(dmp["heldout_deciles"]["all_rel_diff_pct"] / 2,
                                                                       abs=1e-3)
    paired = compare(base, {"runs": [arms["same"], arms["dmp"]]}, [0, 1], steps=4, cache=tmp_path / "cache",
                     boots=10, classifier_dir=tmp_path, heldout=False, seed_per_run=True,
                     extractors=fast)["arms"]["runs"]["runs"]
    assert [list(r["per_seed"]) for r in paired] == [[0], [1]]  # run i sampled at seed i only
    assert paired[1]["per_seed"][1] == two["runs"][1]["per_seed"][1]
    with pytest.raises(ValueError, match="one seed per run"):
        compare(base, {"runs": [arms["dmp"]]}, [0, 1], cache=tmp_path / "cache", classifier_dir=tmp_path,
                seed_per_run=True, extractors=fast)
    one_seed = compare(base, {"dmp": arms["dmp"]}, [0], steps=4, cache=tmp_path / "cache", boots=10,
                       classifier_dir=tmp_path, heldout=False, extractors=fast)
    assert "| dmp |" in markdown(one_seed)  # bootstrap SE where there is one seed
