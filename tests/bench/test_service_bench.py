"""bench/service.py's readings: the profile split (runner thread vs the server's other threads) and the CPU split."""
from __future__ import annotations

import os
import threading
import time

from bench.service import cpu_split, own_thread_times, thread_times, top_frames

RUNNER = "Thread._bootstrap (threading.py:1002);Batcher._loop (app/engine/batcher.py:80);denoise_step (s.py:{})"
LOOP = "Server.run (uvicorn/server.py:86);generate (app/api/generate.py:{})"


def test_top_frames_splits_runner_from_service_and_drops_waits(tmp_path):
    raw = tmp_path / "spy.txt"
    raw.write_text("\n".join([
        f"thread (1);{RUNNER.format(10)} 30",
        f"thread (1);{RUNNER.format(11)} 10",  # the same function on another line: merged
        f"thread (2);{LOOP.format(40)} 6",
        "thread (3);WorkerThread.run (anyio/_backends/_asyncio.py:9);Condition.wait (threading.py:320) 50",  # idle
    ]) + "\n")
    got = top_frames(raw)
    assert got["runner"]["samples"] == 40 and got["service"]["samples"] == 6
    assert ("denoise_step (s.py)", 1.0) in got["runner"]["top"]
    assert ("generate (app/api/generate.py)", 1.0) in got["service"]["top"]


def test_cpu_split_takes_the_busiest_thread_as_the_runner():
    before = {1: (1.0, 0.25, 100, 10, 1), 2: (0.5, 0.0, 7, 4, 0)}
    after = {1: (3.0, 0.5, 160, 25, 3), 2: (0.75, 1.0, 9, 5, 2), 3: (0.25, 0.0, 3, 1, 0)}  # thread 3 started between
    assert cpu_split(before, after) == (2.0, 0.5, 0.25, 60, 15, 2)


def test_thread_times_read_the_scheduler_accounts():
    """Seconds on a CPU grow with work, page faults with fresh memory touched and voluntary context switches with
    blocking; this thread's own reading is its entry in the process's table."""
    ours = thread_times(os.getpid())
    mine = own_thread_times()
    sum(i * i for i in range(300_000))
    fresh = bytearray(64 * 1024 * 1024)  # above glibc's mmap threshold: new zero pages, faulted in when written
    fresh[::4096] = b"x" * len(fresh[::4096])
    for _ in range(3):
        time.sleep(0.001)  # blocks: a voluntary switch each
    later = own_thread_times()
    assert later[0] > mine[0] and later[1] >= mine[1] >= 0
    assert later[3] - mine[3] >= 3 and later[4] >= mine[4] >= 0
    assert later[2] - mine[2] >= 32  # 64 MiB: 16,384 faults of 4 KiB pages, or 32 of 2 MiB with transparent huge pages
    assert threading.get_native_id() in ours and ours[threading.get_native_id()][0] <= mine[0]


def test_the_bench_measures_a_steady_window_and_prints_the_contract_line(tmp_path, capsys):
    """A tiny real run (server + engine, eager): every round counts the window's image-steps, never more per step
    than the batch holds, and the last line is `service_over_engine=R` (DESIGN.md §4c)."""
    import json

    from bench.service import main

    out = tmp_path / "svc.json"
    main(["--quick", "--modes", "eager", "--rounds", "1", "--seconds", "1", "--steps", "2", "--batch", "2",
          "--out", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(out.read_text())
    (r,) = res["modes"]["eager"]["rounds"]
    assert res["clients"] == 3  # 1.5x the batch
    assert r["service_image_steps"] > 0 and r["engine_image_steps"] % (2 * 2) == 0  # full batches of 2 x 2 steps
    assert 0 < r["server_images_per_step"] <= 2
    assert 0 < r["runner_on_cpu"] <= 1.05 and 0 <= r["runner_waiting_for_cpu"] <= 1 and r["engine_waiting_for_cpu"] >= 0
    assert r["runner_faults_per_image_step"] >= 0 and r["engine_faults_per_image_step"] >= 0
    assert res["malloc_defaults"] is False
    assert last == f"service_over_engine={res['service_over_engine']:.3f}" and res["service_over_engine"] > 0
