"""CPU binding (DMP_CPU_BIND): the runner thread on cores of its own, the server's other threads on the rest, so
request handling never preempts or cools the caches of the thread that steps the batch (vLLM's CPU backend binds
its workers' threads the same way)."""
from __future__ import annotations

import os
import threading


def bind_runner(threads: int) -> tuple[set[int], set[int]] | None:
    """Pin the calling thread to the last `threads` cores this process may use and every other thread of the process
    to the rest -> (runner cores, other cores); None, changing nothing, when that would leave the rest no core.

    Threads started later inherit their starter's cores: torch's intra-op threads of the calling thread (OpenMP keeps
    a team per thread that starts a parallel region) its cores, the server's new request threads the others."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads <= 0 or threads >= len(allowed):
        return None
    runner, rest = set(allowed[-threads:]), set(allowed[:-threads])
    me = threading.get_native_id()
    for tid in (int(t) for t in os.listdir("/proc/self/task")):
        if tid != me:
            try:
                os.sched_setaffinity(tid, rest)
            except (ProcessLookupError, PermissionError):  # ended meanwhile, or not ours to move
                pass
    os.sched_setaffinity(0, runner)  # 0: the calling thread only (Linux affinity is per thread)
    return runner, rest
