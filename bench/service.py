"""The service at saturation vs the engine alone, in one run: how much of the engine's rate a user gets over HTTP.

    python -m bench.service --quick                 # CPU, models/mnist.safetensors, both modes, a few minutes
    python -m bench.service --quick --profile --out bench/results/x.json   # + py-spy on the server during the
                                                    # service rounds: top functions, runner thread vs the rest

For each mode (eager: the default fp32 eager forward; compiled: DMP_CPU_COMPILE=true DMP_DTYPE=bfloat16; compiled-fp32
(`--modes compiled-fp32`, not in the default set): the same in fp32, for CPUs without native bf16) it starts
`python -m app serve` as a user would (uvicorn, one base, DMP_MAX_BATCH=--batch, DMP_TORCH_THREADS=--threads) and,
in this process, the same base loaded through the engine's own loader with the same Settings. Rounds alternate:
  service  --clients closed-loop HTTP clients send `POST /generate` requests back to back (one image, class label
           3, DDIM --steps, guidance --guidance, a new seed each); once every client has had a reply (the batch is
           in its steady state) a window of --seconds is measured, then the clients stop. Its rate is the image-steps
           the server stepped in the window (its dmp_batch_size histogram) per second: saturation, without the
           ramp-up and the drain of a fixed number of requests, which only a closed-loop bench has.
  engine   full batches of --batch one-image jobs through the runner's step function (`denoise_step` + the base's
           decode to uint8), no HTTP, no admission, no encoding, until --seconds have passed
The mode's ratio is best service round / best engine round (on a shared machine load only ever adds time); every
round's ratio is printed too. The last line is `service_over_engine=R`, R the lower of the modes' ratios
(docs/service.md "What to expect on CPU"). A closed-loop client is idle for its round trip, and its next request
joins at the next step boundary, so --clients equal to --batch leaves about one step in (steps + 1) of each slot
empty; the default runs 1.5x the batch, which keeps requests waiting at every boundary. Each round also prints the
server runner thread's and the engine thread's minor page faults per image-step (`--malloc-defaults`: both sides
with DMP_CPU_MALLOC_KEEP=false, glibc's own thresholds) and the runner's context switches per step (blocked: the
GIL, a lock; preempted: another thread took its core).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import wait_ready

REPO = Path(__file__).resolve().parents[1]
MODES = {"eager": {}, "compiled": {"DMP_CPU_COMPILE": "true", "DMP_DTYPE": "bfloat16"},
         # what a CPU without native bf16 (AVX2 only) should run compiled: there bf16 is emulated, ~5x slower
         "compiled-fp32": {"DMP_CPU_COMPILE": "true", "DMP_DTYPE": "float32"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(models: Path, patches: Path, mode: str, args) -> dict[str, str]:
    """The server's settings: one base, no Redis, the bench's batch and threads, the mode's compile and dtype."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMP_")}
    return env | {"PYTHONPATH": str(REPO), "DMP_MODEL_DIR": str(models), "DMP_PATCH_DIR": str(patches),
                  "DMP_TORCH_THREADS": str(args.threads), "DMP_MAX_BATCH": str(args.batch),
                  "DMP_MAX_QUEUE": "256", "DMP_LOG_LEVEL": "warning", "OMP_NUM_THREADS": str(args.threads),
                  "DMP_CPU_BIND": str(args.cpu_bind).lower(),
                  "DMP_CPU_MALLOC_KEEP": str(not args.malloc_defaults).lower()} | MODES[mode]


def start_server(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, timeout=3000, log=log)  # compiling five buckets took 15+ min on 2 shared cores
    return proc, url


def service_round(url: str, body: dict, model: str, clients: int, seconds: float, seed0: int, pid: int,
                  spy_raw: Path | None = None) -> dict:
    """Closed-loop clients until a --seconds window, measured once every client has had a reply, has passed."""
    errors: list[str] = []
    replies = [0] * clients
    stop = threading.Event()

    def client(i: int):
        with httpx.Client(timeout=900) as http:
            while not stop.is_set() and not errors:
                r = http.post(url + "/generate", json=body | {"seed": seed0 + i * 10**5 + replies[i]})
                if r.status_code != 200 or len(r.json()["images"]) != 1:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                replies[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        while not all(replies) and not errors:  # ramp-up: every client has been seated at least once
            time.sleep(0.05)
        spy = attach_profiler(pid, spy_raw) if spy_raw is not None else None
        t0, cpu0, (steps0, images0) = time.perf_counter(), thread_times(pid), batch_counts(url, model)
        time.sleep(seconds)
        steps1, images1 = batch_counts(url, model)
        wall, (runner_cpu, other_cpu, runner_queued, runner_faults, runner_blocked, runner_preempted) = (
            time.perf_counter() - t0, cpu_split(cpu0, thread_times(pid)))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    image_steps = images1 - images0
    return {"image_steps": image_steps, "wall_s": wall, "steps": steps1 - steps0,
            "runner_cpu_s": runner_cpu, "other_cpu_s": other_cpu, "runner_queued_s": runner_queued,
            "runner_faults": runner_faults, "runner_blocked": runner_blocked, "runner_preempted": runner_preempted}


class EngineAlone:
    """The served base, loaded by the engine's loader with the server's Settings, stepped by the runner's step."""

    def __init__(self, env: dict, model: str, batch: int):
        import torch

        from app.core.config import Settings
        from app.core.metrics import Metrics
        from app.engine.allocator import keep_freed_memory
        from app.engine.bases import load_bases
        from app.model.sampling import eager_step

        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            self.settings = Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        torch.set_num_threads(self.settings.torch_threads)
        if self.settings.cpu_malloc_keep and self.settings.torch_device == "cpu":  # as Engine.start
            keep_freed_memory()
        bases, skipped = load_bases(self.settings, Metrics(), model)
        if model not in bases:
            raise RuntimeError(f"base {model!r} not loaded: {skipped}")
        self.base = base = bases[model]
        if base.forward is not None:  # only the bucket the engine rounds use: compiling one takes ~a minute here
            base.forward.capture([base.forward.bucket_for(2 * batch)])
        # what Batcher builds for this base (app/engine/batcher.py)
        self.step = base.forward.step if base.forward is not None else \
            eager_step(base.model, base.patches.pool, dtype=self.settings.torch_dtype)

    def run(self, *, seconds: float, batch: int, steps: int, guidance: float, label: int,
            seed0: int) -> tuple[int, float, float, float, int]:
        """(image-steps, wall seconds, this thread's CPU seconds, its seconds waiting for a CPU, its minor page
        faults) of full batches of
        `batch` one-image jobs, sampled and decoded to uint8, until `seconds` have passed (with one torch thread all
        the work runs on this thread)."""
        from app.model.sampling import denoise_step, new_job
        from app.model.vae import to_uint8

        base = self.base
        start, (cpu, queued, faults, *_), k = time.perf_counter(), own_thread_times(), 0
        while k == 0 or time.perf_counter() - start < seconds:
            jobs = [new_job(base.model, y=label, seed=seed0 + k * batch + i, sampler="ddim", steps=steps,
                            guidance_scale=guidance, n=1, beta_schedule=base.beta_schedule,
                            clip_sample=base.clip_sample, device=self.settings.torch_device) for i in range(batch)]
            while not jobs[0].done:
                denoise_step(base.model, jobs, step=self.step)
            for job in jobs:
                to_uint8(base.vae.decode(job.latents))
            k += 1
        wall, (cpu1, queued1, faults1, *_) = time.perf_counter() - start, own_thread_times()
        return k * batch * steps, wall, cpu1 - cpu, queued1 - queued, faults1 - faults


def batch_counts(url: str, model: str) -> tuple[float, float]:
    """(steps run, images stepped) so far for `model`, from the server's dmp_batch_size histogram."""
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        for kind in ("count", "sum"):
            if line.startswith(f'dmp_batch_size_{kind}{{model="{model}"}}'):
                values[kind] = float(line.split()[-1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def task_times(task: Path) -> tuple[float, float, int, int, int]:
    """(seconds on a CPU, seconds runnable but waiting for one, minor page faults, voluntary and involuntary context
    switches) of one thread, from /proc (Linux): the second is what other processes and threads on the same cores
    take from it; the third counts pages the kernel mapped in for it (malloc handing freed memory back and taking it
    again shows here); a voluntary switch is the thread blocking (on the GIL, a lock, I/O), an involuntary one another
    thread taking its core."""
    on_cpu, waiting, _ = (task / "schedstat").read_text().split()
    minflt = (task / "stat").read_text().rpartition(")")[2].split()[7]
    status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
    return (int(on_cpu) / 1e9, int(waiting) / 1e9, int(minflt), int(status["voluntary_ctxt_switches"]),
            int(status["nonvoluntary_ctxt_switches"]))


def thread_times(pid: int | str) -> dict[int, tuple[float, float, int, int, int]]:
    """task_times of each thread of a process."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = task_times(task)
        except (OSError, ValueError, IndexError):  # the thread ended in between
            continue
    return out


def cpu_split(before: dict[int, tuple[float, float, int, int, int]],
              after: dict[int, tuple[float, float, int, int, int]]) -> tuple[float, float, float, int, int, int]:
    """(CPU seconds of the busiest thread: the runner, CPU seconds of all other threads, the runner's seconds
    waiting for a CPU, its minor page faults, its voluntary and involuntary context switches) between two
    readings."""
    used = sorted((tuple(a - b for a, b in zip(after[t], before.get(t, (0.0, 0.0, 0, 0, 0)), strict=True))
                   for t in after), reverse=True)
    return used[0][0], sum(u[0] for u in used[1:]), used[0][1], int(used[0][2]), int(used[0][3]), int(used[0][4])


def own_thread_times() -> tuple[float, float, int, int, int]:
    """task_times of the calling thread."""
    return task_times(Path("/proc/thread-self"))


WAITING = {"Condition.wait", "EpollSelector.select", "Event.wait", "Thread._wait_for_tstate_lock"}


def py_spy() -> str | None:
    """The py-spy binary (the `bench` extra), or None."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def attach_profiler(pid: int, raw: Path) -> subprocess.Popen:
    """py-spy sampling every thread of a running process (idle threads excluded) until SIGINT."""
    spy = py_spy()
    assert spy is not None, "checked by main() before any server starts"
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw",
                             "--rate", "50", "--threads", "--output", str(raw)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(raw: Path, n: int = 15) -> dict:
    """py-spy's collapsed stacks -> the most sampled functions (inclusive share of each thread group's samples),
    the runner thread (the engine) apart from every other thread (event loop, threadpool: the service's cost)."""
    per_group: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]  # function (file), lines merged
        if not frames or frames[-1].split(" (")[0] in WAITING:
            continue  # a thread blocked (py-spy cannot always tell idle threads from busy ones)
        group = "runner" if any(f.startswith("Batcher._loop") for f in frames) else "service"
        totals[group] += int(count)
        for f in set(frames):
            per_group[group][f] += int(count)
    return {g: {"samples": totals[g], "top": [(f, round(c / totals[g], 3)) for f, c in per_group[g].most_common(n)]}
            for g in per_group}


def run_mode(mode: str, args, models: Path, patches: Path, out_dir: Path) -> dict:
    env = server_env(models, patches, mode, args)
    body = {"model": args.model, "class_label": 3, "steps": args.steps, "sampler": "ddim",
            "guidance_scale": args.guidance, "num_images": 1}
    profile = out_dir / f"pyspy-{mode}.txt" if args.profile else None
    t0 = time.perf_counter()
    proc, url = start_server(env, out_dir / f"server-{mode}.log")
    print(f"[{mode}] server ready in {time.perf_counter() - t0:.0f}s", flush=True)
    t0 = time.perf_counter()
    engine = EngineAlone(env, args.model, args.batch)
    print(f"[{mode}] engine ready in {time.perf_counter() - t0:.0f}s", flush=True)
    rounds = []
    try:
        engine.run(seconds=0, batch=args.batch, steps=args.steps, guidance=args.guidance, label=3, seed0=10**6)
        for r in range(args.rounds):
            raw = profile.with_suffix(f".{r}.txt") if profile else None  # the server idles during engine rounds
            svc = service_round(url, body, args.model, args.clients, args.seconds, seed0=r * 10**7, pid=proc.pid,
                                spy_raw=raw)
            eng_steps, eng, eng_cpu, eng_queued, eng_faults = engine.run(
                seconds=args.seconds, batch=args.batch, steps=args.steps, guidance=args.guidance, label=3,
                seed0=r * 10**7)
            svc_rate, eng_rate = svc["image_steps"] / svc["wall_s"], eng_steps / eng
            requests = svc["image_steps"] / args.steps  # one-image requests' worth of work in the window
            server_cpu = svc["runner_cpu_s"] + svc["other_cpu_s"]
            rounds.append({"service_image_steps_per_s": svc_rate, "engine_image_steps_per_s": eng_rate,
                           "ratio": svc_rate / eng_rate, "load_avg_1m": os.getloadavg()[0],
                           # the server's CPU outside the runner thread (HTTP, validation, admission, encoding,
                           # metrics): in eager mode the runner needs the GIL between its small ops, so this
                           # time is taken from it; load on the machine does not change CPU time much
                           "server_cpu_ms_per_request_outside_runner": 1e3 * svc["other_cpu_s"] / requests,
                           "runner_cpu_s": svc["runner_cpu_s"], "service_wall_s": svc["wall_s"],
                           "service_image_steps": svc["image_steps"], "engine_image_steps": eng_steps,
                           "engine_cpu_s": eng_cpu, "engine_wall_s": eng,
                           # where the runner's wall time went: on a CPU, runnable but waiting for one (the
                           # clients and the server's other threads share the cores), and the rest (the GIL,
                           # locks, no work); the engine alone on the same split
                           "runner_on_cpu": svc["runner_cpu_s"] / svc["wall_s"],
                           "runner_waiting_for_cpu": svc["runner_queued_s"] / svc["wall_s"],
                           "engine_waiting_for_cpu": eng_queued / eng,
                           # pages the kernel mapped in per image-step: what malloc returned and took back
                           # (DMP_CPU_MALLOC_KEEP, app/engine/allocator.py)
                           "runner_faults_per_image_step": svc["runner_faults"] / max(svc["image_steps"], 1),
                           "engine_faults_per_image_step": eng_faults / max(eng_steps, 1),
                           # the runner's context switches per step: blocking (the GIL, a lock; the engine alone
                           # never does) and preempted (another thread took its core)
                           "runner_blocked_per_step": svc["runner_blocked"] / max(svc["steps"], 1),
                           "runner_preempted_per_step": svc["runner_preempted"] / max(svc["steps"], 1),
                           # the engine rounds step full batches; a partly filled step costs nearly as much in eager
                           "server_images_per_step": svc["image_steps"] / max(svc["steps"], 1),
                           # CPU seconds per image-step, engine over service (runner + every other server thread):
                           # what the wall ratio is on a machine with no other load, when the GIL serialises the
                           # server's other work with the runner (eager); load barely moves CPU time
                           "cpu_ratio": (eng_cpu / eng_steps) / (server_cpu / svc["image_steps"])})
            last = rounds[-1]
            print(f"[{mode}] round {r}: service {svc_rate:7.1f}  engine {eng_rate:7.1f} image-steps/s  "
                  f"ratio {last['ratio']:.3f}  server CPU outside the runner "
                  f"{last['server_cpu_ms_per_request_outside_runner']:.2f} ms/request  "
                  f"CPU-time ratio {last['cpu_ratio']:.3f}  images/step {last['server_images_per_step']:.2f}  "
                  f"runner on a CPU {last['runner_on_cpu']:.1%}, waiting for one {last['runner_waiting_for_cpu']:.1%} "
                  f"(engine alone {last['engine_waiting_for_cpu']:.1%})  page faults per image-step: runner "
                  f"{last['runner_faults_per_image_step']:.1f}, "
                  f"engine alone {last['engine_faults_per_image_step']:.1f}  runner context switches per step: "
                  f"blocked {last['runner_blocked_per_step']:.2f}, preempted {last['runner_preempted_per_step']:.2f}  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    svc_best = max(r["service_image_steps_per_s"] for r in rounds)
    eng_best = max(r["engine_image_steps_per_s"] for r in rounds)
    res = {"service_image_steps_per_s": svc_best, "engine_image_steps_per_s": eng_best,
           "server_cpu_ms_per_request_outside_runner": min(r["server_cpu_ms_per_request_outside_runner"]
                                                           for r in rounds),
           "ratio": svc_best / eng_best, "cpu_ratio": max(r["cpu_ratio"] for r in rounds), "rounds": rounds,
           "env": MODES[mode]}
    if profile is not None:
        with profile.open("w") as f:  # all rounds' samples in one file
            for r in range(args.rounds):
                part = profile.with_suffix(f".{r}.txt")
                f.write(part.read_text() if part.exists() else "")
        res["profile"] = top_frames(profile)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 10 s windows per side (a few minutes)")
    ap.add_argument("--model", default="mnist", help="a base in models/ (served alone)")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--clients", type=int, default=None, help="closed-loop clients (default 1.5x --batch)")
    ap.add_argument("--batch", type=int, default=16, help="DMP_MAX_BATCH")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=None, help="each round's window per side (10, --quick; 30)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--cpu-bind", action="store_true", help="DMP_CPU_BIND: the server's runner on its own core(s)")
    ap.add_argument("--malloc-defaults", action="store_true",
                    help="DMP_CPU_MALLOC_KEEP=false for the server and the engine alone: glibc's own thresholds")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy on the server during service rounds; top frames in the JSON")
    ap.add_argument("--out", default=None, help="write the JSON here (and the server logs / profiles next to it)")
    args = ap.parse_args(argv)
    args.clients = args.clients or args.batch * 3 // 2
    args.seconds = args.seconds or (10.0 if args.quick else 30.0)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if args.profile and py_spy() is None:  # found out before minutes of compiling, not after
        print("error: --profile needs py-spy: pip install -e '.[bench]'", file=sys.stderr)
        sys.exit(2)
    src = REPO / "models" / f"{args.model}.safetensors"
    if not src.exists():
        print(f"error: {src} not found", file=sys.stderr)
        sys.exit(2)
    models, patches = Path(tempfile.mkdtemp(prefix="bench-service-")), Path(tempfile.mkdtemp(prefix="bench-patches-"))
    (models / src.name).symlink_to(src)  # only this base: the others would load and warm for nothing
    out_dir = Path(args.out).parent if args.out else Path(tempfile.mkdtemp(prefix="bench-service-out-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"clients": args.clients, "batch": args.batch, "steps": args.steps, "guidance": args.guidance,
              "threads": args.threads, "cpu_bind": args.cpu_bind, "malloc_defaults": args.malloc_defaults,
              "seconds": args.seconds, "rounds": args.rounds,
              "cpus": os.cpu_count(),
              "load_avg_start": os.getloadavg(), "modes": {}}
    for mode in args.modes.split(","):
        result["modes"][mode] = run_mode(mode, args, models, patches, out_dir)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    result["load_avg_end"] = os.getloadavg()
    result["service_over_engine"] = min(m["ratio"] for m in result["modes"].values())
    for mode, m in result["modes"].items():
        print(f"{mode:9s} service {m['service_image_steps_per_s']:7.1f}  engine {m['engine_image_steps_per_s']:7.1f} "
              f"image-steps/s (best rounds)  ratio {m['ratio']:.3f}  rounds "
              + " ".join(f"{r['ratio']:.3f}" for r in m["rounds"]) + f"  CPU-time ratio {m['cpu_ratio']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "modes"}
                     | {"ratios": {k: m["ratio"] for k, m in result["modes"].items()},
                        "cpu_ratios": {k: m["cpu_ratio"] for k, m in result["modes"].items()}}))
    print(f"service_over_engine={result['service_over_engine']:.3f}")


if __name__ == "__main__":
    main()
