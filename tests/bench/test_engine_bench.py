"""bench/engine.py's paired readings of the patch's cost: the statistic, and per-step pairs on real step functions."""
from __future__ import annotations

import time

import torch

from app.model.dit import DiT, DiTConfig
from bench.engine import DEMO_SHAPE, Bench, paired_ratio, randomize_, step_overhead


def busy(seconds: float):
    def spin():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pass
    return spin


def test_paired_ratio_reads_a_known_cost_with_an_interval_around_its_median():
    got = paired_ratio(busy(0.003), busy(0.002), 60, torch.device("cpu"))
    assert got["pairs"] == 60
    assert 0.35 < got["median"] < 0.65  # 3 ms against 2 ms: +50 %, whatever else the machine runs
    low, high = got["ci95"]
    assert low <= got["median"] <= high and got["q1"] <= got["median"] <= got["q3"]


def test_step_overhead_times_the_patched_step_against_the_unpatched_one():
    with torch.device("cpu"):
        model = randomize_(DiT(DiTConfig(**(DEMO_SHAPE | {"depth": 2, "hidden_size": 64}))), std=0.05)
    b = Bench(model, torch.device("cpu"), n_patches=1, compile_cpu=False, diffusers_fp32=False, twin=True)
    forwards = (b.patched, b.unpatched, b.twin)
    before = [f.fallbacks for f in forwards]
    got = step_overhead(b, batch=2, guidance=1.5, pairs=30)
    for reading in (got, got["null"]):  # the patch's cost, and the null reading of the two unpatched steps
        assert reading["pairs"] == 30 and reading["ci95"][0] <= reading["median"] <= reading["ci95"][1]
    assert [f.fallbacks for f in forwards] == before  # each ran its bucket's step, not a fallback
