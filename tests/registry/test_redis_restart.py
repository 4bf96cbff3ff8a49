"""An acknowledged write is never lost: a real redis-server restarted empty between a write and the replicas'
refill from memory, with two replicas (registries) on it. Issue 25 item 3."""
from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import pytest
import redis
from conftest import AUTH, admin_client, make_patch_bytes, poll

pytestmark = pytest.mark.redis


def hold_refill(client, gate: threading.Event) -> None:
    """Let a replica's refill run only once `gate` is set: the write lands first, deterministically."""
    registry = client.app.state.engine.registry
    populate = registry._populate

    def later():
        gate.wait(30)
        populate()

    registry._populate = later


@pytest.fixture
def replicas(redis_server, class_only_dirs, tmp_path):
    with ExitStack() as stack:
        yield [stack.enter_context(admin_client(class_only_dirs, tmp_path / f"r{i}", warmup=False,
                                                redis_url=redis_server.url)) for i in range(2)]


def version_on(client, name: str):
    r = client.get(f"/patches/{name}")
    return r.json()["version"] if r.status_code == 200 else None


def put_on_both(replicas, class_only_dirs, name: str, seed: int) -> None:
    """Upload `name` through the first replica and wait until the second serves that version."""
    a, b = replicas
    data = make_patch_bytes(class_only_dirs["bases"]["digits"], "digits", seed=seed)
    version = a.put(f"/patches/{name}", content=data, headers=AUTH).json()["version"]
    assert poll(lambda: version_on(b, name) == version, 5)


class Gates:
    """Each replica's refill held until released: stale replicas first, as when they notice the restart first."""

    def __init__(self, replicas):
        self.gates = [threading.Event() for _ in replicas]
        for c, gate in zip(replicas, self.gates, strict=True):
            hold_refill(c, gate)

    def release(self) -> None:
        for gate in reversed(self.gates):  # b (the one holding the older state) refills first
            gate.set()
            time.sleep(1)


def restart_empty(redis_server, replicas) -> Gates:
    """Kill redis-server, start it again with no data, with every replica's refill held until released."""
    gates = Gates(replicas)
    redis_server.kill()
    redis_server.start()
    return gates


def test_put_after_restart_is_not_reverted_by_refill(redis_server, replicas, class_only_dirs):
    a, b = replicas
    put_on_both(replicas, class_only_dirs, "shared", seed=1)
    gates = restart_empty(redis_server, replicas)
    digits = class_only_dirs["bases"]["digits"]
    put = a.put("/patches/shared", content=make_patch_bytes(digits, "digits", seed=2), headers=AUTH)
    assert put.status_code == 200, put.text
    v2 = put.json()["version"]
    gates.release()  # now both replicas refill Redis from memory: b still holds v1
    time.sleep(5)  # past two resync periods
    assert version_on(a, "shared") == v2 and version_on(b, "shared") == v2
    r = redis.Redis.from_url(redis_server.url)
    assert r.hget("dmp:patch-versions", "shared").decode() == v2
    assert r.hget("dmp:patch-versions", "digits-dmp")  # the untouched patch was refilled


def test_delete_after_restart_stays_deleted(redis_server, replicas, class_only_dirs):
    a, b = replicas
    put_on_both(replicas, class_only_dirs, "gone", seed=3)
    gates = restart_empty(redis_server, replicas)
    assert a.delete("/patches/gone", headers=AUTH).status_code == 200
    gates.release()
    time.sleep(5)
    assert version_on(a, "gone") is None and version_on(b, "gone") is None
    assert redis.Redis.from_url(redis_server.url).hget("dmp:patch-versions", "gone") is None


def test_a_replica_that_missed_a_delete_does_not_bring_it_back(redis_server, replicas, class_only_dirs):
    """b holds the name (it missed the delete), a saw it: Redis restarts and both refill; the delete wins."""
    a, b = replicas
    put_on_both(replicas, class_only_dirs, "stale", seed=4)
    registry_b = b.app.state.engine.registry
    on_event, resync = registry_b._on_event, registry_b._resync
    registry_b._on_event = registry_b._resync = lambda *args: None  # b hears nothing for now
    assert a.delete("/patches/stale", headers=AUTH).status_code == 200
    gates = restart_empty(redis_server, replicas)
    registry_b._on_event, registry_b._resync = on_event, resync
    gates.release()
    time.sleep(5)
    assert version_on(a, "stale") is None and version_on(b, "stale") is None
