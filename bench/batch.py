"""The Batch API against the same requests sent synchronously, and what a running batch costs interactive requests.

Starts `python -m app serve` (embedded Batch API, no Redis) on one class base and measures, with the real `openai`
client: (1) the step time (latency at --steps minus latency at 1 step, over the extra steps); (2) lines/s of a
--lines batch; (3) requests/s of the same requests sent synchronously by --clients clients; (4) the p50 latency of
one-at-a-time interactive requests alone and while a batch runs, in alternating blocks of --block (its `added_ms`,
and that in steps), sent back to back (`--think-ms 0`: a client's next request comes as the last is answered) or
after a random pause of up to --think-ms (arrivals at any point of a batch step). JSON on stdout (and `--out`).
`--pool` adds up the added delay of several runs' result files.

    python -m bench.batch --lines 200 --clients 8 --steps 20 --out bench/results/batch.json
    python -m bench.batch --pool bench/results/run1.json bench/results/run2.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openai
from scipy import stats

from bench.common import run_together, wait_ready

FINAL = ("completed", "failed", "cancelled", "expired")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(i: int, steps: int) -> dict:
    return {"prompt": str(i % 10), "seed": i, "steps": steps}


def timed(oai: openai.OpenAI, b: dict) -> float:
    t0 = time.perf_counter()
    oai.images.generate(prompt=b["prompt"], extra_body={k: v for k, v in b.items() if k != "prompt"})
    return time.perf_counter() - t0


def latencies(oai: openai.OpenAI, steps: int, count: int, think: float = 0.0, seed0: int = 1000) -> list[float]:
    """Latencies of `count` one-at-a-time requests, each after a random pause of up to `think` seconds."""
    out, pauses = [], random.Random(seed0)
    for i in range(count):
        time.sleep(pauses.uniform(0, think))
        out.append(timed(oai, body(seed0 + i, steps)))
    return out


def interleaved(oai: openai.OpenAI, args, think: float) -> tuple[list[float], list[float]]:
    """Interactive latencies alone and while a batch runs, in alternating blocks of --block probes (a fresh batch
    submitted for each busy block and cancelled after it), so a drift of the machine's speed over minutes (tens of
    % on a shared VM) falls on both sides alike."""
    alone: list[float] = []
    busy: list[float] = []
    for k in range(-(-args.probes // args.block)):
        alone += latencies(oai, args.steps, args.block, think, seed0=1000 + 100 * k)
        batch_id = submit(oai, args.lines, args.steps, 10_000 * (k + 1))
        time.sleep(1.0)  # its first lines are running
        busy += latencies(oai, args.steps, args.block, think, seed0=50_000 + 100 * k)
        oai.batches.cancel(batch_id)
        wait_batch(oai, batch_id, "cancelled")
    return alone, busy


def submit(oai: openai.OpenAI, lines: int, steps: int, offset: int) -> str:
    data = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/images/generations",
                               "body": body(offset + i, steps)}) + "\n" for i in range(lines)).encode()
    file = oai.files.create(file=("bench.jsonl", data), purpose="batch")
    return oai.batches.create(input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h").id


def wait_batch(oai: openai.OpenAI, batch_id: str, expect: str = "completed") -> float:
    while True:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in FINAL:
            assert batch.status == expect and batch.request_counts.failed == 0, batch
            return time.perf_counter()
        time.sleep(0.1)


def added_delay(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float, float]:
    """(estimate, 95 % low, high) of the mean over (busy, alone) pairs of the difference of medians; the bootstrap
    (percentile) resamples each sample on its own."""
    samples = [x for pair in pairs for x in pair]

    def added(*xs, axis=-1):
        return np.mean([np.median(b, axis) - np.median(a, axis) for b, a in zip(xs[::2], xs[1::2], strict=True)],
                       axis=0)

    ci = stats.bootstrap(samples, added, n_resamples=5000, method="percentile", random_state=0).confidence_interval
    return float(added(*samples)), float(ci.low), float(ci.high)


def pooled(paths: list[Path]) -> dict:
    """Added delay in steps over several runs' raw latencies: the mean over runs of each run's difference of medians
    (in its own step time, so runs on a machine whose speed drifted between them still add up)."""
    runs = [json.loads(path.read_text()) for path in paths]
    est, low, high = added_delay([(np.array(r["latencies_during_batch_ms"]) / r["step_ms"],
                                   np.array(r["latencies_alone_ms"]) / r["step_ms"]) for r in runs])
    return {"runs": [str(path) for path in paths], "think_ms": sorted({r["think_ms"] for r in runs}),
            "probes": sum(len(r["latencies_alone_ms"]) for r in runs),
            "added_steps": round(est, 2), "added_steps_95ci": [round(low, 2), round(high, 2)]}


def throughput(oai: openai.OpenAI, url: str, args) -> dict:
    """Lines/s of one --lines batch, and requests/s of the same requests sent by --clients synchronous clients."""
    t0 = time.perf_counter()
    batch_s = wait_batch(oai, submit(oai, args.lines, args.steps, 0)) - t0
    todo, lock = list(range(args.lines)), threading.Lock()

    def client():
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            timed(c, body(i, args.steps))

    t0 = time.perf_counter()
    run_together([threading.Thread(target=client) for _ in range(args.clients)])
    sync_s = time.perf_counter() - t0
    return {"batch_lines_per_s": round(args.lines / batch_s, 2), "sync_requests_per_s": round(args.lines / sync_s, 2),
            "batch_over_sync": round(sync_s / batch_s, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("models/mnist.safetensors"), help="the class base served")
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--clients", type=int, default=8, help="synchronous clients sending the same requests")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--inflight", type=int, default=2, help="DMP_BATCH_INFLIGHT")
    p.add_argument("--probes", type=int, default=30, help="interactive requests per latency measurement")
    p.add_argument("--block", type=int, default=5, help="probes per block (alone and busy blocks alternate)")
    p.add_argument("--think-ms", type=float, default=0.0, help="random pause of up to this before each probe")
    p.add_argument("--threads", type=int, default=1, help="DMP_TORCH_THREADS")
    p.add_argument("--interference-only", action="store_true",
                   help="skip the throughput comparison (more probes in the same time)")
    p.add_argument("--out", type=Path)
    p.add_argument("--pool", type=Path, nargs="+", help="no run: pool the raw latencies of these result files")
    args = p.parse_args(argv)
    if args.pool:
        print(json.dumps(pooled(args.pool), indent=2))
        return 0
    if args.steps < 5:
        print("error: --steps must be at least 5 (the step time is a difference of latencies)", file=sys.stderr)
        return 2
    if not args.model.exists():
        print(f"error: no base at {args.model}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    (root / "models").mkdir()
    shutil.copy(args.model, root / "models")
    port = free_port()
    env = os.environ | {"DMP_MODEL_DIR": str(root / "models"), "DMP_PATCH_DIR": str(root / "patches"),
                        "DMP_BATCH_DIR": str(root / "batch"), "DMP_TORCH_THREADS": str(args.threads),
                        "DMP_BATCH_INFLIGHT": str(args.inflight), "DMP_MAX_QUEUE": "256", "DMP_LOG_LEVEL": "warning"}
    log = root / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log=log)
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        one = statistics.median(latencies(oai, 1, args.probes))
        alone = latencies(oai, args.steps, args.probes)
        step_ms = 1000 * (statistics.median(alone) - one) / (args.steps - 1)

        result: dict = {"lines": args.lines, "steps": args.steps, "inflight": args.inflight, "clients": args.clients,
                        "think_ms": args.think_ms, "torch_threads": args.threads,
                        "settings": {k: v for k, v in os.environ.items() if k.startswith("DMP_")},
                        "step_ms": round(step_ms, 2)}
        if not args.interference_only:
            result |= throughput(oai, url, args)
        alone, busy = interleaved(oai, args, args.think_ms / 1000)
        est, low, high = added_delay([(1000 * np.array(busy), 1000 * np.array(alone))])
        added_ms, ci_ms = est, [round(low, 1), round(high, 1)]
        result |= {"interactive_p50_alone_ms": round(1000 * statistics.median(alone), 1),
                   "interactive_p50_during_batch_ms": round(1000 * statistics.median(busy), 1),
                   "interactive_probes": len(busy), "block": args.block,
                   "interactive_p90_alone_ms": round(1000 * statistics.quantiles(alone, n=10)[-1], 1),
                   "interactive_p90_during_batch_ms": round(1000 * statistics.quantiles(busy, n=10)[-1], 1),
                   "added_ms": round(added_ms, 1), "added_steps": round(added_ms / step_ms, 2),
                   "added_ms_95ci": ci_ms, "added_steps_95ci": [round(v / step_ms, 2) for v in ci_ms],
                   "latencies_alone_ms": [round(1000 * v, 1) for v in alone],
                   "latencies_during_batch_ms": [round(1000 * v, 1) for v in busy]}
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
