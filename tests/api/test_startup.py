"""A process that cannot serve exits non-zero with the reason in its log; JSON logs carry the request id."""
from __future__ import annotations

import json

import httpx


def test_no_servable_base_exits_1_with_the_reason(start_server, tmp_path):
    (tmp_path / "empty").mkdir()
    server = start_server(wait=False, model_dir=tmp_path / "empty", patch_dir=tmp_path / "empty")
    assert server.proc.wait(timeout=120) == 1
    log = server.log.read_text()
    assert "no servable base model in" in log and "start failed, exiting" in log


def test_guessable_admin_token_exits_2_without_logging_it(start_server, class_only_dirs):
    server = start_server(wait=False, model_dir=class_only_dirs["models"], admin_token="s3cret")
    assert server.proc.wait(timeout=60) == 2
    log = server.log.read_text()
    assert "invalid settings" in log and "DMP_ADMIN_TOKEN" in log and "at least 16 characters" in log
    assert "s3cret" not in log


def test_json_log_lines_carry_the_request_id(start_server, class_only_dirs):
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"],
                          log_format="json", warmup="false")
    reply = httpx.post(server.url + "/generate", json={"class_label": 3, "steps": 2, "seed": 1},
                       headers={"X-Request-ID": "req-42", "Accept": "application/json"}, timeout=60)
    assert reply.status_code == 200 and reply.headers["X-Request-ID"] == "req-42"
    missing_reply = httpx.get(server.url + "/patches/nope", timeout=10)
    assert missing_reply.status_code == 404
    server.stop()
    lines = [json.loads(line) for line in server.log.read_text().splitlines()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    (generate,) = [line for line in lines if "POST /generate" in line["message"]]
    assert generate["request_id"] == "req-42" and generate["logger"] == "uvicorn.access"
    (missing,) = [line for line in lines if "GET /patches/nope" in line["message"]]
    assert missing["request_id"] == missing_reply.headers["X-Request-ID"]  # none given: the generated one
    assert not any("request_id" in line for line in lines if "engine ready" in line["message"])
