"""bench/service.py's readings: the profile split (runner thread vs the server's other threads) and the CPU split."""
from __future__ import annotations

import os

from bench.service import cpu_split, thread_cpu, top_frames

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
    before, after = {1: 1.0, 2: 0.5}, {1: 3.0, 2: 0.75, 3: 0.25}  # thread 3 started in between
    assert cpu_split(before, after) == (2.0, 0.5)
    assert os.getpid() in thread_cpu(os.getpid())
