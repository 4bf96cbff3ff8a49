"""What the bench scripts share: running client threads together, waiting for a server they started."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import httpx


def run_together(threads: list[threading.Thread]) -> None:
    """Start every thread, then wait for all of them."""
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300.0, log: Path | None = None) -> None:
    """Poll `url`/health/ready until 200; raise if the server exits (with its log's tail) or is killed at `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited" + (f": {log.read_text()[-2000:]}" if log else ""))
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("server not ready")


def emit(result: dict, out: str | None) -> None:
    """The run's JSON: written to `out` when given, and printed as the last line."""
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
