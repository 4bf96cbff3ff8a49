"""The Batch API's state without Redis: files and batches on disk (one process), lines and webhook events not yet
delivered in in-process queues (an event not delivered when the process ends is not sent again).

Layout under DMP_BATCH_DIR: files/{id}.json + files/{id}.data, batches/{id}.json, answers/{batch}/{line}.json
(created exclusively: the first answer of a line wins), deliveries/{batch}.jsonl."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter, deque
from pathlib import Path

from app.batch.records import ACTIVE, now, outbox_item


class DiskStore:
    """Files, batches and per-line answers as files under `root`; a lock makes each update atomic. Webhook events
    of status changes go to `outbox` (the in-process queue the sender reads)."""

    def __init__(self, root: Path, ttl: int, outbox: MemoryQueue):
        self.root, self.ttl, self.outbox = root, ttl, outbox
        self._lock = threading.Lock()
        self._counts: dict[str, Counter] = {}  # batch -> answers by kind, read from disk on first use

    def _dir(self, *parts: str) -> Path:
        """A folder to write into (made on first use; reads never make one)."""
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        """Written whole or not at all (a reader never sees half a file)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    @staticmethod
    def _read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return None

    # ---------------------------------------------------------------- files

    def put_file(self, file: dict, owner: str, data: bytes) -> None:
        folder = self._dir("files")
        self._write(folder / f"{file['id']}.data", data)
        self._write(folder / f"{file['id']}.json", json.dumps({"file": file, "owner": owner}).encode())

    def get_file(self, file_id: str) -> tuple[dict, str] | None:
        record = self._read_json(self.root / "files" / f"{file_id}.json")
        if record is None or record["file"]["expires_at"] < now():
            return None
        return record["file"], record["owner"]

    def file_data(self, file_id: str) -> bytes | None:
        try:
            return (self.root / "files" / f"{file_id}.data").read_bytes()
        except FileNotFoundError:
            return None

    def files(self, owner: str) -> list[dict]:
        found = [self.get_file(p.stem) for p in (self.root / "files").glob("*.json")]
        return sorted((f for f, o in filter(None, found) if o == owner), key=lambda f: f["created_at"], reverse=True)

    def delete_file(self, file_id: str) -> None:
        for suffix in (".json", ".data"):
            (self.root / "files" / f"{file_id}{suffix}").unlink(missing_ok=True)

    # ---------------------------------------------------------------- batches

    def put_batch(self, batch: dict, owner: str) -> None:
        self._write(self._dir("batches") / f"{batch['id']}.json", json.dumps({"batch": batch, "owner": owner}).encode())

    def get_batch(self, batch_id: str) -> tuple[dict, str] | None:
        record = self._read_json(self.root / "batches" / f"{batch_id}.json")
        return None if record is None else (record["batch"], record["owner"])

    def batches(self, owner: str) -> list[dict]:
        found = [self.get_batch(p.stem) for p in (self.root / "batches").glob("*.json")]
        return sorted((b for b, o in filter(None, found) if o == owner), key=lambda b: b["created_at"], reverse=True)

    def update_batch(self, batch_id: str, allowed: tuple[str, ...], changes: dict,
                     event: dict | None = None) -> dict | None:
        """The batch with `changes` applied if its status is one of `allowed` (else None, nothing changed); then
        `event` (a webhook event) is queued for delivery."""
        with self._lock:
            found = self.get_batch(batch_id)
            if found is None or found[0]["status"] not in allowed:
                return None
            batch = found[0] | changes
            self.put_batch(batch, found[1])
        if event is not None:
            self.outbox.push([outbox_item(batch_id, event)])
        return batch

    # ---------------------------------------------------------------- answers

    def answer(self, batch_id: str, line: int, kind: str, record: dict | None) -> int | None:
        """Record a line's answer (kind completed, failed or skipped) unless it has one: the lines answered so far,
        or None when this line already was (a reclaimed line that its first replica finished)."""
        path = self._dir("answers", batch_id) / f"{line}.json"
        with self._lock:
            counts = self._counts_of(batch_id)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps({"kind": kind, "record": record}).encode())
            counts[kind] += 1
            return sum(counts.values())

    def answered(self, batch_id: str, line: int) -> bool:
        return (self.root / "answers" / batch_id / f"{line}.json").exists()

    def answers(self, batch_id: str) -> dict[int, dict]:
        folder = self.root / "answers" / batch_id
        return {int(p.stem): json.loads(p.read_bytes()) for p in folder.glob("*.json")}

    def counts(self, batch_id: str) -> Counter:
        with self._lock:
            return Counter(self._counts_of(batch_id))

    def _counts_of(self, batch_id: str) -> Counter:
        if batch_id not in self._counts:
            self._counts[batch_id] = Counter(a["kind"] for a in self.answers(batch_id).values())
        return self._counts[batch_id]

    # ---------------------------------------------------------------- webhook delivery log

    def log_delivery(self, batch_id: str, entry: dict) -> None:
        with self._lock, open(self._dir("deliveries") / f"{batch_id}.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def deliveries(self, batch_id: str) -> list[dict]:
        try:
            text = (self.root / "deliveries" / f"{batch_id}.jsonl").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines()]

    # ---------------------------------------------------------------- expiry

    def sweep(self) -> None:
        """Forget files past their expires_at and batches finished more than DMP_BATCH_TTL ago."""
        t = now()
        for meta in (self.root / "files").glob("*.json"):
            record = self._read_json(meta)
            if record is not None and record["file"]["expires_at"] < t:
                self.delete_file(meta.stem)
        for meta in (self.root / "batches").glob("*.json"):
            record = self._read_json(meta)
            if record is None:
                continue
            batch = record["batch"]
            ended = max(batch[k] or 0 for k in ("completed_at", "failed_at", "cancelled_at", "expired_at"))
            if batch["status"] not in ACTIVE and ended + self.ttl < t:
                meta.unlink(missing_ok=True)
                shutil.rmtree(self.root / "answers" / batch["id"], ignore_errors=True)
                (self.root / "deliveries" / f"{batch['id']}.jsonl").unlink(missing_ok=True)
                with self._lock:
                    self._counts.pop(batch["id"], None)

    def unfinished(self) -> list[dict]:
        """Batches a previous process left running (their unanswered lines are queued again at start)."""
        found = [self.get_batch(p.stem) for p in (self.root / "batches").glob("*.json")]
        return [b for b, _ in filter(None, found) if b["status"] in ACTIVE]


class MemoryQueue:
    """Items (lines, or webhook events) waiting and running in this process (a restart re-queues the lines from
    the DiskStore)."""

    def __init__(self) -> None:
        self._waiting: deque[tuple[float, dict]] = deque()
        self._running: dict[str, float] = {}  # token -> when its line was queued
        self._cond = threading.Condition()
        self._next = 0

    def push(self, items: list[dict]) -> None:
        with self._cond:
            self._waiting.extend((time.time(), item) for item in items)
            self._cond.notify_all()

    def take(self, count: int, wait: float) -> list[tuple[str, dict]]:
        with self._cond:
            if not self._waiting:
                self._cond.wait(wait)
            out: list[tuple[str, dict]] = []
            while self._waiting and len(out) < count:
                queued, item = self._waiting.popleft()
                self._next += 1
                token = str(self._next)
                self._running[token] = queued
                out.append((token, item))
            return out

    def ack(self, token: str) -> None:
        with self._cond:
            self._running.pop(token, None)

    def retry(self, token: str, item: dict) -> None:
        """Failed outside its work (a store error): back in the queue."""
        self.ack(token)
        self.push([item])

    def keep(self, tokens: list[str]) -> None:
        """Nothing to refresh: no other process could take these lines."""

    def reclaim(self, count: int) -> list[tuple[str, dict]]:
        return []  # one process: nothing is ever left by another

    def stats(self) -> tuple[int, int, float]:
        """(lines waiting, lines running, seconds since the oldest of them was queued)."""
        with self._cond:
            times = [t for t, _ in self._waiting] + list(self._running.values())
            return len(self._waiting), len(self._running), time.time() - min(times) if times else 0.0
