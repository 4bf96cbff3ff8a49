"""Everything read from Redis is untrusted input: malformed events, records, version fields and cache entries
never stop a replica from syncing or serving, never reach a client as a 500 or a foreign image."""
from __future__ import annotations

import json

import pytest
import redis
from conftest import (
    BAD_HEADERS,
    asgi_client,
    copy_dirs,
    make_patch_bytes,
    poll,
    wait_ready,
    with_header,
)

pytestmark = pytest.mark.redis
CHANNEL, VERSIONS = "dmp:patch-events", "dmp:patch-versions"


def put_raw(r: redis.Redis, name: str, data: bytes, version: str = "0123456789abcdef") -> None:
    """What a replica's store writes, done by hand: bytes, version field, event."""
    r.set(f"dmp:patch:{name}", data)
    r.hset(VERSIONS, name, version)
    r.publish(CHANNEL, json.dumps({"op": "put", "name": name, "version": version, "origin": "elsewhere"}))


def test_bad_redis_data_fails_alone_and_sync_goes_on(redis_server, class_only_dirs, tmp_path):
    r = redis.Redis.from_url(redis_server.url)
    digits = class_only_dirs["bases"]["digits"]
    with asgi_client(copy_dirs(class_only_dirs, tmp_path / "a"), redis_url=redis_server.url, warmup=False) as c:
        wait_ready(c)
        for junk in (b"[]", b'"put"', b"7", b"\xff\xfe", b"[" * 100_000, b'{"op": "put", "name": ["x"]}',
                     b'{"op": "put", "name": "../etc"}', b'{"op": "put"}', b'{"name": "digits-dmp", "op": 1}'):
            r.publish(CHANNEL, junk)
        good = make_patch_bytes(digits, "digits", seed=7)
        for kind, change in BAD_HEADERS.items():
            put_raw(r, f"bad-{kind.replace('_', '-')}", with_header(good, change))
        r.hset(VERSIONS, b"\xff\xfe-not-utf8", b"x")  # one non-UTF-8 field
        r.hset(VERSIONS, "bad-type", "x")
        r.hset("dmp:patch:bad-type", "a", "b")  # WRONGTYPE for GET
        put_raw(r, "later", good)  # sync still running: this one loads
        assert poll(lambda: c.get("/patches/later").json().get("state") == "ready", 10)
        assert poll(lambda: c.get("/patches/bad-type").status_code == 200, 10)  # found by the periodic resync
        states = {p["name"]: p["state"] for p in c.get("/patches").json()["patches"]}
        bad = {n: s for n, s in states.items() if n.startswith("bad-")}
        assert bad == {n: "failed" for n in bad} and len(bad) == len(BAD_HEADERS) + 1, states
        assert c.get("/health/ready").status_code == 200
        r.publish(CHANNEL, b"[]")
        r.delete("dmp:patch:later")
        r.hdel(VERSIONS, "later")
        r.publish(CHANNEL, json.dumps({"op": "delete", "name": "later", "origin": "elsewhere"}))
        assert poll(lambda: c.get("/patches/later").status_code == 404, 10)  # deletes still arrive
        assert c.get("/health/ready").status_code == 200
    # a new replica on the same Redis becomes ready too
    with asgi_client(copy_dirs(class_only_dirs, tmp_path / "b"), redis_url=redis_server.url, warmup=False) as c2:
        wait_ready(c2)
        assert c2.get("/patches/digits-dmp").json()["state"] == "ready"
        assert c2.get("/patches/bad-list-value").json()["state"] == "failed"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_sync_thread_turns_unready_and_restarts(redis_server, class_only_dirs, tmp_path):
    with asgi_client(copy_dirs(class_only_dirs, tmp_path), redis_url=redis_server.url, warmup=False) as c:
        wait_ready(c)
        registry = c.app.state.engine.registry
        resync, calls = registry._resync, []

        def dies_once():  # SystemExit is no Exception: it ends the thread, as an uncaught error would
            calls.append(1)
            if len(calls) == 1:
                raise SystemExit
            resync()

        registry._resync = dies_once  # called every RESYNC_SECONDS
        assert poll(lambda: not registry._listener.is_alive(), 10)
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["error_type"] == "registry_unavailable"
        assert poll(lambda: c.get("/health/ready").status_code == 200, 10)  # restarted by the probe, synced again
        assert len(calls) >= 2


def test_result_cache_garbage_and_foreign_entries_are_misses(redis_server, class_only_dirs, tmp_path):
    import base64

    r = redis.Redis.from_url(redis_server.url)
    with asgi_client(copy_dirs(class_only_dirs, tmp_path), redis_url=redis_server.url, cache_ttl=60,
                     warmup=False) as c:
        wait_ready(c)
        body = {"class_label": 4, "steps": 2, "seed": 3}
        first = c.post("/generate", json=body).json()
        (key,) = r.keys("dmp:result:*")
        other = c.post("/generate", json=body | {"class_label": 5}).json()["images"]
        foreign = json.dumps(other).encode()  # well-formed: what an unsigned cache stored
        for value in (b"\x00garbage", b"[1, 2]", b"{}", b"not json", foreign, b"0" * 64 + b":" + foreign):
            r.set(key, value)
            again = c.post("/generate", json=body)
            assert again.status_code == 200, again.text
            assert not again.json()["cached"] and again.json()["images"] == first["images"]
        r.delete(key)
        assert c.post("/generate", json=body).json()["cached"] is False
        assert c.post("/generate", json=body).json()["cached"] is True  # its own signed entry still hits
        assert 'dmp_result_cache_total{outcome="invalid"}' in c.get("/metrics").text
        assert base64.b64decode(first["images"][0])
