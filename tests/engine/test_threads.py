"""DMP_TORCH_THREADS on the runner thread from its first step: OpenMP keeps its thread count per thread, so a thread
that torch never told runs a compiled step's GEMMs on every core
(bench/results/2026-12-07-cpu-runner-threads-epyc-s30-adhoc.log)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
import torch

from app.core.config import Settings
from app.engine.engine import Engine

OPENMP = sorted((Path(torch.__file__).parent / "lib").glob("lib*omp*.so*"))
pytestmark = [pytest.mark.skipif(not OPENMP, reason="this torch build ships no OpenMP runtime in torch/lib"),
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or "OMP_NUM_THREADS" in os.environ,
                                 reason="a new thread's OpenMP default is 1 here already")]


def omp_max_threads() -> int:
    """The calling thread's OpenMP thread count, read without torch (whose getter would set it)."""
    return ctypes.CDLL(str(OPENMP[0])).omp_get_max_threads()


def test_the_runner_thread_takes_dmp_torch_threads_before_any_step(class_only_dirs):
    engine = Engine(Settings(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"],
                             torch_threads=1, warmup=False))  # no warm-up: no eager op has run on the runner yet
    engine.start()
    try:
        assert engine.state == "ready", engine.error
        assert engine.batcher is not None
        assert engine.batcher.call(omp_max_threads).result(timeout=30) == 1
    finally:
        engine.stop()
