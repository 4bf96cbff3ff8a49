"""How many patches one server holds: N small patches on disk for one tiny base, a real Engine with few slots and a
small host cache; start-up (every file validated), listing, and requests over random patches (most read back
from disk, swapped in, evicted).

    python -m bench.registry_scale --patches 10000 [--requests 300] [--json-out bench/results/<date>-registry.json]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from app.core.config import Settings
from app.engine.engine import Engine
from app.model.dit import DiT, DiTConfig
from app.model.dmp import new_patch_for, patch_metadata_for, patch_to_bytes
from app.model.loaders import save_base
from bench.churn import metric_total

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            learn_sigma=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--host-bytes", type=int, default=1 << 20)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = DiT(DiTConfig(**TINY)).eval()
        save_base(base, root / "models" / "tiny.safetensors", name="tiny", task="class", vae="pixel",
                  default_sampler="ddim", default_steps="2")
        (root / "patches").mkdir()
        meta = patch_metadata_for(base, "tiny")
        for i in range(args.patches):
            patch = new_patch_for(base)
            with torch.no_grad():
                for p in patch.parameters():
                    p.normal_(0, 0.1)
            (root / "patches" / f"p{i:05d}.safetensors").write_bytes(patch_to_bytes(patch, **meta))
        size = (root / "patches" / "p00000.safetensors").stat().st_size
        settings = Settings(model_dir=root / "models", patch_dir=root / "patches", patch_slots=args.slots,
                            patch_host_bytes=args.host_bytes, torch_threads=1, warmup=False)
        engine = Engine(settings)
        t0 = time.perf_counter()
        engine.start()
        start_s = time.perf_counter() - t0
        assert engine.state == "ready", engine.error
        t0 = time.perf_counter()
        listed = [engine.registry.summary(r) for r in engine.registry.list()]
        list_s = time.perf_counter() - t0
        names = [r["name"] for r in listed if r["state"] == "ready"]
        picks = random.Random(0).choices(names, k=args.requests)

        def one(name):
            spec = engine.resolve(patch=name, class_label=1, steps=2, seed=1)
            return engine.submit(spec, engine.condition(engine.bases["tiny"], spec)).future.result(timeout=600)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, picks))
        gen_s = time.perf_counter() - t0

        def total(name, **labels):
            return metric_total(engine, name, **labels)
        summaries = [engine.registry.summary(r) for r in engine.registry.list()]
        out = {"patches": args.patches, "ready": len(names), "file_bytes": size, "device_slots": args.slots - 1,
               "host_bytes_cap": args.host_bytes, "start_s": start_s, "list_s": list_s,
               "requests": args.requests, "answered": len(results), "generate_s": gen_s,
               "swap_ins": total("dmp_patch_swap_ins_total"), "evictions": total("dmp_patch_evictions_total"),
               "store_read_backs": total("dmp_patch_swap_in_seconds_count", source="store"),
               "host_bytes": engine.bases["tiny"].patches.stats()["host_bytes"],
               "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "residency": {k: sum(r["resident"] == k for r in summaries) for k in ("device", "host", "stored")}}
        engine.stop()
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
