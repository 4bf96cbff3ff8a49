"""DMP_API_KEYS parsing and lookup, and the per-key token buckets (in memory and in a real Redis)."""
from __future__ import annotations

import hashlib
import time

import pytest

from app.core.apikeys import KeyRing
from app.core.errors import BadRequest
from app.core.ratelimit import RateLimiter


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_every_entry_form_from_a_list_and_a_file(tmp_path):
    listed = KeyRing.parse(f"k-plain, sha256:{sha('k-hashed')}, carol:k-carol, dave:sha256:{sha('k-dave')}")
    assert listed.identify("k-plain") == sha("k-plain")[:12]
    assert listed.identify("k-hashed") == sha("k-hashed")[:12]
    assert listed.identify("k-carol") == "carol" and listed.identify("k-dave") == "dave"
    assert listed.identify("sha256:" + sha("k-hashed")) is None  # a stored hash is not itself a key
    assert listed.identify("") is None and listed.identify("k-plai") is None
    f = tmp_path / "keys"
    f.write_text(f"# ops keys\n\nerin:sha256:{sha('k-erin')}\n")
    assert KeyRing.parse(str(f)).identify("k-erin") == "erin"


@pytest.mark.parametrize("value", ["", " , ", "a:x,a:y", "bad id!:k", "x:", "/no/such/file"])
def test_bad_settings_refuse_to_start(value):
    with pytest.raises(ValueError):
        KeyRing.parse(value)


def test_memory_bucket_takes_both_or_neither_and_refills():
    limiter = RateLimiter(requests_per_min=120, images_per_min=6)  # 2 requests/s, 0.1 images/s
    assert limiter.take("a", 4) == 0
    wait = limiter.take("a", 3)  # 2 image tokens left: refused, and nothing taken
    assert 9 < wait <= 10.5
    assert limiter.take("a", 2) == 0  # the refused request took none of them
    assert limiter.take("b", 6) == 0  # buckets are per key
    with pytest.raises(BadRequest):
        limiter.take("a", 7)  # more than a full bucket can ever hold
    assert RateLimiter(0, 0).take("a", 100) == 0  # no limits


def test_redis_bucket_is_shared(redis_server):
    import redis

    one, two = (RateLimiter(3, 0, client=redis.Redis.from_url(redis_server.url)) for _ in range(2))
    assert [one.take("k", 1), two.take("k", 1), one.take("k", 1)] == [0, 0, 0]
    wait = two.take("k", 1)
    assert 0 < wait <= 20  # 3/min: a token every 20 s
    start = time.monotonic()
    redis_server.kill()
    from app.core.errors import Unavailable

    with pytest.raises(Unavailable):
        one.take("k", 1)
    assert time.monotonic() - start < 10
