"""Fairness: batch rows are shared between requests at every step, and one request's work is capped."""
from __future__ import annotations

import threading
import time

import httpx
from conftest import asgi_client, copy_dirs, poll, wait_ready
from test_server import SLOWER, metric


def test_small_request_finishes_before_big_ones_admitted_before_it(start_server, class_only_dirs):
    """Two 1000-step x 8-image requests fill DMP_MAX_BATCH=16; a 5-step request sent after them must finish while
    both are still running (FIFO admission made it wait for one of them to end)."""
    # a deadline no load reaches: this is about sharing rows, not about admission refusing what cannot finish
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"], max_batch=16,
                          request_timeout=3600)
    big: list[httpx.Response] = []

    def post_big():
        try:
            big.append(httpx.post(server.url + "/generate", json=SLOWER, timeout=300))
        except httpx.HTTPError:  # the server is stopped at the end of the test
            pass

    threads = [threading.Thread(target=post_big, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    seen: list[tuple[float, float]] = []

    def both_stepping() -> bool:
        seen.append((metric(server.url, "dmp_inflight"), metric(server.url, "dmp_queue_depth")))
        return seen[-1] == (2, 0)

    # bounded: a request refused or finished before it was seen must fail here, not hang the suite
    assert poll(both_stepping, timeout=60, every=0.02), \
        f"(in flight, waiting) seen: {seen[:3]} ... {seen[-3:]}; " \
        f"big replies: {[(r.status_code, r.text[:200]) for r in big]}; server log: {server.log.read_text()[-2000:]}"
    time.sleep(0.2)  # both are stepping now
    started = time.monotonic()
    small = httpx.post(server.url + "/generate", json={"class_label": 2, "steps": 5, "seed": 3}, timeout=300)
    took = time.monotonic() - started
    assert small.status_code == 200, small.text
    assert not big and all(t.is_alive() for t in threads), f"a big request finished first ({took:.2f} s)"


def test_cost_cap_names_the_setting(class_only_dirs, tmp_path):
    with asgi_client(copy_dirs(class_only_dirs, tmp_path), max_cost=100, warmup=False) as c:
        wait_ready(c)
        r = c.post("/generate", json={"class_label": 1, "steps": 26, "num_images": 4})
        assert r.status_code == 422 and r.json()["error_type"] == "cost_too_high"
        assert "DMP_MAX_COST=100" in r.json()["error"]
        assert c.post("/generate", json={"class_label": 1, "steps": 25, "num_images": 4}).status_code == 200
