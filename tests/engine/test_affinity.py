"""DMP_CPU_BIND on a real `python -m app serve`: the runner thread on its own core, every other thread of the server
(request threads started after it too) on the rest; without it, nothing is bound."""
from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from app.engine.affinity import bind_runner

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding needs two cores")


def thread_cores(pid: int) -> dict[int, set[int]]:
    """Thread id -> its allowed cores."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = os.sched_getaffinity(int(task.name))
        except ProcessLookupError:  # a thread that ended while listed
            pass
    return out


@pytest.mark.parametrize("bind", [True, False])
def test_runner_gets_its_own_core(start_server, class_only_dirs, bind):
    allowed = os.sched_getaffinity(0)
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"], torch_threads=1,
                          cpu_bind=str(bind).lower(), log_level="info")
    # request threads the server starts after the binding (sync routes run in a thread pool)
    for seed in range(3):
        assert httpx.post(server.url + "/generate", json={"class_label": 1, "steps": 5, "seed": seed},
                          timeout=60).status_code == 200
    cores = thread_cores(server.proc.pid)
    assert len(cores) >= 4, cores  # the runner, the main thread, the request threads
    bound = re.search(r"runner \(thread (\d+)\) bound to cores", server.log.read_text())
    if not bind:
        assert bound is None and all(c == allowed for c in cores.values()), cores
        return
    assert bound, server.log.read_text()[-2000:]
    runner = int(bound.group(1))
    assert cores.pop(runner) == {max(allowed)}, runner
    assert all(c == allowed - {max(allowed)} for c in cores.values()), cores


def test_binding_that_leaves_no_core_changes_nothing():
    before = os.sched_getaffinity(0)
    assert bind_runner(len(before)) is None and bind_runner(0) is None
    assert os.sched_getaffinity(0) == before
