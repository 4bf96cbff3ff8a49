"""What another Python thread costs a compiled CPU step: the step alone vs beside a thread that holds the GIL.

    python -m bench.gil [--batch 8] [--threads 1] [--rounds 5] [--out bench/results/x.json]

One compiled bf16 step of the engine (GraphedForward, one patch, DDIM + CFG: 2 x batch rows) on the demo base,
called back to back for `--calls` calls alone, then as many with a pure-Python busy thread running beside it (a
server's event loop and request threads hold the GIL part of the time; this one holds it all the time, so it
shows the worst case). Twice: with the C++ references GraphedForward keeps to what its graphs take
(app.engine.graphs.hold_cpp_refs) and with them dropped, rounds alternating. Printed per variant: the median ms
of a call alone and beside the thread, and their ratio. The last line is JSON.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from bench.common import emit


def busy(stop: threading.Event) -> None:
    """Pure Python, never blocking: holds the GIL except when the interpreter hands it over."""
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i


def timed_calls(call, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    from app.engine.graphs import hold_cpp_refs, release_cpp_refs
    from bench.engine import Bench, demo_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist.safetensors")
    ap.add_argument("--batch", type=int, default=8, help="images (the step runs 2x as many rows with CFG)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20, help="calls per side per round")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, source = demo_model(args.model, torch.device("cpu"))
    b = Bench(model, torch.device("cpu"), n_patches=1, compile_cpu=True, diffusers_fp32=False)
    b.warm([args.batch])
    fwd = b.patched
    rows = fwd.bucket_for(2 * args.batch)
    _, buf, _ = next(v for k, v in fwd.graphs.items() if k[0] == rows)
    top_k = next(k[1] for k in fwd.graphs if k[0] == rows)
    tensors = list(fwd.held_tensors)
    print(f"model {source}: {rows} rows, {args.threads} thread(s), {len(tensors)} tensors held", flush=True)

    def call():
        fwd._run(buf, top_k)

    call()
    times: dict[str, dict[str, list[float]]] = {v: {"alone": [], "busy": []} for v in ("held", "dropped")}
    for r in range(args.rounds):
        for variant in ("held", "dropped") if r % 2 == 0 else ("dropped", "held"):
            if variant == "dropped":
                release_cpp_refs(fwd.held)
            times[variant]["alone"] += timed_calls(call, args.calls)
            stop = threading.Event()
            thread = threading.Thread(target=busy, args=(stop,), daemon=True)
            thread.start()
            times[variant]["busy"] += timed_calls(call, args.calls)
            stop.set()
            thread.join()
            if variant == "dropped":
                fwd.held += hold_cpp_refs(tensors)
        print(f"round {r} done", flush=True)
    result = {"model": source, "rows": rows, "threads": args.threads, "calls": args.calls * args.rounds}
    for variant, t in times.items():
        alone, with_busy = statistics.median(t["alone"]) * 1e3, statistics.median(t["busy"]) * 1e3
        result[variant] = {"alone_ms_median": alone, "busy_ms_median": with_busy, "slowdown": with_busy / alone,
                           "alone_ms_min": min(t["alone"]) * 1e3, "busy_ms_min": min(t["busy"]) * 1e3}
        print(f"{variant:8s} refs: alone {alone:7.2f} ms, beside a busy Python thread {with_busy:8.2f} ms "
              f"(x{with_busy / alone:.1f}), medians of {args.calls * args.rounds} calls", flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
