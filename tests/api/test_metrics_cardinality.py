"""/metrics stays bounded whatever unauthenticated clients send (issue 25 item 9): made-up methods, paths, keys."""
from __future__ import annotations

import hashlib

from conftest import asgi_client, wait_ready
from prometheus_client.parser import text_string_to_metric_families


def series_count(text: str) -> int:
    return sum(1 for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("dmp_"))


def test_made_up_requests_add_no_series(class_only_dirs):
    keys = "ann:sha256:" + hashlib.sha256(b"sk-ann-0123456789").hexdigest()
    scrape = {"Authorization": "Bearer metrics-token-0123456789"}  # with keys on, /metrics takes a token
    with asgi_client(class_only_dirs, api_keys=keys, metrics_token=scrape["Authorization"][7:]) as client:
        wait_ready(client)

        def noise(i: int) -> None:
            client.request(f"M{i}", "/generate")
            client.get(f"/nowhere/{i}")
            client.post("/generate", json={}, headers={"Authorization": f"Bearer sk-guess-{i}"})
            client.get("/v1/models", headers={"Authorization": f"Bearer sk-guess-{i}"})

        noise(0)
        client.get("/metrics", headers=scrape)  # its own series exist from here on
        before = series_count(client.get("/metrics", headers=scrape).text)
        for i in range(1, 40):
            noise(i)
        text = client.get("/metrics", headers=scrape).text
        assert series_count(text) == before, [line for line in text.splitlines() if "M3" in line][:3]
        assert 'method="other"' in text and "sk-guess" not in text
