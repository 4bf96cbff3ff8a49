"""A real `python -m app serve` subprocess: overload (429 + Retry-After), client disconnect, drain on SIGTERM."""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import poll

SLOW = {"class_label": 1, "steps": 400, "seed": 1}  # ~a second on the tiny model
SLOWER = {"class_label": 1, "steps": 1000, "num_images": 8, "guidance_scale": 2.0, "seed": 1}  # 16 rows x 1000
HEAVY_LIMITS = {"max_images": 64, "max_cost": 64_000}  # lets the drain tests hold work that outlasts a fast machine


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_overload_gives_429_with_retry_after(start_server, class_only_dirs):
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"], max_queue=2,
                          max_batch=1)
    with ThreadPoolExecutor(8) as pool:
        # 8 at once against a queue of 2: the 2 admitted share each step (fairness), so keep them short
        replies = list(pool.map(lambda _: httpx.post(server.url + "/generate", json=SLOW | {"steps": 150},
                                                     timeout=300), range(8)))
    codes = sorted(r.status_code for r in replies)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    for r in replies:
        if r.status_code == 429:
            assert r.json()["error_type"] == "overloaded" and int(r.headers["Retry-After"]) >= 1


def test_disconnected_client_work_is_dropped(start_server, class_only_dirs):
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"])
    try:
        httpx.post(server.url + "/generate", json=SLOWER, timeout=0.5)
    except httpx.TimeoutException:
        pass
    end = time.monotonic() + 10
    while metric(server.url, 'dmp_requests_dropped_total{reason="disconnected"}') < 1:
        assert time.monotonic() < end, "the runner kept working for a client that left"
        time.sleep(0.1)
    assert metric(server.url, "dmp_inflight") == 0


def in_flight(server, body: dict) -> tuple[threading.Thread, list[httpx.Response]]:
    """POST `body` from a thread; returns once the server counts it in flight (the reply lands in the list)."""
    reply: list[httpx.Response] = []
    t = threading.Thread(target=lambda: reply.append(httpx.post(server.url + "/generate", json=body, timeout=300)))
    t.start()
    assert poll(lambda: metric(server.url, "dmp_inflight") >= 1 or not t.is_alive(), timeout=60), "never in flight"
    assert t.is_alive(), f"answered before it was seen in flight: {[(r.status_code, r.text[:300]) for r in reply]}"
    return t, reply


def test_sigterm_drains(start_server, class_only_dirs):
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"],
                          drain_seconds=300, request_timeout=600, **HEAVY_LIMITS)
    # 4x SLOWER's work (~5 s on an idle 2-core box, where SLOWER itself took 1.2 s and 200 steps ended before the late
    # request below, the drained server gone); the long drain covers a starved CPU.
    t, slow = in_flight(server, SLOWER | {"num_images": 32})
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = httpx.post(server.url + "/generate", json=SLOW | {"steps": 2}, timeout=10)
    assert late.status_code == 503 and late.json()["error_type"] == "draining"
    ready = httpx.get(server.url + "/health/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["error_type"] == "draining"
    t.join(300)
    assert slow and slow[0].status_code == 200, "the in-flight request was not finished"
    assert server.proc.wait(30) == 0


def test_drain_overrun_gets_json_503_and_exits_on_time(start_server, class_only_dirs):
    """Requests still running when DMP_DRAIN_SECONDS ends get the planned JSON 503 shutting_down (not a cancelled
    task's plain-text 500), and the process exits within the drain time + 1 s."""
    drain = 2.0
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"],
                          drain_seconds=drain, request_timeout=600, **HEAVY_LIMITS)
    t, slow = in_flight(server, SLOWER | {"num_images": 64})  # ~10 s idle: always past the 2 s drain
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(30)
    took = time.monotonic() - sent
    t.join(30)
    assert slow and slow[0].status_code == 503, slow and slow[0].text
    assert slow[0].json()["error_type"] == "shutting_down"
    assert code == 0 and took < drain + 1.0, took
