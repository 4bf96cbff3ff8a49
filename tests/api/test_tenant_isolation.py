"""Tenants through the API (issue 24 item 3): a patch uploaded with a tenant's admin-scoped key belongs to that
tenant. Another tenant neither lists, reads, generates with, reads the gates of, deletes nor replaces it, and every
read answers exactly what a name that does not exist answers (404, the same body but for the name); shared patches
stay visible to all; the operator's token sees everything on the listing routes; rate limits and metrics per tenant;
/metrics is the operator's."""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack

import pytest
from conftest import ADMIN_TOKEN, asgi_client, copy_dirs, make_patch_bytes, poll, wait_ready

from app.core.errors import NotFound

ACME_ADMIN, ACME_APP = "sk-acme-admin-0123456789", "sk-acme-app-0123456789"
BETA_ADMIN, BETA_APP = "sk-beta-admin-0123456789", "sk-beta-app-0123456789"
SOLO = "sk-solo-0123456789"
KEYS = (f"acme-admin@acme+admin:{ACME_ADMIN},acme-app@acme:{ACME_APP},beta-admin@beta+admin:{BETA_ADMIN},"
        f"beta-app@beta:{BETA_APP},solo:{SOLO}")
OPERATOR = ADMIN_TOKEN
SECRET, MISSING = "acme-secret", "nothing-here"  # acme's patch; a name nobody uploaded (same length on purpose)


def auth(token: str, upload: bool = False) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    return headers | ({"Content-Type": "application/octet-stream"} if upload else {})


def patch_bytes(dirs, seed: int) -> bytes:
    return make_patch_bytes(dirs["bases"]["digits"], "digits", seed)


def reads(name: str) -> list[tuple[str, str, dict | None]]:
    """Every route that reads or uses patch `name`: (method, path, JSON body)."""
    return [("GET", f"/patches/{name}", None), ("GET", f"/patches/{name}/history", None),
            ("GET", f"/patches/{name}/gates?timesteps=3", None),
            ("GET", f"/patches/{name}/gates.png?timesteps=3", None),
            ("POST", "/generate", {"patch": name, "class_label": 1, "steps": 2, "seed": 1}),
            ("POST", "/generate", {"patches": [{"name": name, "scale": 0.5}], "class_label": 1, "steps": 2, "seed": 1}),
            ("POST", "/v1/images/generations", {"model": name, "prompt": "3", "n": 1, "steps": 2}),
            ("GET", f"/v1/models/{name}", None)]


def names(client, token: str | None, path: str = "/patches") -> set[str]:
    r = client.get(path, headers=auth(token) if token else {})
    assert r.status_code == 200, r.text
    body = r.json()
    if path == "/patches":
        return {p["name"] for p in body["patches"]}
    if path == "/models":
        return {p for m in body["models"] for p in m["patches"]}
    return {m["id"] for m in body["data"]}


@pytest.fixture(scope="module")
def tenants(class_only_dirs, tmp_path_factory):
    dirs = copy_dirs(class_only_dirs, tmp_path_factory.mktemp("tenants"))
    with asgi_client(dirs, admin_token=OPERATOR, api_keys=KEYS, warmup=False) as c:
        wait_ready(c)
        r = c.put(f"/patches/{SECRET}", content=patch_bytes(dirs, 1), headers=auth(ACME_ADMIN, upload=True))
        assert r.status_code == 201 and r.json()["owner"] == "acme", r.text
        r = c.put("/patches/shared-one", content=patch_bytes(dirs, 2), headers=auth(OPERATOR, upload=True))
        assert r.status_code == 201 and r.json()["owner"] is None, r.text
        c.dirs = dirs
        yield c


@pytest.mark.parametrize("path", ["/patches", "/models", "/v1/models"])
def test_lists_show_a_tenant_its_own_and_the_shared_patches(tenants, path):
    for token in (ACME_APP, ACME_ADMIN):
        assert {SECRET, "shared-one", "digits-dmp"} <= names(tenants, token, path)
    for token in (BETA_APP, BETA_ADMIN, SOLO):
        seen = names(tenants, token, path)
        assert SECRET not in seen and {"shared-one", "digits-dmp"} <= seen
    if path == "/v1/models":  # needs a key: the admin token is none
        assert tenants.get(path, headers=auth(OPERATOR)).status_code == 401
        return
    assert {SECRET, "shared-one"} <= names(tenants, OPERATOR, path)
    seen = names(tenants, None, path)  # open routes: without a credential, the shared patches alone
    assert SECRET not in seen and "shared-one" in seen


@pytest.mark.parametrize("method, path, body", reads(SECRET), ids=lambda x: str(x)[:30])
def test_another_tenant_gets_what_an_unknown_name_gets(tenants, method, path, body):
    """The probe: the status and body for acme's patch, asked by beta, match an unknown name's but for the name."""
    def ask(name: str, token: str):
        swap = (lambda v: v.replace(SECRET, name)) if name != SECRET else (lambda v: v)
        payload = json.loads(swap(json.dumps(body))) if body else None  # the name in nested compositions too
        return tenants.request(method, swap(path), json=payload, headers=auth(token))

    for token in (BETA_APP, BETA_ADMIN, SOLO):
        hidden, unknown = ask(SECRET, token), ask(MISSING, token)
        assert hidden.status_code == unknown.status_code == 404, hidden.text
        assert hidden.text.replace(SECRET, "NAME") == unknown.text.replace(MISSING, "NAME")
        assert "acme" not in hidden.text.replace(SECRET, "")
    assert ask(SECRET, ACME_APP).status_code == 200, ask(SECRET, ACME_APP).text  # the owner uses it
    operator = ask(SECRET, OPERATOR)  # the operator reads it; the admin token is no API key for generating
    assert operator.status_code == (200 if path.startswith(f"/patches/{SECRET}") and "gates" not in path else 401)


def test_shared_patches_serve_every_tenant(tenants):
    for token in (ACME_APP, BETA_APP, SOLO):
        r = tenants.post("/generate", json={"patch": "shared-one", "class_label": 1, "steps": 2},
                         headers=auth(token))
        assert r.status_code == 200, r.text


def test_another_tenant_cannot_delete_or_replace(tenants):
    before = tenants.get(f"/patches/{SECRET}", headers=auth(OPERATOR)).json()["version"]
    hidden = tenants.delete(f"/patches/{SECRET}", headers=auth(BETA_ADMIN))
    unknown = tenants.delete(f"/patches/{MISSING}", headers=auth(BETA_ADMIN))
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.text.replace(SECRET, "NAME") == unknown.text.replace(MISSING, "NAME")
    r = tenants.put(f"/patches/{SECRET}", content=patch_bytes(tenants.dirs, 3), headers=auth(BETA_ADMIN, True))
    assert r.status_code == 409 and r.json()["error_type"] == "name_taken"
    assert "acme" not in r.text.replace(SECRET, "")  # never whose it is
    for method in ("PUT", "DELETE"):  # a shared patch is the operator's: the tenant sees it, so 403 tells nothing new
        r = tenants.request(method, "/patches/shared-one", content=patch_bytes(tenants.dirs, 3),
                            headers=auth(BETA_ADMIN, True))
        assert r.status_code == 403 and r.json()["error_type"] == "shared_patch", r.text
    r = tenants.put("/patches/beta-try", content=patch_bytes(tenants.dirs, 3), headers=auth(BETA_APP, True))
    assert r.status_code == 403 and r.json()["error_type"] == "not_admin"  # a key without the admin scope
    assert tenants.get(f"/patches/{SECRET}", headers=auth(OPERATOR)).json()["version"] == before
    assert tenants.get("/patches/beta-try", headers=auth(OPERATOR)).status_code == 404


def test_owner_replaces_and_deletes_its_own(tenants):
    r = tenants.put("/patches/acme-tmp", content=patch_bytes(tenants.dirs, 4), headers=auth(ACME_ADMIN, True))
    assert r.status_code == 201 and r.json()["owner"] == "acme"
    r = tenants.put("/patches/acme-tmp", content=patch_bytes(tenants.dirs, 5), headers=auth(ACME_ADMIN, True))
    assert r.status_code == 200 and r.json()["owner"] == "acme"
    assert tenants.delete("/patches/acme-tmp", headers=auth(ACME_ADMIN)).status_code == 200
    assert tenants.get("/patches/acme-tmp", headers=auth(ACME_APP)).status_code == 404


def test_the_operator_assigns_owners(tenants):
    data = patch_bytes(tenants.dirs, 6)
    r = tenants.put("/patches/for-beta?owner=beta", content=data, headers=auth(OPERATOR, True))
    assert r.status_code == 201 and r.json()["owner"] == "beta"
    assert "for-beta" in names(tenants, BETA_APP) and "for-beta" not in names(tenants, ACME_APP)
    r = tenants.put("/patches/for-beta", content=data, headers=auth(OPERATOR, True))  # a replace keeps the owner
    assert r.status_code == 200 and r.json()["owner"] == "beta"
    r = tenants.put("/patches/for-beta?owner=", content=data, headers=auth(OPERATOR, True))  # empty: shared
    assert r.json()["owner"] is None and "for-beta" in names(tenants, ACME_APP)
    r = tenants.put("/patches/for-beta?owner=gamma", content=data, headers=auth(OPERATOR, True))
    assert r.status_code == 422 and r.json()["error_type"] == "unknown_tenant"
    r = tenants.put("/patches/acme-x?owner=beta", content=data, headers=auth(ACME_ADMIN, True))
    assert r.status_code == 403 and r.json()["error_type"] == "owner_not_allowed"
    assert tenants.get("/patches/acme-x", headers=auth(OPERATOR)).status_code == 404  # nothing changed


def test_the_engine_looks_the_patch_up_again_for_the_tenant(tenants):
    """A request resolved while its patch was shared and admitted after the operator gave the name to another
    tenant is refused at admission (Engine._submit), not run on a patch its caller can no longer see."""
    engine, data = tenants.app.state.engine, patch_bytes(tenants.dirs, 8)
    assert tenants.put("/patches/moving", content=data, headers=auth(OPERATOR, True)).status_code == 201
    spec = engine.resolve(patch="moving", class_label=1, steps=2, tenant="acme")
    assert tenants.put("/patches/moving?owner=beta", content=data, headers=auth(OPERATOR, True)).status_code == 200

    async def run(tenant: str):
        return await (await engine.open(spec, tenant=tenant)).outcome()

    with pytest.raises(NotFound):
        asyncio.run(run("acme"))
    assert asyncio.run(run("beta")).files  # its new owner's requests run


def test_metrics_are_the_operators_and_count_tenants(tenants):
    tenants.post("/generate", json={"patch": SECRET, "class_label": 1, "steps": 2}, headers=auth(ACME_APP))
    for token in (None, ACME_ADMIN, BETA_APP):  # tenant keys cannot read other tenants' patch series
        r = tenants.get("/metrics", headers=auth(token) if token else {})
        assert r.status_code == 401, r.text
    text = tenants.get("/metrics", headers=auth(OPERATOR)).text
    assert 'dmp_tenant_requests_total{outcome="allowed",tenant="acme"}' in text
    assert f'patch="{SECRET}"' in text  # the operator does see the patch's series


def test_rate_limits_are_per_tenant(class_only_dirs, tmp_path):
    """Two keys of one tenant share its bucket: the tenant's limit holds although neither key reached its own."""
    with asgi_client(copy_dirs(class_only_dirs, tmp_path), api_keys=KEYS, warmup=False, tenant_requests_per_min=2,
                     key_requests_per_min=10) as c:
        wait_ready(c)
        ask = {"class_label": 1, "steps": 2}
        assert c.post("/generate", json=ask, headers=auth(ACME_APP)).status_code == 200
        assert c.post("/generate", json=ask, headers=auth(ACME_ADMIN)).status_code == 200
        r = c.post("/generate", json=ask, headers=auth(ACME_APP))
        assert r.status_code == 429 and r.json()["error_type"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
        assert c.post("/generate", json=ask, headers=auth(BETA_APP)).status_code == 200  # another tenant's bucket


@pytest.mark.redis
def test_tenants_across_two_replicas_and_a_redis_refill(redis_server, class_only_dirs, tmp_path):
    """Replica A takes acme's upload; replica B keeps it from beta, also after Redis lost everything and the
    replicas refilled it (the owner travels with the refill)."""
    settings = dict(admin_token=OPERATOR, api_keys=KEYS, warmup=False, redis_url=redis_server.url)
    with ExitStack() as stack:
        a, b = (stack.enter_context(asgi_client(copy_dirs(class_only_dirs, tmp_path / n), **settings)) for n in "ab")
        wait_ready(a)
        wait_ready(b)
        r = a.put(f"/patches/{SECRET}", content=patch_bytes(class_only_dirs, 7), headers=auth(ACME_ADMIN, True))
        assert r.status_code == 201

        def isolated(client) -> bool:
            mine, other = client.get(f"/patches/{SECRET}", headers=auth(ACME_APP)), None
            if mine.status_code != 200:
                return False
            other = client.get(f"/patches/{SECRET}", headers=auth(BETA_APP))
            assert other.status_code == 404 and SECRET not in names(client, BETA_APP)
            return mine.json()["owner"] == "acme"

        assert poll(lambda: isolated(b), 10)
        r = b.post("/generate", json={"patch": SECRET, "class_label": 1, "steps": 2}, headers=auth(BETA_APP))
        assert r.status_code == 404
        redis_server.kill()
        redis_server.start()  # empty: the replicas refill it from what they hold
        wait_ready(a)
        wait_ready(b)
        time.sleep(3)  # a resync or two after the refill
        for client in (a, b):
            assert isolated(client)
            r = client.post("/generate", json={"patch": SECRET, "class_label": 1, "steps": 2}, headers=auth(ACME_APP))
            assert r.status_code == 200, r.text
