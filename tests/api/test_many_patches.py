"""Many patches over few slots: uploads never fail for lack of slots, requests queue for a swap-in instead of
failing, and the pixels do not depend on whether a patch was resident, swapped in, or evicted and swapped in again."""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from conftest import asgi_client, copy_dirs, make_patch_bytes, wait_ready

TOKEN = "churn-admin-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
PATCHES = 50


def body(name: str) -> dict:
    return {"patch": name, "class_label": 3, "steps": 2, "seed": 7}


def image(client, name: str) -> str:
    r = client.post("/generate", json=body(name))
    assert r.status_code == 200, r.text
    return r.json()["images"][0]


def counter(client, metric: str, patch: str) -> float:
    prefix = f'{metric}{{model="digits",patch="{patch}"}} '
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_fifty_patches_over_four_slots_give_the_same_pixels(class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    digits = class_only_dirs["bases"]["digits"]
    files = {f"p{i:02d}": make_patch_bytes(digits, "digits", seed=1000 + i) for i in range(PATCHES)}
    size = len(files["p00"])
    # 3 device slots (slot 0 is the base) and host room for 4 copies: the rest live only on disk
    with asgi_client(dirs, warmup=False, admin_token=TOKEN, patch_slots=4, patch_host_bytes=4 * size,
                     max_batch=4) as c:
        wait_ready(c)
        for name, data in files.items():
            r = c.put(f"/patches/{name}", content=data, headers=AUTH)
            assert r.status_code == 201, r.text  # never 503 no_free_slot
        listed = {p["name"]: p for p in c.get("/patches").json()["patches"]}
        assert all(listed[n]["state"] == "ready" for n in files)
        assert {listed[n]["resident"] for n in files} == {"stored", "host"}

        first = {name: image(c, name) for name in files}  # each swapped in (most read back from disk first)
        assert len(set(first.values())) == PATCHES  # the patches really differ
        assert c.get("/patches/p49").json()["resident"] == "device"
        assert image(c, "p49") == first["p49"]  # resident
        assert c.get("/patches/p00").json()["resident"] == "stored" and counter(c, "dmp_patch_evictions_total",
                                                                                   "p00") == 1

        seated = {n for n in files if c.get(f"/patches/{n}").json()["resident"] == "device"}
        assert len(seated) == 3
        order = list(files)
        random.Random(0).shuffle(order)
        with ThreadPoolExecutor(12) as pool:  # more distinct patches in flight than slots: they queue
            again = list(pool.map(lambda n: (n, image(c, n)), order))
        assert all(img == first[name] for name, img in again)  # evicted and swapped in again, mixed in batches
        # a patch still seated when its request arrives may be served without a swap-in; every other one needs one
        assert all(counter(c, "dmp_patch_swap_ins_total", n) >= 2 for n in files if n not in seated)

    with asgi_client(copy_dirs(dirs, tmp_path / "roomy"), warmup=False, patch_slots=64) as roomy:
        wait_ready(roomy)  # room for all: every patch stays in host memory and, once used, in its slot
        for name in ("p00", "p17", "p49"):
            assert roomy.get(f"/patches/{name}").json()["resident"] == "host"
            assert image(roomy, name) == first[name]
            assert roomy.get(f"/patches/{name}").json()["resident"] == "device"
