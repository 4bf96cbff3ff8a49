"""Tenants in the registry (issue 24 item 3, the registry's part): a tenant's patch has an owner that travels with
it (disk, Redis, refill); other tenants neither list, get nor delete it (404 NotFound) nor replace it (409: the name
is taken); a shared patch is the operator's to change (403); the operator sees all and may assign owners."""
from __future__ import annotations

from contextlib import ExitStack

import pytest
from conftest import asgi_client, copy_dirs, make_patch_bytes, poll, wait_ready

from app.core.errors import Conflict, Forbidden, NotFound


def names(registry, tenant):
    return {r.name for r in registry.list(tenant)}


def check_isolation(registry, digits):
    registry.put("alpha", make_patch_bytes(digits, "digits", 1), tenant="a")
    registry.put("shared", make_patch_bytes(digits, "digits", 2))
    assert registry.get("alpha", "a").owner == "a" and registry.get("shared", "b").owner is None
    assert names(registry, "a") >= {"alpha", "shared"} and "alpha" not in names(registry, "b")
    assert "alpha" in names(registry, None)  # the operator
    for attempt in (lambda: registry.get("alpha", "b"), lambda: registry.delete("alpha", "b")):
        with pytest.raises(NotFound) as e:
            attempt()
        assert e.value.status == 404
    with pytest.raises(Conflict) as taken:
        registry.put("alpha", make_patch_bytes(digits, "digits", 3), tenant="b")
    assert taken.value.status == 409 and "'a'" not in taken.value.message  # never whose it is
    for attempt in (lambda: registry.delete("shared", "b"),
                    lambda: registry.put("shared", make_patch_bytes(digits, "digits", 3), tenant="b")):
        with pytest.raises(Forbidden):
            attempt()
    assert registry.get("alpha", "a").version == registry.get("alpha").version  # b changed nothing
    assert registry.get("shared").version == registry.get("shared", "b").version
    registry.put("alpha", make_patch_bytes(digits, "digits", 4))  # the operator replaces it: still a's
    assert registry.get("alpha").owner == "a"
    registry.put("alpha", make_patch_bytes(digits, "digits", 4), owner=None, set_owner=True)  # made shared
    assert registry.get("alpha", "b").owner is None
    registry.put("alpha", make_patch_bytes(digits, "digits", 4), owner="a", set_owner=True)  # a's again
    assert "alpha" not in names(registry, "b")


def test_tenants_on_disk(class_only_dirs, tmp_path):
    digits = class_only_dirs["bases"]["digits"]
    dirs = copy_dirs(class_only_dirs, tmp_path)
    with asgi_client(dirs, warmup=False) as c:
        wait_ready(c)
        check_isolation(c.app.state.engine.registry, digits)
    with asgi_client(dirs, warmup=False) as c:  # a restart reads the owner back from NAME.safetensors.owner
        wait_ready(c)
        registry = c.app.state.engine.registry
        assert registry.get("alpha").owner == "a" and "alpha" not in names(registry, "b")


@pytest.mark.redis
def test_tenants_across_replicas_and_a_redis_restart(redis_server, class_only_dirs, tmp_path):
    import time

    digits = class_only_dirs["bases"]["digits"]
    with ExitStack() as stack:
        a, b = (stack.enter_context(asgi_client(copy_dirs(class_only_dirs, tmp_path / n), warmup=False,
                                                redis_url=redis_server.url)) for n in "ab")
        wait_ready(a)
        wait_ready(b)
        check_isolation(a.app.state.engine.registry, digits)
        other = b.app.state.engine.registry
        mine = a.app.state.engine.registry.get("alpha")
        end = time.monotonic() + 5  # check_isolation's last writes (shared, then a's again) reach b in turn
        while time.monotonic() < end and not ("alpha" in other.records
                                              and other.records["alpha"].generation == mine.generation):
            time.sleep(0.05)
        assert other.get("alpha").owner == "a" and "alpha" not in names(other, "b")
        same = make_patch_bytes(digits, "digits", 4)  # alpha's current bytes: only the owner changes
        a.app.state.engine.registry.put("alpha", same, owner=None, set_owner=True)
        assert poll(lambda: other.records["alpha"].owner is None, 5)
        a.app.state.engine.registry.put("alpha", same, owner="a", set_owner=True)
        assert poll(lambda: other.records["alpha"].owner == "a", 5)
        redis_server.kill()
        redis_server.start()  # empty: the replicas refill it, owners included
        wait_ready(a)
        wait_ready(b)
        time.sleep(3)
        import redis

        assert redis.Redis.from_url(redis_server.url).hget("dmp:patch-owners", "alpha") == b"a"
        assert other.get("alpha").owner == "a"


@pytest.mark.redis
def test_a_tenant_write_is_checked_inside_redis_too(redis_server, class_only_dirs, tmp_path):
    """Another replica's write this replica has not seen yet: the owner check also runs in Redis's compare-and-set,
    so a tenant cannot take over a name it only does not know about yet."""
    import redis

    from app.registry.records import version_of
    from app.registry.stores import OWNERS, VERSIONS, RedisStore

    digits = class_only_dirs["bases"]["digits"]
    with asgi_client(copy_dirs(class_only_dirs, tmp_path), warmup=False, redis_url=redis_server.url) as c:
        wait_ready(c)
        registry = c.app.state.engine.registry
        registry.stop()  # this replica hears nothing more: the write below stays unseen by it
        client = redis.Redis.from_url(redis_server.url)
        theirs = make_patch_bytes(digits, "digits", 5)
        for name, owner in (("race", "b"), ("race-shared", None)):
            client.set(RedisStore(client, "elsewhere", 60).key(name), theirs)
            client.hset(VERSIONS, name, version_of(theirs))
            if owner:
                client.hset(OWNERS, name, owner)
        assert "race" not in registry.records
        with pytest.raises(Conflict):
            registry.put("race", make_patch_bytes(digits, "digits", 6), tenant="a")
        with pytest.raises(Forbidden):
            registry.put("race-shared", make_patch_bytes(digits, "digits", 6), tenant="a")
        assert client.hget(OWNERS, "race") == b"b" and client.get(RedisStore(client, "x", 60).key("race")) == theirs
        registry.put("race", make_patch_bytes(digits, "digits", 7))  # the operator's write is not refused
