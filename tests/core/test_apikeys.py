"""DMP_API_KEYS parsing and lookup, and the per-key token buckets (in memory and in a real Redis)."""
from __future__ import annotations

import hashlib
import hmac
import itertools
import time

import pytest

from app.core.apikeys import KeyRing, unnamed_key_id
from app.core.errors import BadRequest
from app.core.ratelimit import RateLimiter


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


SECRET = b"id-secret-0123456789"


def test_every_entry_form_from_a_list_and_a_file(tmp_path):
    listed = KeyRing.parse(f"k-plain, sha256:{sha('k-hashed')}, carol:k-carol, dave:sha256:{sha('k-dave')}", SECRET)
    assert listed.identify("k-plain") == hmac.new(SECRET, bytes.fromhex(sha("k-plain")), "sha256").hexdigest()[:12]
    assert listed.identify("k-hashed") == unnamed_key_id(bytes.fromhex(sha("k-hashed")), SECRET)
    assert listed.identify("k-carol") == "carol" and listed.identify("k-dave") == "dave"
    assert listed.identify("sha256:" + sha("k-hashed")) is None  # a stored hash is not itself a key
    assert listed.identify("") is None and listed.identify("k-plai") is None
    f = tmp_path / "keys"
    f.write_text(f"# ops keys\n\nerin:sha256:{sha('k-erin')}\n")
    assert KeyRing.parse(str(f)).identify("k-erin") == "erin"


@pytest.mark.parametrize("value", ["", " , ", "a:x,a:y", "bad id!:k", "x:", "/no/such/file", "k-\u00e9t\u00e9",
                                   "ann:cl\u00e9", "ann:tab\there"])
def test_bad_settings_refuse_to_start(value):
    with pytest.raises(ValueError) as e:
        KeyRing.parse(value)
    assert "\u00e9" not in str(e.value)  # the message never echoes a key


def test_non_ascii_keys_are_refused_at_start_with_one_line():
    from pydantic import ValidationError

    from app.core.config import Settings, describe_errors

    for env in ({"api_keys": "ann:cl\u00e9"}, {"api_keys": "k-plain", "key_id_secret": "short"}):
        with pytest.raises(ValidationError) as e:
            Settings(**env)
        assert describe_errors(e.value).startswith("DMP_") and "cl\u00e9" not in describe_errors(e.value)
    assert Settings(api_keys="k-plain").api_keys  # an unnamed key still works without DMP_KEY_ID_SECRET


def test_a_metric_label_gives_no_guess_away():
    """The issue's attack: a weak unnamed key's label was its SHA-256 prefix, found by hashing guesses. Now the
    label is keyed: the same loop over the whole keyspace matches nothing, unless it knows the secret."""
    weak, strong = "sk-4711", "sk-strong-6f1c9a0e3b7d4c2a9e8f"
    guesses = [f"sk-{i:04d}" for i in range(10_000)]
    for setting, secret in ((f"{weak},{strong}", None), (weak, SECRET)):  # derived from the list / the setting
        ring = KeyRing.parse(setting, secret)
        label = ring.identify(weak)
        assert label != sha(weak)[:12] and label == KeyRing.parse(setting, secret).identify(weak)  # stable
        assert not [g for g in guesses if sha(g)[:12] == label]
        assert not [g for g, s in itertools.product(guesses, [b"", b"guess-0123456789"])
                    if unnamed_key_id(bytes.fromhex(sha(g)), s) == label]
        # nor the derivation, guessing the weak key alone
        assert not [g for g in guesses if KeyRing.parse(g).identify(g) == label]
        if secret:  # the control: the loop finds the key when it has the secret
            assert [g for g in guesses if unnamed_key_id(bytes.fromhex(sha(g)), secret) == label] == [weak]
    assert KeyRing.parse(weak, b"other-replica-secret-01").identify(weak) != KeyRing.parse(weak, SECRET).identify(weak)


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
