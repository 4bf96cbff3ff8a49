"""Cost of streaming on throughput: the same load on one server as plain JSON, as progress events, and as progress
events with x0 previews, in alternating rounds of one run.

    python -m bench.streaming                       # CPU, models/mnist.safetensors, 8 clients x 3 requests, 7 rounds
    python -m bench.streaming --url http://HOST:8000 --model mnist   # against a running server instead

Variants (all `POST /generate`, class label 3, new seed per request):
  json      plain JSON reply
  events    Accept: text/event-stream, a progress event per step, no previews
  previews  the same with `previews` x0 previews per request (decoded + PNG-encoded per image)
  mixed     half the clients `previews`, half `json`: images/s of the json half (does streaming slow others?)
Then, in process, the cost of keeping the x0 prediction in one batched step (no job vs every job).
Ratios are medians over rounds of the ratio to `json` in the same round (load from others on a shared machine
moves whole rounds). Prints a table; the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import run_together, wait_ready

REPO = Path(__file__).resolve().parents[1]


def one(http: httpx.Client, url: str, body: dict, mode: str, previews: int) -> int:
    """Send one request in `mode`; the images it returned."""
    if mode == "json":
        r = http.post(url + "/generate", json=body)
        r.raise_for_status()
        return len(r.json()["images"])
    extra = {"previews": previews} if mode == "previews" else {}
    done = None
    with http.stream("POST", url + "/generate", json=body | extra, headers={"Accept": "text/event-stream"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"images"' in line:
                done = json.loads(line[6:])
    return len(done["images"])


def load(url: str, modes: list[str], per_client: int, base: dict, previews: int) -> dict[str, float]:
    """Every client (one per entry of `modes`) sends `per_client` requests back to back: images/s per mode."""
    counts, ends = {m: 0 for m in set(modes)}, {m: 0.0 for m in set(modes)}
    lock, seeds = threading.Lock(), iter(range(10**9))

    def client(mode: str):
        with httpx.Client(timeout=600) as http:
            for _ in range(per_client):
                with lock:
                    seed = next(seeds)
                n = one(http, url, base | {"seed": seed}, mode, previews)
                with lock:
                    counts[mode] += n
                    ends[mode] = max(ends[mode], time.perf_counter())

    start = time.perf_counter()
    run_together([threading.Thread(target=client, args=(m,)) for m in modes])
    return {m: c / (ends[m] - start) for m, c in counts.items()}  # each mode until its own last reply


def x0_step_cost(model_path: Path, jobs: int, steps: int, rounds: int, threads: int) -> dict:
    """In-process: seconds per batched step of `jobs` requests with no job keeping its x0 vs every job keeping it
    (the worst case: every request at a preview step at once). Best of alternating rounds."""
    import torch

    from app.model import load_base, new_job
    from app.model.sampling import denoise_step

    torch.set_num_threads(threads)
    model = load_base(model_path).eval()
    best = {"none": float("inf"), "all": float("inf")}
    for _ in range(rounds):
        for kind in best:
            batch = [new_job(model, y=3, seed=i, sampler="ddim", steps=steps) for i in range(jobs)]
            for j in batch:
                j.keep_x0 = kind == "all"
            t0 = time.perf_counter()
            for _ in range(steps):
                denoise_step(model, batch)
            best[kind] = min(best[kind], (time.perf_counter() - t0) / steps)
    return {"ms_per_step_no_x0": round(1000 * best["none"], 3), "ms_per_step_all_x0": round(1000 * best["all"], 3),
            "all_x0_vs_none": round(best["all"] / best["none"], 3)}


def start_server(model_dir: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = 18000 + os.getpid() % 1000
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMP_")} | {
        "DMP_MODEL_DIR": model_dir, "DMP_PATCH_DIR": str(REPO / "patches"), "DMP_TORCH_THREADS": str(threads),
        "DMP_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one on --model-dir)")
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--previews", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (when started here)")
    args = ap.parse_args()
    proc = None
    if args.url is None:
        model_dir = Path(tempfile.mkdtemp())  # only the one base: the others would load (and warm) for nothing
        (model_dir / f"{args.model}.safetensors").symlink_to(REPO / "models" / f"{args.model}.safetensors")
        proc, url = start_server(str(model_dir), args.threads)
    else:
        url = args.url
    base = {"model": args.model, "class_label": 3, "steps": args.steps, "num_images": args.num_images}
    half = args.clients // 2
    variants = {"json": ["json"] * args.clients, "events": ["events"] * args.clients,
                "previews": ["previews"] * args.clients,
                "mixed": ["previews"] * half + ["json"] * (args.clients - half)}
    rates: dict[str, list[float]] = {name: [] for name in ["json", "events", "previews", "mixed_json"]}
    try:
        load(url, ["json"] * args.clients, 1, base, args.previews)  # warm the connections and the batch buckets
        for r in range(args.rounds):
            for name, modes in variants.items():
                got = load(url, modes, args.per_client, base, args.previews)
                print(f"round {r} {name:9s} " + " ".join(f"{m}={v:.2f} img/s" for m, v in sorted(got.items())),
                      flush=True)
                if name == "mixed":  # the json half's per-client rate, scaled to all clients
                    rates["mixed_json"].append(got["json"] / (args.clients - half) * args.clients)
                else:
                    rates[name].append(got[name])
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    step = x0_step_cost(REPO / "models" / f"{args.model}.safetensors", args.clients, args.steps, 5, args.threads)
    print(f"batched step of {args.clients} jobs: {step}")
    # load from others on a shared machine moves whole rounds: compare within a round, then take the median

    def ratio(k):
        return round(statistics.median(a / b for a, b in zip(rates[k], rates["json"], strict=True)), 3)
    out = {"clients": args.clients, "per_client": args.per_client, "steps": args.steps, "previews": args.previews,
           "num_images": args.num_images, "rounds": args.rounds,
           "median_images_per_s": {k: round(statistics.median(v), 3) for k, v in rates.items()},
           "events_vs_json": ratio("events"), "previews_vs_json": ratio("previews"),
           "mixed_json_clients_vs_all_json": ratio("mixed_json"), "step": step}
    print(f"{'variant':10s} median images/s\n" +
          "\n".join(f"{k:10s} {v:.2f}" for k, v in out["median_images_per_s"].items()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
