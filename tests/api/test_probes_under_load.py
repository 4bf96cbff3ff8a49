"""Probes under load (real uvicorn): admission before caption encoding, and no probe waits on Redis or a lock."""
from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, make_patch_bytes

PROBE_LIMIT_S = 0.1


def probe_times(url: str, stop: threading.Event) -> dict[str, list[float]]:
    """Latency of /health/live and /health/ready, alternately, until `stop` (probe statuses ignored)."""
    times = {"live": [], "ready": []}
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            for kind in times:
                t0 = time.perf_counter()
                c.get(f"{url}/health/{kind}")
                times[kind].append(time.perf_counter() - t0)
            time.sleep(0.02)
    return times


def under_load(url: str, requests: list[dict], threads: int, tmp_path) -> tuple[dict[str, list[float]], list]:
    """Probe latencies while tests/api/burst.py sends `requests` (in its own process); and their status codes."""
    spec = tmp_path / "requests.json"
    spec.write_text(json.dumps(requests))
    stop, out = threading.Event(), {}
    idle_stop = threading.Event()
    threading.Timer(5, idle_stop.set).start()
    idle = probe_times(url, idle_stop)  # the baseline: the same probes of the idle server, on this machine now
    for kind, t in idle.items():
        print(f"idle {kind}: n={len(t)} median={1000 * statistics.median(t):.1f} ms max={1000 * max(t):.1f} ms "
              f"over {1000 * PROBE_LIMIT_S:.0f} ms: {sum(x > PROBE_LIMIT_S for x in t)}")
    prober = threading.Thread(target=lambda: out.update(probe_times(url, stop)))
    load = subprocess.Popen([sys.executable, str(Path(__file__).with_name("burst.py")), url, str(spec), str(threads)],
                            stdout=subprocess.PIPE)
    prober.start()
    try:
        codes = json.loads(load.communicate(timeout=600)[0])
    finally:
        stop.set()
        prober.join()
    for kind, t in out.items():
        print(f"{kind}: n={len(t)} median={1000 * statistics.median(t):.1f} ms max={1000 * max(t):.1f} ms "
              f"over {1000 * PROBE_LIMIT_S:.0f} ms: {sum(x > PROBE_LIMIT_S for x in t)}")
    return out, codes


def assert_fast(times: dict[str, list[float]]) -> None:
    """Three probes in four under PROBE_LIMIT_S. Before the fix every probe waited seconds (a sync /health/live
    queued for the thread pool behind caption encodings; the registry lock held by writes to a hung Redis). Not
    all of them: on this 2-core machine at load ~18, the event loop's share of the CPU is small, and 50 requests
    arriving at once queue ahead of a probe (the idle baseline printed above has no probe over the limit)."""
    for kind, t in times.items():
        assert sorted(t)[int(0.75 * len(t))] < PROBE_LIMIT_S, (kind, sorted(t))


def test_200_caption_requests_at_max_queue_8(start_server, tiny_dirs, tmp_path):
    server = start_server(model_dir=tiny_dirs["models"], patch_dir=tiny_dirs["patches"], max_queue=8)
    body = {"model": "captions", "caption": "a small grey cat " * 50, "steps": 50, "num_images": 4}
    times, codes = under_load(server.url, [{"method": "POST", "path": "/generate", "json": body}] * 200, 50, tmp_path)
    assert set(codes) <= {200, 429} and codes.count(429) >= 150, codes  # refused before encoding the caption
    assert_fast(times)


@pytest.mark.redis
def test_hung_redis_with_admin_puts_waiting(start_server, redis_server, class_only_dirs, tmp_path):
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"],
                          redis_url=redis_server.url, admin_token=ADMIN_TOKEN, redis_timeout=1.0)
    digits = class_only_dirs["bases"]["digits"]
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/octet-stream"}
    requests = []
    for i in range(8):
        (tmp_path / f"p{i}").write_bytes(make_patch_bytes(digits, "digits", seed=i))
        requests.append({"method": "PUT", "path": f"/patches/p{i}", "content_file": str(tmp_path / f"p{i}"),
                         "headers": auth})
    requests += [{"method": "POST", "path": "/generate",
                  "json": {"patch": "digits-dmp", "class_label": 1, "steps": 2}}] * 16
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        times, codes = under_load(server.url, requests, 16, tmp_path)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert set(codes[:8]) == {503} and set(codes[8:]) == {200}, codes  # installed patches keep serving
    assert_fast(times)
