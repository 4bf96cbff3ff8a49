"""Goodput under overload: completed requests per second at 1x and 2x the server's capacity (open-loop arrivals).

Starts `python -m app serve` from `--repo` (so the same bench measures another checkout, e.g. main before a change)
on one class base, measures its capacity with closed-loop clients, then, for each of `--schedulers`
(DMP_SCHEDULER: a server each, the same offered rates), offers requests at `--loads` times that rate for
`--seconds` each. A request counts when it answers 200 (its deadline is DMP_REQUEST_TIMEOUT); 429 and 503 are
refusals and cuts. JSON on stdout (and `--out`): per scheduler and load the offered and completed rates, the
goodput, codes, p50/p95 latency of the completed, and `goodput_ratio` (each load's goodput / the first load's).

    python -m bench.overload --repo . --steps 50 --timeout 5 --seconds 30 --out bench/results/overload.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import run_together, wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, models: Path, timeout: float, threads: int, scheduler: str,
                 log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    patches = Path(tempfile.mkdtemp(prefix="overload-patches-"))
    env = os.environ | {"PYTHONPATH": str(repo), "DMP_MODEL_DIR": str(models), "DMP_PATCH_DIR": str(patches),
                        "DMP_REQUEST_TIMEOUT": str(timeout), "DMP_TORCH_THREADS": str(threads),
                        "DMP_SCHEDULER": scheduler, "DMP_MAX_QUEUE": "256", "DMP_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port)], cwd=repo, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, log=log)
    return proc, url


def capacity(url: str, body: dict, clients: int, seconds: float) -> float:
    """Completed requests per second with `clients` closed-loop clients (the server's throughput)."""
    done, lock, end = [], threading.Lock(), time.monotonic() + seconds

    def client():
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < end:
                if http.post(url + "/generate", json=body).status_code == 200:
                    with lock:
                        done.append(time.monotonic())

    start = time.monotonic()
    run_together([threading.Thread(target=client) for _ in range(clients)])
    return len(done) / (time.monotonic() - start)


def offer(url: str, body: dict, rate: float, seconds: float) -> dict:
    """Open loop: one request every 1/rate s for `seconds`, each on its own thread; what came back."""
    results, lock = [], threading.Lock()

    def one():
        t0 = time.monotonic()
        try:
            code = httpx.post(url + "/generate", json=body, timeout=600).status_code
        except httpx.HTTPError:
            code = 0
        with lock:
            results.append((code, time.monotonic() - t0))

    threads, start, i = [], time.monotonic(), 0
    while (due := start + i / rate) < start + seconds:
        time.sleep(max(0.0, due - time.monotonic()))
        t = threading.Thread(target=one)
        t.start()
        threads.append(t)
        i += 1
    for t in threads:
        t.join()
    ok = sorted(lat for code, lat in results if code == 200)
    codes = collections.Counter(code for code, _ in results)
    return {"offered_rps": len(results) / seconds, "completed": len(ok), "goodput_rps": len(ok) / seconds,
            "codes": dict(sorted(codes.items())),
            "p50_s": statistics.median(ok) if ok else None,
            "p95_s": statistics.quantiles(ok, n=20)[-1] if len(ok) > 1 else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=Path("."), help="the checkout whose server is measured")
    p.add_argument("--model", type=Path, default=Path("models/mnist.safetensors"), help="the class base served")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--timeout", type=float, default=6.0, help="DMP_REQUEST_TIMEOUT: each request's deadline")
    p.add_argument("--seconds", type=float, default=40.0, help="arrival window per load")
    p.add_argument("--loads", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--clients", type=int, default=1, help="closed-loop clients measuring the capacity (1: requests "
                                                         "never share a step, so none runs out of time)")
    p.add_argument("--threads", type=int, default=1, help="DMP_TORCH_THREADS")
    p.add_argument("--schedulers", nargs="+", default=["fair", "deadline"], choices=["fair", "deadline"],
                   help="DMP_SCHEDULER of each server measured (fair: main's policy before the deadline one)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    models = Path(tempfile.mkdtemp(prefix="overload-models-"))
    shutil.copy(args.model, models)
    sidecar = args.model.with_suffix(".json")
    if sidecar.exists():
        shutil.copy(sidecar, models)
    body = {"class_label": 3, "steps": args.steps}
    out: dict = {"repo": str(args.repo.resolve()), "steps": args.steps, "timeout_s": args.timeout,
                 "seconds": args.seconds, "schedulers": {}}
    for scheduler in args.schedulers:
        log = Path(tempfile.mkstemp(prefix=f"overload-server-{scheduler}-", suffix=".log")[1])
        proc, url = start_server(args.repo.resolve(), models, args.timeout, args.threads, scheduler, log)
        try:
            if "capacity_rps" not in out:  # measured once: every scheduler is offered the same rates
                out["capacity_rps"] = capacity(url, body, args.clients, args.seconds / 2)
                if out["capacity_rps"] == 0:
                    raise RuntimeError("no request completed while measuring the capacity: raise --timeout")
            loads = out["schedulers"][scheduler] = {}
            for load in args.loads:
                loads[str(load)] = offer(url, body, load * out["capacity_rps"], args.seconds)
                time.sleep(args.timeout)  # what was cut has drained before the next load
            first = loads[str(args.loads[0])]["goodput_rps"]
            loads["goodput_ratio"] = {k: (v["goodput_rps"] / first if first else None) for k, v in loads.items()}
        finally:
            proc.terminate()
            proc.wait(30)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
