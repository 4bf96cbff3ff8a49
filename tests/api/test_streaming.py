"""POST /generate with Accept: text/event-stream: queued, progress (previews where asked), done; cancel on leave."""
from __future__ import annotations

import base64
import io
import json
import time

import httpx
from PIL import Image

from tests.api.test_server import SLOWER, metric

EVENTS = {"Accept": "text/event-stream"}


def read_events(lines) -> list[tuple[str, dict]]:
    """(event, data) pairs of a Server-Sent Events body."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
            name = None
    return events


def stream(client, body) -> list[tuple[str, dict]]:
    with client.stream("POST", "/generate", json=body, headers=EVENTS) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return read_events(r.iter_lines())


def test_event_sequence_and_previews(client):
    body = {"model": "digits", "class_label": 3, "steps": 8, "seed": 4, "num_images": 2, "previews": 3}
    events = stream(client, body)
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and set(kinds[1:-1]) == {"progress"}, kinds
    assert isinstance(events[0][1]["position"], int) and events[0][1]["position"] >= 0
    progress = [d for k, d in events if k == "progress"]
    steps = [p["step"] for p in progress]  # plain steps may fold into a later one when the reader lags
    assert steps == sorted(set(steps)) and steps[-1] == 8 and {p["of"] for p in progress} == {8}
    with_preview = [p["step"] for p in progress if "preview" in p]
    assert with_preview == [2, 4, 6]  # evenly spaced, before the last step, never folded
    for p in progress:
        if "preview" in p:
            assert len(p["preview"]) == 2
            assert Image.open(io.BytesIO(base64.b64decode(p["preview"][0]))).size == (8, 8)
    done = events[-1][1]
    plain = client.post("/generate", json={k: v for k, v in body.items() if k != "previews"}).json()
    assert done["images"] == plain["images"]  # streaming (and previews) do not change the pixels
    assert done["seed"] == 4 and done["model"] == "digits"


def test_no_previews_unless_asked(client):
    events = stream(client, {"model": "blobs", "steps": 4, "seed": 1})
    assert [k for k, _ in events][-2:] == ["progress", "done"] and events[-2][1] == {"step": 4, "of": 4}
    assert not any("preview" in d for _, d in events)


def test_errors_before_streaming_are_plain_json(client):
    r = client.post("/generate", json={"model": "digits", "caption": "x"}, headers=EVENTS)
    assert r.status_code == 422 and r.json()["error_type"] == "invalid_request"
    r = client.post("/generate", json={"model": "digits", "class_label": 1, "previews": 99}, headers=EVENTS)
    assert r.status_code == 422


def test_leaving_mid_stream_cancels_the_work(start_server, class_only_dirs):
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"])
    with httpx.stream("POST", server.url + "/generate", json=SLOWER, headers=EVENTS, timeout=30) as r:
        seen = []
        for line in r.iter_lines():
            seen.append(line)
            if line.startswith("event: progress"):
                break  # one step seen: leave
    assert any(line == "event: queued" for line in seen)
    end = time.monotonic() + 10
    while metric(server.url, 'dmp_requests_dropped_total{reason="disconnected"}') < 1:
        assert time.monotonic() < end, "the runner kept working for a client that left"
        time.sleep(0.1)
    assert metric(server.url, "dmp_inflight") == 0
