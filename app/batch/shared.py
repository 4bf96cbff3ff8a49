"""The Batch API's state in Redis, shared by every replica: lines are entries of one Stream read by one consumer
group (XREADGROUP / XACK / XAUTOCLAIM), answers are written once per line (HSETNX in a script).

Keys (prefix dmp:batch:): file:{id} hash (meta, owner, data); files:{owner} and batches:{owner} sorted sets of ids
by creation; {id} the batch JSON with its owner; {id}:answers hash line -> answer; {id}:counts hash kind -> n;
{id}:deliveries list (newest first); lines the Stream, group `workers`; webhooks the Stream of webhook events
not yet delivered, group `senders` (one entry per event, added in the transaction that ends its batch)."""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import redis

from app.batch.records import WINDOW_SECONDS, outbox_item

P = "dmp:batch:"
STREAM, GROUP = P + "lines", "workers"
WEBHOOKS, SENDERS = P + "webhooks", "senders"
# the first answer of a line wins; its kind is counted in the same step (a replica killed between the two
# would otherwise leave the counts one short)
ANSWER = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return -1 end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
return redis.call('HLEN', KEYS[1])
"""


class RedisStore:
    """Files, batches, answers and delivery logs in Redis; every key expires (DMP_BATCH_TTL after its last use)."""

    def __init__(self, client: redis.Redis, ttl: int):
        self.r: Any = client  # replies are bytes (the client does not decode); redis-py types them as a union
        self.ttl = ttl
        self._answer = client.register_script(ANSWER)

    # ---------------------------------------------------------------- files

    def put_file(self, file: dict, owner: str, data: bytes) -> None:
        key = f"{P}file:{file['id']}"
        with self.r.pipeline() as p:
            p.hset(key, mapping={"meta": json.dumps(file), "owner": owner, "data": data})
            p.expireat(key, file["expires_at"])
            p.zadd(f"{P}files:{owner}", {file["id"]: file["created_at"]})
            p.expire(f"{P}files:{owner}", self.ttl + WINDOW_SECONDS)
            p.execute()

    def get_file(self, file_id: str) -> tuple[dict, str] | None:
        meta, owner = self.r.hmget(f"{P}file:{file_id}", ["meta", "owner"])
        return None if meta is None else (json.loads(meta), owner.decode())

    def file_data(self, file_id: str) -> bytes | None:
        return self.r.hget(f"{P}file:{file_id}", "data")

    def files(self, owner: str) -> list[dict]:
        ids = [i.decode() for i in self.r.zrevrange(f"{P}files:{owner}", 0, -1)]
        found = [self.get_file(i) for i in ids]
        gone = [i for i, f in zip(ids, found, strict=True) if f is None]
        if gone:
            self.r.zrem(f"{P}files:{owner}", *gone)  # expired
        return [f for f, _ in filter(None, found)]

    def delete_file(self, file_id: str) -> None:
        found = self.get_file(file_id)
        self.r.delete(f"{P}file:{file_id}")
        if found is not None:
            self.r.zrem(f"{P}files:{found[1]}", file_id)

    # ---------------------------------------------------------------- batches

    def _keys(self, batch_id: str) -> list[str]:
        return [f"{P}{batch_id}", f"{P}{batch_id}:answers", f"{P}{batch_id}:counts", f"{P}{batch_id}:deliveries"]

    def put_batch(self, batch: dict, owner: str) -> None:
        with self.r.pipeline() as p:
            p.set(f"{P}{batch['id']}", json.dumps({"batch": batch, "owner": owner}),
                  ex=WINDOW_SECONDS + self.ttl)
            p.zadd(f"{P}batches:{owner}", {batch["id"]: batch["created_at"]})
            p.expire(f"{P}batches:{owner}", WINDOW_SECONDS + self.ttl)
            p.execute()

    def get_batch(self, batch_id: str) -> tuple[dict, str] | None:
        raw = self.r.get(f"{P}{batch_id}")
        if raw is None:
            return None
        record = json.loads(raw)
        return record["batch"], record["owner"]

    def batches(self, owner: str) -> list[dict]:
        ids = [i.decode() for i in self.r.zrevrange(f"{P}batches:{owner}", 0, -1)]
        found = [self.get_batch(i) for i in ids]
        gone = [i for i, b in zip(ids, found, strict=True) if b is None]
        if gone:
            self.r.zrem(f"{P}batches:{owner}", *gone)
        return [b for b, _ in filter(None, found)]

    def update_batch(self, batch_id: str, allowed: tuple[str, ...], changes: dict,
                     event: dict | None = None) -> dict | None:
        """Compare-and-set on the status (WATCH/MULTI): the batch with `changes`, or None when its status is not
        one of `allowed`; a finished batch's keys then live DMP_BATCH_TTL more. `event`: a webhook event added to
        the webhooks Stream in the same transaction (a replica killed after the change cannot lose it)."""
        key = f"{P}{batch_id}"
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(key)
                    raw = p.get(key)
                    if raw is None:
                        return None
                    record = json.loads(raw)
                    if record["batch"]["status"] not in allowed:
                        return None
                    record["batch"] |= changes
                    p.multi()
                    p.set(key, json.dumps(record), keepttl=True)
                    if event is not None:
                        p.xadd(WEBHOOKS, outbox_item(batch_id, event))
                    if changes.get("status") in ("completed", "failed", "cancelled", "expired"):
                        for k in self._keys(batch_id):
                            p.expire(k, self.ttl)
                    p.execute()
                    return record["batch"]
                except redis.WatchError:
                    continue  # another replica changed it between WATCH and EXEC: read it again

    # ---------------------------------------------------------------- answers

    def answer(self, batch_id: str, line: int, kind: str, record: dict | None) -> int | None:
        _, answers, counts, _ = self._keys(batch_id)
        done = self._answer(keys=[answers, counts], args=[line, json.dumps({"kind": kind, "record": record}), kind])
        if done < 0:
            return None
        self.r.expire(answers, WINDOW_SECONDS + self.ttl)
        self.r.expire(counts, WINDOW_SECONDS + self.ttl)
        return int(done)

    def answered(self, batch_id: str, line: int) -> bool:
        return bool(self.r.hexists(f"{P}{batch_id}:answers", str(line)))

    def answers(self, batch_id: str) -> dict[int, dict]:
        return {int(k): json.loads(v) for k, v in self.r.hgetall(f"{P}{batch_id}:answers").items()}

    def counts(self, batch_id: str) -> Counter:
        return Counter({k.decode(): int(v) for k, v in self.r.hgetall(f"{P}{batch_id}:counts").items()})

    # ---------------------------------------------------------------- webhook delivery log

    def log_delivery(self, batch_id: str, entry: dict) -> None:
        key = f"{P}{batch_id}:deliveries"
        with self.r.pipeline() as p:
            p.lpush(key, json.dumps(entry))
            p.ltrim(key, 0, 99)
            p.expire(key, self.ttl)
            p.execute()

    def deliveries(self, batch_id: str) -> list[dict]:
        return [json.loads(e) for e in reversed(self.r.lrange(f"{P}{batch_id}:deliveries", 0, -1))]

    def sweep(self) -> None:
        """Nothing to do: every key carries its expiry."""

    def unfinished(self) -> list[dict]:
        return []  # the Stream keeps unacknowledged lines: nothing to re-queue at start


class StreamQueue:
    """Items (lines, or webhook events) as entries of one Redis Stream; this replica is one consumer of the group
    every replica reads."""

    def __init__(self, client: redis.Redis, blocking: redis.Redis, consumer: str, idle: float,
                 stream: str = STREAM, group: str = GROUP):
        self.r: Any = client  # as in RedisStore
        self.blocking: Any = blocking
        self.consumer, self.stream, self.group = consumer, stream, group
        self.idle_ms = int(idle * 1000)
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def push(self, items: list[dict]) -> None:
        with self.r.pipeline() as p:
            for item in items:
                p.xadd(self.stream, item)
            p.execute()

    def take(self, count: int, wait: float) -> list[tuple[str, dict]]:
        reply = self.blocking.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count,
                                         block=int(wait * 1000))
        return [(i.decode(), _text(f)) for _, entries in reply or [] for i, f in entries]

    def ack(self, token: str) -> None:
        """Done: acknowledged and deleted, so the Stream's length is the lines not yet answered."""
        with self.r.pipeline() as p:
            p.xack(self.stream, self.group, token)
            p.xdel(self.stream, token)
            p.execute()

    def retry(self, token: str, item: dict) -> None:
        """Failed outside its work (a store error): left pending, reclaimed after the idle time (by any replica)."""

    def keep(self, tokens: list[str]) -> None:
        """Still working on these: their idle time restarts, so no other replica reclaims them."""
        if tokens:
            self.r.xclaim(self.stream, self.group, self.consumer, 0, tokens, justid=True)

    def reclaim(self, count: int) -> list[tuple[str, dict]]:
        """Items a silent replica (killed, or cut off) held longer than DMP_BATCH_RECLAIM_IDLE, now this one's."""
        _, entries, _ = self.r.xautoclaim(self.stream, self.group, self.consumer, self.idle_ms, "0-0", count=count)
        return [(i.decode(), _text(f)) for i, f in entries if f]  # f is empty for an entry deleted meanwhile

    def stats(self) -> tuple[int, int, float]:
        with self.r.pipeline() as p:
            p.xlen(self.stream)
            p.xpending(self.stream, self.group)
            p.xrange(self.stream, count=1)
            length, pending, first = p.execute()
        running = pending["pending"]
        age = time.time() - int(first[0][0].split(b"-")[0]) / 1000 if first else 0.0
        return max(0, length - running), running, age


def _text(fields: dict) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}
