"""DMP_API_KEYS parsing and lookup, and the per-key token buckets (in memory and in a real Redis)."""
from __future__ import annotations

import hashlib
import hmac
import itertools
import time

import pytest

from app.core.apikeys import ApiKey, KeyRing, unnamed_key_id
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


def test_tenants_and_the_admin_scope():
    """ID@TENANT and +admin extend the id; every older form still reads as before (a key is its own tenant)."""
    ring = KeyRing.parse(f"ops@acme+admin:k-ops, app@acme:sha256:{sha('k-app')}, root+admin:k-root, carol:k-carol,"
                         " k-plain", SECRET)
    ids = {key: ring.identify(key) for key in ("k-ops", "k-app", "k-root", "k-carol", "k-plain")}
    assert ids["k-ops"] == "ops" and ids["k-app"] == "app" and ids["k-root"] == "root"
    assert ring.keys["ops"] == ApiKey("ops", "acme", admin=True) and ring.keys["app"] == ApiKey("app", "acme")
    assert ring.keys["root"] == ApiKey("root", "root", admin=True) and ring.keys["carol"] == ApiKey("carol", "carol")
    plain = ids["k-plain"]
    assert ring.keys[plain] == ApiKey(plain, plain)  # an unnamed key: its HMAC id, never an admin
    assert ring.tenants == {"acme", "root", "carol", plain} and ring.has_admins
    assert not KeyRing.parse("carol:k-carol").has_admins


@pytest.mark.parametrize("value", ["", " , ", "a:x,a:y", "bad id!:k", "x:", "/no/such/file", "k-\u00e9t\u00e9",
                                   "ann:cl\u00e9", "ann:tab\there", "a@:k", "a@b@c:k", "a+root:k", "a+admin@t:k",
                                   "a@t:k,a@u:j"])
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


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_a_tenant_bucket_is_shared_by_its_keys(where, request):
    """Key and tenant buckets are taken together, all or none: a refusal by the tenant's bucket spends nothing of
    the key's."""
    import redis

    client = redis.Redis.from_url(request.getfixturevalue("redis_server").url) if where == "redis" else None
    limiter = RateLimiter(120, 0, client=client, tenant_requests_per_min=3, tenant_images_per_min=10)
    assert [limiter.take("k1", 4, "t"), limiter.take("k2", 4, "t")] == [0, 0]
    assert limiter.take("k1", 4, "t") > 0  # 2 image tokens left in t's bucket
    assert limiter.take("k1", 2, "t") == 0  # the refusal took none, of the tenant's or the key's
    assert limiter.take("k2", 1, "t") > 0  # 3 requests a minute for the tenant, whichever key
    assert limiter.take("k3", 10, "u") == 0  # another tenant, its own bucket
    with pytest.raises(BadRequest) as e:
        limiter.take("k3", 11, "u")
    assert e.value.error_type == "over_tenant_limit"


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
