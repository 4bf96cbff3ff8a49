"""The Batch API without Redis, driven by the real `openai` client against a real `python -m app serve`: files,
batches, the status machine, per-key ownership, limits, and signed webhooks verified by `client.webhooks.unwrap`."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.api.batch_helpers import WEBHOOK_SECRET, Receiver, content_lines, jsonl, line, run_batch, wait_final
from tests.conftest import ADMIN_TOKEN, ServerProcess, asgi_client, copy_dirs, make_patch_bytes, wait_ready

KEYS = "alice:alice-key-0123456789abcdef,bob:bob-key-0123456789abcdef"
MAX_FILE = 8192
METRICS_TOKEN = "metrics-token-0123456789"


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(class_only_dirs, tmp_path_factory, receiver):
    root = tmp_path_factory.mktemp("batches")
    dirs = copy_dirs(class_only_dirs, root)  # a test uploads a patch: never into the session's shared folder
    proc = ServerProcess({"DMP_MODEL_DIR": str(dirs["models"]),
                          "DMP_PATCH_DIR": str(dirs["patches"]), "DMP_TORCH_THREADS": "1",
                          "DMP_API_KEYS": KEYS, "DMP_BATCH_DIR": str(root / "batch"),
                          "DMP_ADMIN_TOKEN": ADMIN_TOKEN, "DMP_METRICS_TOKEN": METRICS_TOKEN,
                          "DMP_BATCH_MAX_FILE_BYTES": str(MAX_FILE), "DMP_WEBHOOK_URL": receiver.url,
                          "DMP_WEBHOOK_SECRET": WEBHOOK_SECRET}, root / "server.log")
    proc.wait_ready(timeout=180)
    proc.batch_dir = root / "batch"
    yield proc
    proc.stop()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60,
                         webhook_secret=WEBHOOK_SECRET)


@pytest.fixture(scope="module")
def alice(server):
    return client(server, "alice-key-0123456789abcdef")


@pytest.fixture(scope="module")
def bob(server):
    return client(server, "bob-key-0123456789abcdef")


def test_each_output_line_equals_its_synchronous_answer(alice, receiver, server):
    bodies = {"a": {"model": "digits", "prompt": "3", "seed": 1, "steps": 3},
              "b": {"model": "digits", "prompt": "7", "seed": 2, "steps": 4, "n": 2},
              "c": {"model": "digits-dmp", "prompt": "1", "seed": 3, "steps": 3, "output_format": "webp"},
              "d": {"prompt": "5", "seed": 4, "steps": 2, "guidance_scale": 2.0}}
    lines = [line(k, v) for k, v in bodies.items()] + [line("bad", {"model": "nope", "prompt": "1"}),
                                                       line("worse", {"model": "digits", "n": "two"})]
    created = run_batch(alice, lines, metadata={"job": "test"})
    assert created.status in ("validating", "in_progress") and created.request_counts.total == 6
    batch = wait_final(alice, created.id)
    assert batch.status == "completed" and batch.metadata == {"job": "test"}
    assert (batch.request_counts.completed, batch.request_counts.failed, batch.request_counts.total) == (4, 2, 6)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    out = content_lines(alice, batch.output_file_id)
    assert [x["custom_id"] for x in out] == ["a", "b", "c", "d"]  # in input order
    for x in out:
        sync = alice.images.generate(**{k: v for k, v in bodies[x["custom_id"]].items() if k in ("model", "prompt",
                                                                                                   "n")},
                                     extra_body={k: v for k, v in bodies[x["custom_id"]].items()
                                                 if k not in ("model", "prompt", "n")})
        body = x["response"]["body"]
        assert x["response"]["status_code"] == 200 and x["error"] is None
        assert [d["b64_json"] for d in body["data"]] == [d.b64_json for d in sync.data]
        assert (body["seed"], body["model"], body["size"], body["output_format"]) == (
            sync.seed, sync.model, sync.size, sync.output_format)
    errors = {x["custom_id"]: x["response"] for x in content_lines(alice, batch.error_file_id)}
    assert errors["bad"]["status_code"] == 404 and errors["bad"]["body"]["error"]["code"] == "model_not_found"
    assert errors["worse"]["status_code"] == 400 and errors["worse"]["body"]["error"]["param"] == "n"
    # the webhook: a Standard Webhooks signed batch.completed that the openai client verifies
    (body, headers), = receiver.wait_for(batch.id)
    event = alice.webhooks.unwrap(body, headers)
    assert event.type == "batch.completed" and event.data.id == batch.id
    with pytest.raises(openai.InvalidWebhookSignatureError):
        alice.webhooks.unwrap(body.replace(b"completed", b"cancelled"), headers)
    log = httpx.get(f"{server.url}/v1/batches/{batch.id}/webhook_deliveries",
                    headers={"Authorization": "Bearer alice-key-0123456789abcdef"}).json()["data"]
    assert [(d["outcome"], d["status_code"]) for d in log] == [("delivered", 200)]
    assert alice.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in alice.batches.list()]


def test_a_key_sees_only_its_own_files_and_batches(alice, bob):
    file = alice.files.create(file=("in.jsonl", jsonl([line("x", {"prompt": "1", "seed": 1, "steps": 2})])),
                              purpose="batch")
    batch = alice.batches.create(input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h")
    for call in (lambda: bob.files.retrieve(file.id), lambda: bob.files.content(file.id),
                 lambda: bob.batches.retrieve(batch.id), lambda: bob.batches.cancel(batch.id),
                 lambda: bob.batches.create(input_file_id=file.id, endpoint="/v1/images/generations",
                                            completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in bob.batches.list()]
    assert file.id not in [f.id for f in bob.files.list()]
    assert file.id in [f.id for f in alice.files.list()]
    wait_final(alice, batch.id)
    with pytest.raises(openai.AuthenticationError):
        client_without_key = openai.OpenAI(base_url=str(alice.base_url), api_key="wrong", max_retries=0)
        client_without_key.batches.list()


@pytest.mark.parametrize("data,purpose,code", [
    (b"not json\n", "batch", "invalid_json"), (b"[1, 2]\n", "batch", "invalid_json"), (b"\n\n", "batch", "empty_file"),
    (b"\xff\xfe\n", "batch", "invalid_file"), (jsonl([line("x", {})]), "fine-tune", "invalid_value")])
def test_bad_files_are_refused_with_400(alice, data, purpose, code):
    with pytest.raises(openai.BadRequestError) as e:
        alice.files.create(file=("in.jsonl", data), purpose=purpose)
    assert e.value.code == code


@pytest.mark.parametrize("size", [MAX_FILE + 3, MAX_FILE + 200_000])  # caught after the form is read; while read
def test_a_file_over_its_cap_is_refused_with_413(alice, size):
    with pytest.raises(openai.APIStatusError) as e:
        alice.files.create(file=("in.jsonl", b"{}\n" * (size // 3)), purpose="batch")
    assert e.value.status_code == 413


def test_a_batch_is_refused_for_a_wrong_endpoint_window_or_file(alice):
    file = alice.files.create(file=("in.jsonl", jsonl([line("x", {"prompt": "1"})])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        alice.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert e.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError):
        alice.batches.create(input_file_id=file.id, endpoint="/v1/images/generations", completion_window="1h")
    with pytest.raises(openai.NotFoundError):
        alice.batches.create(input_file_id="file-nope", endpoint="/v1/images/generations", completion_window="24h")


@pytest.mark.parametrize("bad,code", [(line("x", {}, url="/v1/chat/completions"), "invalid_url"),
                                      ({"custom_id": "x", "method": "GET", "url": "/v1/images/generations",
                                        "body": {}}, "invalid_method"),
                                      (line("a", {}), "duplicate_custom_id"),
                                      ({"method": "POST"}, "missing_custom_id")])
def test_a_batch_with_a_bad_line_fails_and_says_which(alice, receiver, bad, code):
    batch = run_batch(alice, [line("a", {"prompt": "1"}), bad])
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors.data[0].code == code and batch.errors.data[0].line == 2
    assert batch.output_file_id is None and batch.error_file_id is None
    (body, headers), = receiver.wait_for(batch.id)
    assert alice.webhooks.unwrap(body, headers).type == "batch.failed"


def test_cancel_skips_the_lines_not_run(alice, receiver):
    lines = [line(f"r{i}", {"prompt": str(i % 10), "seed": i, "steps": 200}) for i in range(40)]
    batch = run_batch(alice, lines)
    cancelling = alice.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    final = wait_final(alice, batch.id)
    assert final.status == "cancelled" and final.cancelled_at and final.cancelling_at
    done = final.request_counts.completed
    assert done < 40 and final.request_counts.failed == 0
    assert done == (len(content_lines(alice, final.output_file_id)) if final.output_file_id else 0)
    (body, headers), = receiver.wait_for(batch.id)
    assert alice.webhooks.unwrap(body, headers).type == "batch.cancelled"
    with pytest.raises(openai.ConflictError):
        alice.batches.cancel(batch.id)


def test_batch_progress_is_in_metrics(server, alice):
    batch = run_batch(alice, [line(f"m{i}", {"prompt": "2", "seed": i, "steps": 2}) for i in range(3)])
    wait_final(alice, batch.id)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    for series in ('dmp_batch_lines{state="queued"}', 'dmp_batch_lines{state="running"}',
                   'dmp_batch_lines_answered_total{kind="completed"}', "dmp_batch_oldest_pending_seconds",
                   'dmp_batches_finished_total{status="completed"}',
                   'dmp_webhook_deliveries_total{outcome="delivered"}'):
        assert series in text, series
    answered = [ln for ln in text.splitlines() if ln.startswith('dmp_batch_lines_answered_total{kind="completed"}')]
    assert float(answered[0].split()[-1]) >= 3


@pytest.mark.parametrize("name", ["file-" + "0" * 24 + "x", "file-../../x", "%2e%2e%2fbatches"])
def test_an_id_that_was_never_made_is_404(alice, name):
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(name)
    with pytest.raises(openai.NotFoundError):
        alice.files.delete(name)
    with pytest.raises(openai.NotFoundError):
        alice.batches.retrieve(name.replace("file-", "batch_"))


@pytest.mark.parametrize("method,path,allow", [("PUT", "/v1/files", "GET, POST"), ("PUT", "/v1/batches", "GET, POST"),
                                               ("POST", "/v1/batches/batch_x", "GET")])
def test_a_known_route_with_another_method_is_405(server, method, path, allow):
    reply = httpx.request(method, server.url + path, headers={"Authorization": "Bearer alice-key-0123456789abcdef"})
    assert reply.status_code == 405 and reply.headers["allow"] == allow
    assert reply.json()["error"]["code"] == "method_not_allowed"


def test_the_files_live_under_the_configured_dir(server, alice):
    file = alice.files.create(file=("in.jsonl", jsonl([line("x", {"prompt": "1"})])), purpose="batch")
    assert (server.batch_dir / "files" / f"{file.id}.data").read_bytes() == jsonl([line("x", {"prompt": "1"})])
    assert alice.files.delete(file.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(file.id)


def test_webhook_retried_with_backoff_until_delivered(class_only_dirs, tmp_path):
    receiver = Receiver(fail=2)
    proc = ServerProcess({"DMP_MODEL_DIR": str(class_only_dirs["models"]),
                          "DMP_PATCH_DIR": str(class_only_dirs["patches"]), "DMP_TORCH_THREADS": "1",
                          "DMP_BATCH_DIR": str(tmp_path / "batch"), "DMP_WARMUP": "false",
                          "DMP_WEBHOOK_URL": receiver.url, "DMP_WEBHOOK_SECRET": WEBHOOK_SECRET}, tmp_path / "log")
    try:
        proc.wait_ready()
        oai = client(proc, "unused")
        batch = wait_final(oai, run_batch(oai, [line("x", {"prompt": "1", "steps": 2})]).id)
        received = receiver.wait_for(batch.id, count=3, timeout=30)
        assert len(received) == 3
        assert len({h["webhook-id"] for _, h in received}) == 1  # one event, sent again: receivers can dedupe
        assert oai.webhooks.unwrap(*received[-1]).type == "batch.completed"
        time.sleep(0.3)  # the log entry of the last attempt is written after the receiver answered
        log = httpx.get(f"{proc.url}/v1/batches/{batch.id}/webhook_deliveries").json()["data"]
        assert [d["outcome"] for d in log] == ["retry", "retry", "delivered"]
        assert log[2]["at"] - log[0]["at"] >= 2  # backoff 1 s then 2 s
    finally:
        proc.stop()
        receiver.close()


@pytest.mark.parametrize("env", [{"DMP_WEBHOOK_URL": "file:///etc/passwd", "DMP_WEBHOOK_SECRET": WEBHOOK_SECRET},
                                 {"DMP_WEBHOOK_URL": "http://127.0.0.1:9/", "DMP_WEBHOOK_SECRET": "not-whsec"},
                                 {"DMP_WEBHOOK_URL": "http://127.0.0.1:9/"}])
def test_a_bad_webhook_setting_stops_the_start(class_only_dirs, tmp_path, env):
    proc = ServerProcess({"DMP_MODEL_DIR": str(class_only_dirs["models"])} | env, tmp_path / "log")
    assert proc.proc.wait(timeout=60) == 2
    assert "DMP_WEBHOOK" in (tmp_path / "log").read_text()


def test_unanswered_lines_resume_after_a_restart(class_only_dirs, tmp_path):
    """Embedded: a killed process leaves its batch on disk; the next one answers the lines still missing."""
    env = {"DMP_MODEL_DIR": str(class_only_dirs["models"]), "DMP_PATCH_DIR": str(class_only_dirs["patches"]),
           "DMP_TORCH_THREADS": "1", "DMP_BATCH_DIR": str(tmp_path / "batch"), "DMP_WARMUP": "false"}
    first = ServerProcess(env, tmp_path / "first.log")
    first.wait_ready()
    oai = client(first, "unused")
    lines = [line(f"r{i}", {"prompt": str(i % 10), "seed": i, "steps": 100}) for i in range(12)]
    batch = run_batch(oai, lines)
    deadline = time.monotonic() + 60
    while oai.batches.retrieve(batch.id).request_counts.completed < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.stop()  # SIGKILL
    second = ServerProcess(env, tmp_path / "second.log")
    try:
        second.wait_ready()
        oai = client(second, "unused")
        final = wait_final(oai, batch.id)
        assert final.status == "completed" and final.request_counts.completed == 12
        out = content_lines(oai, final.output_file_id)
        assert sorted(x["custom_id"] for x in out) == sorted(f"r{i}" for i in range(12))
        sync = oai.images.generate(prompt="5", extra_body={"seed": 5, "steps": 100})
        assert json.loads(json.dumps(out[5]))["response"]["body"]["data"][0]["b64_json"] == sync.data[0].b64_json
    finally:
        second.stop()


def test_a_server_that_stores_nothing_makes_no_batch_dir(class_only_dirs, tmp_path):
    with asgi_client(class_only_dirs, batch_dir=tmp_path / "batch", warmup=False) as c:
        wait_ready(c)
        assert c.get("/v1/batches").json()["data"] == [] and c.get("/v1/files").json()["data"] == []
        assert c.get("/v1/files/file-" + "0" * 24).status_code == 404
    assert not (tmp_path / "batch").exists()


def test_a_line_sees_only_the_patches_of_its_owner_keys_tenant(server, alice, bob, class_only_dirs):
    """A batch line runs as its batch's owner: another tenant's patch is an unknown model there, as it is live."""
    patch = make_patch_bytes(class_only_dirs["bases"]["digits"], "digits", seed=77)
    put = httpx.put(server.url + "/patches/alices-digits?owner=alice", content=patch,
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/octet-stream"})
    assert put.status_code == 201, put.text
    body = {"model": "alices-digits", "prompt": "4", "seed": 5, "steps": 2}
    mine = wait_final(alice, run_batch(alice, [line("mine", body)]).id)
    theirs = wait_final(bob, run_batch(bob, [line("theirs", body)]).id)
    assert mine.request_counts.completed == 1 and mine.output_file_id, mine
    assert theirs.request_counts.failed == 1 and theirs.output_file_id is None, theirs
    [refused] = content_lines(bob, theirs.error_file_id)
    assert refused["response"]["status_code"] == 404
    assert refused["response"]["body"]["error"]["code"] == "model_not_found"
