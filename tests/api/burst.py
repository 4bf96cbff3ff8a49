"""Send requests in parallel from a process of its own (so a test's probe timings share no GIL with the load).

    python tests/api/burst.py URL REQUESTS.json THREADS   # prints the status codes, in order, as JSON

REQUESTS.json: [{"method", "path", "json"?, "content_file"?, "headers"?}, ...]
"""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def send(url: str, req: dict) -> int:
    content = Path(req["content_file"]).read_bytes() if "content_file" in req else None
    return httpx.request(req["method"], url + req["path"], json=req.get("json"), content=content,
                         headers=req.get("headers"), timeout=300).status_code


if __name__ == "__main__":
    url, requests, threads = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), int(sys.argv[3])
    with ThreadPoolExecutor(threads) as pool:
        print(json.dumps(list(pool.map(lambda r: send(url, r), requests))))
