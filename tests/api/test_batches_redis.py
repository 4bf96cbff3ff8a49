"""The Batch API across replicas: lines in one Redis Stream read by a consumer group; a replica SIGKILLed mid-batch
loses nothing (its pending lines are reclaimed by the other) and every line is answered exactly once; a webhook
event whose sending replica is SIGKILLed is delivered by the other one."""
from __future__ import annotations

import os
import time

import httpx
import openai
import redis

from tests.api.batch_helpers import WEBHOOK_SECRET, Receiver, content_lines, line, run_batch, wait_final
from tests.conftest import poll

STEPS = 150  # a few tenths of a second a line on a shared CPU: the kill lands mid-batch


def replica(start_server, dirs, redis_server, receiver, **extra):
    return start_server(model_dir=dirs["models"], patch_dir=dirs["patches"], redis_url=redis_server.url,
                        torch_threads=1, warmup="false", batch_inflight=2, batch_reclaim_idle=2,
                        webhook_url=receiver.url, webhook_secret=WEBHOOK_SECRET, **extra)


def test_a_replica_killed_mid_batch_loses_no_line(start_server, class_only_dirs, redis_server):
    receiver = Receiver()
    a = replica(start_server, class_only_dirs, redis_server, receiver)
    b = replica(start_server, class_only_dirs, redis_server, receiver)
    oai_a, oai_b = (openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120,
                                  webhook_secret=WEBHOOK_SECRET) for s in (a, b))
    r = redis.Redis.from_url(redis_server.url)
    bodies = {f"r{i}": {"model": "digits", "prompt": str(i % 10), "seed": 100 + i, "steps": STEPS} for i in range(20)}
    t0 = time.monotonic()
    batch = run_batch(oai_a, [line(k, v) for k, v in bodies.items()])
    assert oai_b.batches.retrieve(batch.id).id == batch.id  # the other replica sees the same batch
    consumer_a = f"{os.uname().nodename}-{a.proc.pid}"
    held = []
    while time.monotonic() - t0 < 120:  # kill A while it holds lines (and some lines are already answered)
        counts = oai_b.batches.retrieve(batch.id).request_counts
        held = [c for c in r.xinfo_consumers("dmp:batch:lines", "workers")
                if c["name"].decode() == consumer_a and c["pending"] > 0]
        if counts.completed >= 4 and held:
            break
        time.sleep(0.02)
    assert held, "replica A never held a line"
    t_kill, done_at_kill, held_at_kill = time.monotonic(), counts.completed, held[0]["pending"]
    a.stop()  # SIGKILL: no drain, no acknowledgement
    final = wait_final(oai_b, batch.id, timeout=300)
    t_done = time.monotonic()
    assert final.status == "completed"
    assert (final.request_counts.completed, final.request_counts.failed) == (20, 0)
    out = content_lines(oai_b, final.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(bodies)  # each line exactly once
    assert not [c for c in r.xinfo_consumers("dmp:batch:lines", "workers") if c["pending"] > 0]
    assert r.xlen("dmp:batch:lines") == 0
    for x in out:  # the same bytes as the synchronous answer
        body = bodies[x["custom_id"]]
        sync = oai_b.images.generate(model="digits", prompt=body["prompt"],
                                     extra_body={"seed": body["seed"], "steps": STEPS})
        assert x["response"]["body"]["data"][0]["b64_json"] == sync.data[0].b64_json, x["custom_id"]
    events = receiver.wait_for(batch.id)
    assert len(events) == 1 and oai_b.webhooks.unwrap(*events[0]).type == "batch.completed"
    receiver.close()
    print(f"\nKILLTEST lines=20 steps={STEPS} reclaim_idle=2s killed_after={t_kill - t0:.2f}s "
          f"answered_at_kill={done_at_kill} held_by_killed={held_at_kill} "
          f"finished_after_kill={t_done - t_kill:.2f}s total={t_done - t0:.2f}s")


def test_any_replica_answers_for_any_batch_and_file(start_server, class_only_dirs, redis_server):
    receiver = Receiver()
    keyed = {"api_keys": "k1:key-one-0123456789abcdef", "metrics_token": "metrics-token-0123456789"}
    a = replica(start_server, class_only_dirs, redis_server, receiver, **keyed)
    b = replica(start_server, class_only_dirs, redis_server, receiver, **keyed)
    oai_a, oai_b = (openai.OpenAI(base_url=s.url + "/v1", api_key="key-one-0123456789abcdef", max_retries=0)
                    for s in (a, b))
    batch = wait_final(oai_b, run_batch(oai_a, [line("x", {"prompt": "3", "seed": 1, "steps": 2})]).id)
    assert oai_a.files.content(batch.output_file_id).text == oai_b.files.content(batch.output_file_id).text
    assert [x.id for x in oai_a.batches.list()] == [x.id for x in oai_b.batches.list()] == [batch.id]
    # read from the Stream: nothing left queued or running (the last line is acknowledged just after its batch
    # is finalized, so the client may see `completed` a moment before)
    def drained() -> bool:
        text = httpx.get(a.url + "/metrics", headers={"Authorization": "Bearer metrics-token-0123456789"}).text
        return 'dmp_batch_lines{state="queued"} 0.0' in text and 'dmp_batch_lines{state="running"} 0.0' in text

    assert poll(drained, timeout=10, every=0.2)
    receiver.close()


def test_a_webhook_whose_sender_is_killed_is_delivered_by_the_other_replica(start_server, class_only_dirs,
                                                                          redis_server):
    """At least once across replicas: the replica retrying an event against a failing receiver is SIGKILLed; the
    receiver recovers and gets the same signed event from the other replica, which reclaimed it from the Stream."""
    receiver = Receiver(fail=10**6)  # 500 to every POST until it recovers
    a, b = (replica(start_server, class_only_dirs, redis_server, receiver, webhook_attempts=10) for _ in range(2))
    oai = openai.OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0, timeout=60,
                        webhook_secret=WEBHOOK_SECRET)
    batch = wait_final(oai, run_batch(oai, [line("x", {"prompt": "1", "seed": 1, "steps": 2})]).id)

    def deliveries(server) -> list[dict]:
        return httpx.get(f"{server.url}/v1/batches/{batch.id}/webhook_deliveries").json()["data"]

    assert poll(lambda: deliveries(b), timeout=30), "no delivery attempt was made"
    first = deliveries(b)[0]
    assert (first["attempt"], first["outcome"], first["status_code"]) == (1, "retry", 500)
    sender, other = (a, b) if first["sender"] == f"{os.uname().nodename}-{a.proc.pid}" else (b, a)
    assert first["sender"] == f"{os.uname().nodename}-{sender.proc.pid}"
    t_kill = time.monotonic()
    sender.stop()  # SIGKILL while it waits to retry: the event is pending in the Stream under its name
    posted = len(receiver.events(batch.id))
    receiver.fail = 0  # recovered: the next POST is answered 200
    events = receiver.wait_for(batch.id, count=posted + 1, timeout=60)
    t_delivered = time.monotonic()
    assert len(events) == posted + 1
    assert {h["webhook-id"] for _, h in events} == {first["event_id"]}  # the same event, resent
    oai_other = openai.OpenAI(base_url=other.url + "/v1", api_key="unused", webhook_secret=WEBHOOK_SECRET)
    event = oai_other.webhooks.unwrap(*events[-1])
    assert (event.type, event.data.id, event.id) == ("batch.completed", batch.id, first["event_id"])

    def logged() -> list[dict]:
        log = deliveries(other)
        return log if log and log[-1]["outcome"] == "delivered" else []

    assert poll(logged, timeout=10)  # the log entry follows the receiver's answer
    log = logged()
    assert [d["attempt"] for d in log] == list(range(1, len(log) + 1))  # counted across both replicas
    assert {d["sender"] for d in log[:-1]} == {first["sender"]} and all(d["outcome"] == "retry" for d in log[:-1])
    assert log[-1]["sender"] == f"{os.uname().nodename}-{other.proc.pid}" and log[-1]["status_code"] == 200
    r = redis.Redis.from_url(redis_server.url)
    assert poll(lambda: r.xlen("dmp:batch:webhooks") == 0, timeout=10)  # acknowledged and deleted
    assert not [c for c in r.xinfo_consumers("dmp:batch:webhooks", "senders") if c["pending"] > 0]
    receiver.close()
    print(f"\nWEBHOOK-KILLTEST attempts_by_killed={len(log) - 1} delivered_after_kill={t_delivered - t_kill:.2f}s "
          f"(reclaim_idle=2s)")
