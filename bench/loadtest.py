"""Small load test of a running server: requests/s and p50/p95 latency at several concurrencies.

    python -m bench.loadtest --url http://127.0.0.1:8000 --model mnist --patches mnist-dmp --steps 10
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx

from bench.common import run_together


def run(url: str, bodies: list[dict], clients: int, requests: int) -> dict:
    """`clients` threads send `requests` requests in total (round robin over `bodies`)."""
    latencies, codes, lock, counter = [], [], threading.Lock(), iter(range(requests))

    def client():
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = http.post(url + "/generate", json=bodies[i % len(bodies)] | {"seed": i})
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    codes.append(r.status_code)

    start = time.perf_counter()
    run_together([threading.Thread(target=client) for _ in range(clients)])
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20)
    return {"clients": clients, "requests": requests, "rps": requests / wall,
            "p50_ms": 1000 * statistics.median(latencies), "p95_ms": 1000 * q[18],
            "non_200": sum(c != 200 for c in codes)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--patches", default="", help="comma-separated patch names for the mixed runs")
    p.add_argument("--class-label", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--per-client", type=int, default=8)
    args = p.parse_args()
    base = {"model": args.model, "steps": args.steps}
    if args.class_label is not None:
        base["class_label"] = args.class_label
    mixes = {"base only": [base]}
    if args.patches:
        mixes["mixed patches"] = [base] + [base | {"patch": name} for name in args.patches.split(",")]
    run(args.url, [base], 1, 2)  # warm
    print("| mix | clients | requests | req/s | p50 ms | p95 ms | non-200 |\n|---|---|---|---|---|---|---|")
    for mix, bodies in mixes.items():
        for clients in map(int, args.clients.split(",")):
            r = run(args.url, bodies, clients, clients * args.per_client)
            print(f"| {mix} | {clients} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                  f"{r['non_200']} |", flush=True)


if __name__ == "__main__":
    main()
