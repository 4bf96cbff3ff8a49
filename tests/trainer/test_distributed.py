"""Data-parallel training: 2 CPU ranks under torchrun (gloo) against one process, same global batch and seed.

Every random draw is made for the global batch on every rank, so 2 ranks must give the same weights as one
process up to the order of floating-point reductions; a different seed shows what "not the same" looks like.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from app.trainer.__main__ import main
from app.trainer.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[2]
DATA = ["--dataset", "digits", "--image-size", "8", "--device", "cpu", "--quiet", "--eval-every", "10",
        "--checkpoint-every", "10"]
ARCH = ["--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--patch-size", "2"]
# Hard top-2-of-4 noisy gating and heavy balancing losses, so the gathered gate statistics and the globally
# drawn gate noise matter to the result (the default weights of 0.01 would hide a mistake there); flips on, so
# their draws are sliced too.
PATCH = ["--batch-size", "32", "--lr", "1e-2", "--top-k", "0.5", "--w-importance", "1", "--w-load", "1",
         "--hflip", "on"]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m app.trainer ...` at one thread per rank."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "app.trainer", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def cosine(a: dict, b: dict, keys=None) -> float:
    keys = sorted(keys or a)
    va = torch.cat([a[k].flatten().double() for k in keys])
    vb = torch.cat([b[k].flatten().double() for k in keys])
    return torch.nn.functional.cosine_similarity(va, vb, dim=0).item()


def metrics(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["metrics"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny digits base from one process (also the reference of the 2-rank pretraining test)."""
    path = tmp_path_factory.mktemp("ddp") / "base.safetensors"
    assert main(["pretrain", *DATA, *ARCH, "--batch-size", "32", "--steps", "20", "--lr", "1e-3",
                 "--ema-decay", "0.9", "--out", str(path)]) == 0
    return path


def test_pretrain_two_ranks_match_one_process(base, tmp_path):
    out = tmp_path / "base2.safetensors"
    proc = torchrun(["pretrain", *DATA, *ARCH, "--batch-size", "32", "--steps", "20", "--lr", "1e-3",
                     "--ema-decay", "0.9", "--out", str(out)])
    assert proc.stdout.count("wrote base") == 1  # rank 0 alone writes and reports
    one, two = load_file(str(base)), load_file(str(out))
    assert cosine(one, two) > 0.999
    m = metrics(out)
    assert m["world_size"] == 2 and m["global_batch"] == 32 and metrics(base)["world_size"] == 1


@pytest.mark.parametrize("extra", [[], ["--grad-accum", "2", "--amp", "bf16"]], ids=["fp32", "accum2-bf16"])
def test_patch_two_ranks_match_one_process(base, tmp_path, extra):
    args = ["patch", "--base", str(base), *DATA, *PATCH, "--steps", "20", *extra]
    assert main([*args, "--out", str(tmp_path / "one.safetensors")]) == 0
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "seed1.safetensors")]) == 0
    proc = torchrun([*args, "--out", str(tmp_path / "two.safetensors")])
    assert proc.stdout.count("wrote DMP patch") == 1
    one, two, other = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("one", "two", "seed1"))
    assert one["prompts"].abs().sum() > 0
    assert cosine(one, two, ["prompts"]) > 0.999 and cosine(one, two) > 0.999
    assert cosine(one, other, ["prompts"]) < 0.99  # another seed is clearly another patch
    m = metrics(tmp_path / "two.safetensors")
    assert (m["world_size"], m["global_batch"], m["grad_accum"]) == (2, 32, 2 if extra else 1)


def test_two_ranks_resume_a_one_process_checkpoint(base, tmp_path):
    """Both ranks resume from the checkpoint one process wrote at step 10: same patch as 20 straight steps."""
    args = ["patch", "--base", str(base), *DATA, *PATCH]
    assert main([*args, "--steps", "20", "--out", str(tmp_path / "straight.safetensors")]) == 0
    assert main([*args, "--steps", "10", "--out", str(tmp_path / "resumed.safetensors")]) == 0
    torchrun([*args, "--steps", "20", "--out", str(tmp_path / "resumed.safetensors")])
    straight, resumed = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("straight", "resumed"))
    assert cosine(straight, resumed, ["prompts"]) > 0.999
    assert metrics(tmp_path / "resumed.safetensors")["steps"] == 20


def patch_cfg(base, out, **kw) -> TrainConfig:
    return TrainConfig(method="dmp", dataset="digits", out=str(out), base=str(base), image_size=8, batch_size=32,
                       lr=1e-2, steps=20, eval_every=10, checkpoint_every=10, device="cpu", top_k=0.5, **kw)


@pytest.mark.parametrize("amp,threshold", [("none", 0.99999), ("bf16", 0.999)])
def test_accumulation_matches_one_batch(base, tmp_path, amp, threshold):
    """2 micro-batches of 16 == 1 batch of 32. The balancing losses are statistics of each micro-batch (they
    cannot be summed over micro-batches), so they are off here: the rest must agree."""
    kw = dict(amp=amp, w_importance=0.0, w_load=0.0)
    one = Trainer(patch_cfg(base, tmp_path / "b32.safetensors", **kw), resume=False, progress=False)
    two = Trainer(patch_cfg(base, tmp_path / "a2.safetensors", grad_accum=2, **kw), resume=False, progress=False)
    a, b = load_file(str(one.run())), load_file(str(two.run()))
    assert a["prompts"].abs().sum() > 0
    assert cosine(a, b, ["prompts"]) > threshold and cosine(a, b) > threshold


def test_resume_refuses_another_global_batch(base, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    args = ["patch", "--base", str(base), *DATA, "--lr", "1e-2", "--out", str(out)]
    assert main([*args, "--batch-size", "32", "--steps", "10"]) == 0
    assert main([*args, "--batch-size", "16", "--steps", "20"]) == 2
    assert "--allow-batch-change" in capsys.readouterr().err
    assert main([*args, "--batch-size", "16", "--steps", "20", "--allow-batch-change"]) == 0
    m = metrics(out)
    assert m["steps"] == 20 and m["global_batch"] == 16 and m["batch_changes"] == [[10, 32, 16]]
    with pytest.raises(ValueError, match="split evenly"):
        Trainer(patch_cfg(base, tmp_path / "q.safetensors", grad_accum=3), resume=False, progress=False)
