"""Helpers of the Batch API tests: JSONL input files, polling a batch, a real local webhook receiver."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai

FINAL = ("completed", "failed", "cancelled", "expired")
WEBHOOK_SECRET = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # base64 of 32 bytes


def line(custom_id: str, body: dict, url: str = "/v1/images/generations") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def run_batch(oai: openai.OpenAI, lines: list[dict], **kw):
    """Upload, create; the created batch."""
    file = oai.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return oai.batches.create(input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h",
                              **kw)


def wait_final(oai: openai.OpenAI, batch_id: str, timeout: float = 120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} still {batch.status}: {batch.request_counts}")


def content_lines(oai: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(x) for x in oai.files.content(file_id).text.splitlines()]


class Receiver:
    """A real HTTP server that records every webhook POST; the first `fail` of them are answered 500."""

    def __init__(self, fail: int = 0):
        self.received: list[tuple[bytes, dict]] = []
        self.fail = fail
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append((body, dict(self.headers)))
                status = 500 if len(receiver.received) <= receiver.fail else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, batch_id: str) -> list[tuple[bytes, dict]]:
        return [(b, h) for b, h in self.received if json.loads(b)["data"]["id"] == batch_id]

    def wait_for(self, batch_id: str, count: int = 1, timeout: float = 30) -> list[tuple[bytes, dict]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(self.events(batch_id)) < count:
            time.sleep(0.05)
        return self.events(batch_id)

    def close(self) -> None:
        self.server.shutdown()
