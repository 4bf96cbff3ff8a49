"""Data-parallel trainer: time per optimiser step of 1 process vs 2 ranks under torchrun (gloo, CPU, 1 thread
each), same global batch, and how close the two runs' patches are.

    python -m bench.ddp_walltime [--rounds 3] [--steps 20] [--batch-size 32] [--out bench/results/NAME.json]

Each round runs both contenders back to back (1 process, then `torchrun --standalone --nproc_per_node 2`) on
the demo base models/mnist.safetensors with DMP patch training on MNIST. A worker builds its Trainer, runs 3
warm-up steps, then times `--steps` more between barriers (so the slowest rank counts); process start-up,
data loading and the held-out evaluation are not in the figure. On a shared machine load only adds time, so
the summary takes each contender's minimum over rounds and also lists every round with the load average and
the CPU time of the busiest rank (its own work, which load does not change) beside the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3


def worker(args) -> None:
    """One rank (or the single process): train, time the steps, rank 0 writes the timing and the prompts."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from app.trainer.train import TrainConfig, Trainer

    cfg = TrainConfig(method="dmp", dataset="mnist", base=str(REPO / "models" / "mnist.safetensors"),
                      out=str(Path(args.worker) / "unused.safetensors"), image_size=16,
                      batch_size=args.batch_size, steps=WARMUP + args.steps, device="cpu")
    trainer = Trainer(cfg, resume=False, progress=False)
    for _ in range(WARMUP):
        trainer.train_step()
    if trainer.dist.active:
        dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        trainer.train_step()
    cpu = torch.tensor([time.process_time() - cpu], dtype=torch.float64)  # this rank's own work, load-independent
    if trainer.dist.active:
        dist.barrier()
        dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
    seconds = time.perf_counter() - start
    if trainer.dist.main:
        save_file({"prompts": trainer.patch.prompts.detach().contiguous()}, str(Path(args.worker) / "prompts.st"))
        (Path(args.worker) / "timing.json").write_text(json.dumps(
            {"world_size": trainer.dist.world_size, "seconds": seconds, "cpu_seconds_busiest_rank": cpu.item(),
             "threads": torch.get_num_threads()}))
    if trainer.dist.active:
        dist.destroy_process_group()


def launch(world: int, args, folder: Path) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    me = [sys.executable, "-m", "bench.ddp_walltime", "--worker", str(folder), "--steps", str(args.steps),
          "--batch-size", str(args.batch_size)]
    cmd = me if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={world}", "-m", *me[2:]]
    load = os.getloadavg()[0]
    wall = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    result = json.loads((folder / "timing.json").read_text())
    return result | {"process_wall_seconds": round(time.perf_counter() - wall, 2), "load_avg_1min_before": load}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="JSON result file (default: print only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from safetensors.torch import load_file

    rounds, cosines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            one, two = Path(tmp, f"{r}-1"), Path(tmp, f"{r}-2")
            one.mkdir(), two.mkdir()
            rounds.append({"one": launch(1, args, one), "two": launch(2, args, two)})
            a, b = (load_file(str(f / "prompts.st"))["prompts"].flatten().double() for f in (one, two))
            cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
            print(json.dumps(rounds[-1]), file=sys.stderr)
    best1 = min(r["one"]["seconds"] for r in rounds)
    best2 = min(r["two"]["seconds"] for r in rounds)
    result = {
        "what": "DMP patch training step, demo MNIST base (DiT hidden 64, depth 6, 16x16, patch 2), "
                "CPU gloo, 1 thread per rank",
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
        "global_batch": args.batch_size, "timed_steps": args.steps, "warmup_steps": WARMUP,
        "seconds_per_step_1_process": round(best1 / args.steps, 4),
        "seconds_per_step_2_ranks": round(best2 / args.steps, 4),
        "ratio_2_ranks_over_1": round(best2 / best1, 3),
        "ratio_per_round": [round(r["two"]["seconds"] / r["one"]["seconds"], 3) for r in rounds],
        # CPU time of the busiest rank over the single process: the share of the work one rank does, which
        # machine load does not change (wall time under load does: the ranks then wait for a core).
        "cpu_ratio_per_round": [
            round(r["two"]["cpu_seconds_busiest_rank"] / r["one"]["cpu_seconds_busiest_rank"], 3) for r in rounds],
        "prompts_cosine_1_vs_2_ranks": cosines, "rounds": rounds,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
