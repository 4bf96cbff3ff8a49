"""Fairness: latency of a small request submitted behind big ones, vs the same request alone, in one run.

    python -m bench.fairness                 # CPU demo base (models/mnist.safetensors), DMP_MAX_BATCH=16

Two 1000-step x 8-image requests fill the batch first; then a 5-step request is submitted and timed from submit
to its decoded images. The engine is the service's own (app.engine.engine.Engine, no HTTP, no Redis: no result
cache). Prints one JSON line: `alone_s`, `behind_big_s` (seconds)
and their ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from app.core.config import Settings
from app.engine.engine import Engine

SMALL = dict(model="mnist", class_label=3, steps=5, num_images=1)
BIG = dict(model="mnist", class_label=7, steps=1000, num_images=8)


async def timed(engine: Engine, request: dict) -> float:
    started = time.perf_counter()
    await (await engine.open(engine.resolve(**request))).outcome()
    return time.perf_counter() - started


async def measure(engine: Engine) -> dict:
    """The small request alone (min of 3), then behind the two big ones once both are stepping."""
    alone = min([await timed(engine, SMALL | {"seed": seed}) for seed in (1, 2, 3)])
    bigs = [await engine.open(engine.resolve(**BIG | {"seed": seed})) for seed in (10, 11)]
    while any(w.steps_done == 0 for w in bigs):
        await asyncio.sleep(0.01)
    behind = await timed(engine, SMALL | {"seed": 4})
    big_steps = [w.steps_done for w in bigs]
    for w in bigs:
        w.cancel()
    return {"alone_s": round(alone, 3), "behind_big_s": round(behind, 3), "ratio": round(behind / alone, 2),
            "big_steps_done_meanwhile": big_steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="models/mnist.safetensors")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        shutil.copy(args.base, models)
        engine = Engine(Settings(model_dir=models, patch_dir=Path(tmp) / "patches", device="cpu", max_batch=16,
                                 max_queue=8, request_timeout=3600, torch_threads=args.threads))
        engine.start()
        result = asyncio.run(measure(engine))
        engine.drain(60)
        engine.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
