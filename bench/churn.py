"""Many patches over few device slots: the real Engine (admission, step-level batcher, slot seating and swap-ins)
serving a random mix of 64 patches over 8 slots vs every request on one patch, same load, one run.

    python -m bench.engine --churn [--threads 1] [--json-out bench/results/<date>-cpu-churn.json]

Closed loop: `concurrency` clients send `requests` one-image requests back to back (10 DDIM steps, CFG 4); patches
are already in host memory (the first round seats each once). Modes alternate over rounds; each mode's reported
throughput is its best round and p95 is over all its requests. Also measured, for bench/cluster_sim.py: the time
to read back and validate a DiT-XL/2-shaped patch (the `stored` -> `host` swap-in) on this CPU.
"""
from __future__ import annotations

import itertools
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from app.core.config import Settings
from app.engine.engine import Engine
from app.model.dit import DiT, DiT_models, DiTConfig
from app.model.dmp import new_patch_for, patch_from_bytes, patch_metadata_for, patch_to_bytes
from app.model.loaders import save_base


def _write_served(root: Path, shape: dict, patches: int, steps: int, randomize, random_patch) -> None:
    """A random base of `shape` and `patches` random patches for it, as the server reads them."""
    model = randomize(DiT(DiTConfig(**shape)), std=0.05)
    save_base(model, root / "models" / "demo.safetensors", name="demo", task="class", vae="pixel",
              default_sampler="ddim", default_steps=str(steps), default_guidance="4.0")
    (root / "patches").mkdir()
    meta = patch_metadata_for(model, "demo")
    for i in range(patches):
        (root / "patches" / f"p{i:03d}.safetensors").write_bytes(patch_to_bytes(random_patch(model, seed=i), **meta))


def _round(engine: Engine, names: list[str], requests: int, concurrency: int, steps: int, seed: int):
    """(seconds, latencies) of `requests` requests from `concurrency` closed-loop clients."""
    counter, latencies, lock = itertools.count(), [], threading.Lock()
    rng = random.Random(seed)
    picks = [rng.choice(names) for _ in range(requests)]
    base = engine.bases["demo"]

    def client():
        while (i := next(counter)) < requests:
            spec = engine.resolve(patch=picks[i], class_label=i % 10, steps=steps, seed=seed * 100_000 + i)
            t0 = time.perf_counter()
            engine.submit(spec, engine.condition(base, spec)).future.result(timeout=600)
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies


def metric_total(engine: Engine, name: str, **labels: str) -> float:
    """Sum of one metric's samples over the series carrying `labels`."""
    return sum(s.value for f in engine.metrics.registry.collect() for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def store_load_ms(repeats: int = 3) -> float:
    """Median ms to parse and validate one DiT-XL/2-shaped patch file (28 x 256 x 1152 prompts) from bytes."""
    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    data = patch_to_bytes(new_patch_for(xl), base_fingerprint="0" * 64, base_name="xl", task="class")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        patch_from_bytes(data)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def churn_suite(*, shape: dict, randomize, random_patch, device: str, threads: int, patches: int = 64,
                slots: int = 8, requests: int = 96, concurrency: int = 32, steps: int = 10, rounds: int = 3,
                log=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_served(root, shape, patches, steps, randomize, random_patch)
        settings = Settings(model_dir=root / "models", patch_dir=root / "patches", device=device,
                            patch_slots=slots + 1, max_batch=16, max_queue=4 * concurrency, torch_threads=threads,
                            request_timeout=600)
        engine = Engine(settings)
        engine.start()
        if engine.state != "ready":
            raise RuntimeError(f"engine did not start: {engine.error}")
        try:
            names = sorted(r.name for r in engine.registry.list())
            modes = {"one_patch": names[:1], "mixed": names}
            _round(engine, names, patches, concurrency, steps, seed=999)  # seat most patches once
            results = {m: {"seconds": [], "latencies": []} for m in modes}
            swaps0 = metric_total(engine, "dmp_patch_swap_ins_total")
            for r in range(rounds):
                for mode, pool in modes.items():
                    secs, lats = _round(engine, pool, requests, concurrency, steps, seed=r)
                    results[mode]["seconds"].append(secs)
                    results[mode]["latencies"] += lats
                    log(f"round {r} {mode:<10} {requests / secs:7.2f} img/s  p95 {np.percentile(lats, 95):.3f} s")
            swap_ins = metric_total(engine, "dmp_patch_swap_ins_total") - swaps0
            host_s = metric_total(engine, "dmp_patch_swap_in_seconds_sum", source="host")
            host_n = metric_total(engine, "dmp_patch_swap_in_seconds_count", source="host")
        finally:
            engine.stop()
    out = {"patches": patches, "device_slots": slots, "requests_per_round": requests, "concurrency": concurrency,
           "steps": steps, "guidance": 4.0, "rounds": rounds, "max_batch": 16}
    for mode, r in results.items():
        out[mode] = {"images_per_s": requests / min(r["seconds"]), "p50_s": float(np.percentile(r["latencies"], 50)),
                     "p95_s": float(np.percentile(r["latencies"], 95)), "round_seconds": r["seconds"]}
    out["throughput_ratio"] = out["mixed"]["images_per_s"] / out["one_patch"]["images_per_s"]
    out["p95_ratio"] = out["mixed"]["p95_s"] / out["one_patch"]["p95_s"]
    out["mixed_swap_ins_per_request"] = swap_ins / (rounds * requests)
    out["swap_in_host_ms_mean"] = 1e3 * host_s / max(host_n, 1)
    out["xl2_patch_store_load_ms"] = store_load_ms()
    return out
