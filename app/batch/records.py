"""Batch API objects in OpenAI's shapes (openai.types.Batch, FileObject, the output/error line) and input checks."""
from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass

ENDPOINT = "/v1/images/generations"  # the one endpoint a batch may name
WINDOW = "24h"  # OpenAI's only completion_window
WINDOW_SECONDS = 24 * 3600
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")  # not yet in a final state
FINAL_EVENTS = {"completed": "batch.completed", "failed": "batch.failed", "cancelled": "batch.cancelled",
                "expired": "batch.expired"}


class InputError(ValueError):
    """A batch input file line that does not parse or does not name the endpoint (line is 1-based)."""

    def __init__(self, message: str, line: int | None = None, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.message, self.line, self.code, self.param = message, line, code, param


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def well_formed(prefix: str, value: str) -> bool:
    """An id this service could have made (so no other string ever reaches a file name or a Redis key)."""
    return re.fullmatch(re.escape(prefix) + "[0-9a-f]{24}", value) is not None


def now() -> int:
    return int(time.time())


def file_object(file_id: str, size: int, filename: str, purpose: str, ttl: int) -> dict:
    created = now()
    return {"id": file_id, "object": "file", "bytes": size, "created_at": created, "filename": filename,
            "purpose": purpose, "status": "processed", "expires_at": created + ttl, "status_details": None}


def batch_object(batch_id: str, input_file_id: str, metadata: dict | None) -> dict:
    created = now()
    return {"id": batch_id, "object": "batch", "endpoint": ENDPOINT, "errors": None, "input_file_id": input_file_id,
            "completion_window": WINDOW, "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": created, "in_progress_at": None, "expires_at": created + WINDOW_SECONDS,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None, "model": None, "metadata": metadata,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}}


def check_jsonl(data: bytes) -> int:
    """The number of request lines of an upload; raises InputError at the first line that is not a JSON object."""
    count = 0
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("the file is not UTF-8 text", code="invalid_file") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"line {number} is not JSON: {e.msg}", number, "invalid_json") from None
        if not isinstance(item, dict):
            raise InputError(f"line {number} is not a JSON object", number, "invalid_json")
        count += 1
    if count == 0:
        raise InputError("the file has no request lines", code="empty_file")
    return count


@dataclass(frozen=True)
class Line:
    """One request of a batch: its 0-based index in the file, custom_id and /v1/images/generations body."""

    index: int
    custom_id: str
    body: dict

    def item(self, batch_id: str) -> dict[str, str]:
        """The work item queued for a replica (everything it needs, so no replica re-reads the input file)."""
        return {"batch": batch_id, "line": str(self.index), "custom_id": self.custom_id,
                "body": json.dumps(self.body, separators=(",", ":"))}


def parse_lines(data: bytes, max_lines: int) -> list[Line]:
    """The batch's requests; InputError names the first bad line (OpenAI fails the whole batch for it)."""
    lines: list[Line] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.decode("utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        item = json.loads(raw)  # check_jsonl passed this file at upload
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
            raise InputError(f"line {number}: custom_id must be a string of 1-512 characters", number,
                             "missing_custom_id", "custom_id")
        if custom_id in seen:
            raise InputError(f"line {number}: custom_id {custom_id!r} is used twice", number, "duplicate_custom_id",
                             "custom_id")
        if item.get("method") != "POST":
            raise InputError(f"line {number}: method must be POST", number, "invalid_method", "method")
        if item.get("url") != ENDPOINT:
            raise InputError(f"line {number}: url must be {ENDPOINT}, the batch's endpoint", number,
                             "invalid_url", "url")
        if not isinstance(item.get("body"), dict):
            raise InputError(f"line {number}: body must be a JSON object", number, "invalid_body", "body")
        seen.add(custom_id)
        lines.append(Line(len(lines), custom_id, item["body"]))
    if len(lines) > max_lines:
        raise InputError(f"the file has {len(lines)} requests; at most {max_lines} (DMP_BATCH_MAX_LINES)",
                         code="too_many_requests")
    return lines


def answer_line(custom_id: str, status: int, body: dict) -> dict:
    """An output or error file line: the HTTP answer the request would have had."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": new_id("req_"), "body": body}, "error": None}


def expired_line(custom_id: str) -> dict:
    """An error file line for a request the batch's window closed on before it ran."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
            "error": {"code": "batch_expired", "message": "the batch expired before this request ran"}}


def event(kind: str, batch_id: str) -> dict:
    """A webhook event (openai.types.webhooks.Batch*WebhookEvent)."""
    return {"id": new_id("evt_"), "object": "event", "created_at": now(), "type": kind, "data": {"id": batch_id}}


def outbox_item(batch_id: str, event: dict) -> dict[str, str]:
    """A webhook event as a queue item (a Stream entry's fields): its batch and its JSON, the body it is sent as."""
    return {"batch": batch_id, "event": json.dumps(event, separators=(",", ":"))}
