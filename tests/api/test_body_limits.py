"""No body is read before it is allowed (issue 25 item 2), against a real uvicorn server: a 400 MiB chunked body
without credentials is answered 401 at once and the server's memory does not move; an allowed body past its
route's cap is answered 413 as it streams."""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

KEY = "sk-edge-0123456789"
ADMIN = "admin-token-0123456789"
CHUNK = 1024 * 1024
BIG = 400  # chunks of 1 MiB: the 400 MiB body of the issue


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB."""
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def stream_body(url: str, method: str, path: str, headers: dict[str, str], prefix: bytes = b'{"prompt": "'
                ) -> tuple[int, bytes, float, int]:
    """Send a chunked body of BIG MiB (stopping once the server answers or drops us):
    (status, the response head and body, seconds to the answer, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = "".join(f"{k}: {v}\r\n" for k, v in ({"Host": host, "Transfer-Encoding": "chunked",
                                                  "Content-Type": "application/json"} | headers).items())
    reply, answered_at = bytearray(), []

    def read() -> None:  # concurrently: the answer may come while we are still sending
        try:
            while chunk := sock.recv(65536):
                if not reply:
                    answered_at.append(time.perf_counter())
                reply.extend(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    started, sent = time.perf_counter(), 0
    sock.sendall(f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode())
    reader.start()
    payload = b"%x\r\n" % CHUNK + b"x" * CHUNK + b"\r\n"
    try:
        sock.sendall(b"%x\r\n" % len(prefix) + prefix + b"\r\n")
        for _ in range(BIG):
            if answered_at:
                break
            sock.sendall(payload)
            sent += CHUNK
        else:
            sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server closed the connection on its refusal
        pass
    reader.join(timeout=30)
    sock.close()
    assert reply, "no answer"
    status = int(reply.split(b" ", 2)[1])
    return status, bytes(reply), answered_at[0] - started, sent


@pytest.fixture
def guarded(start_server, class_only_dirs):
    keys = "edge:sha256:" + hashlib.sha256(KEY.encode()).hexdigest()
    return start_server(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"], api_keys=keys,
                        admin_token=ADMIN, max_patch_bytes=1024 * 1024, torch_threads=1)


def test_a_body_without_credentials_is_never_read(guarded):
    pid = guarded.proc.pid
    before = rss_mib(pid)
    cases = [("POST", "/v1/images/generations", {}, 401), ("POST", "/generate", {}, 401),
             ("POST", "/generate", {"Authorization": "Bearer sk-wrong"}, 401),
             ("PUT", "/patches/new", {"Authorization": f"Bearer {KEY}"}, 403),  # a key without the admin scope
             ("POST", "/v1/images/generations", {"Authorization": "Bearer " + ADMIN}, 401)]
    for method, path, headers, expected in cases:
        for _ in range(3):
            status, reply, seconds, sent = stream_body(guarded.url, method, path, headers)
            assert status == expected, reply[:500]
            assert seconds < 2 and sent < BIG * CHUNK / 4, (path, seconds, sent)
            assert b"connection: close" in reply.lower()
    after = rss_mib(pid)
    print(f"\nRSS before {before:.1f} MiB, after 15 refused 400 MiB bodies {after:.1f} MiB")
    assert after - before < 8
    assert b'"code":"missing_api_key"' in stream_body(guarded.url, "POST", "/v1/images/generations", {})[1]
    assert httpx.get(guarded.url + "/health/live").status_code == 200


def test_an_allowed_body_is_capped_as_it_streams(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    pid = guarded.proc.pid
    before = rss_mib(pid)
    for path in ("/generate", "/v1/images/generations"):
        status, reply, seconds, sent = stream_body(guarded.url, "POST", path, auth)
        assert status == 413 and seconds < 5 and sent < BIG * CHUNK / 4, (path, reply[:300], seconds, sent)
        assert b"payload_too_large" in reply
    admin = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/octet-stream"}
    status, reply, seconds, sent = stream_body(guarded.url, "PUT", "/patches/new", admin, prefix=b"\x00")
    assert status == 413 and b"payload_too_large" in reply and sent < 8 * CHUNK  # DMP_MAX_PATCH_BYTES = 1 MiB
    declared = httpx.post(guarded.url + "/generate", content=b"{" + b" " * 300_000 + b"}",
                          headers=auth | {"Content-Type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error_type"] == "payload_too_large"
    assert rss_mib(pid) - before < 8
    ok = httpx.post(guarded.url + "/generate", json={"model": "digits", "class_label": 1, "steps": 2}, headers=auth)
    assert ok.status_code == 200, ok.text  # an allowed small body still goes through
    assert httpx.get(guarded.url + "/patches/digits-dmp/gates").status_code == 401  # the gates routes need a key
    assert httpx.get(guarded.url + "/patches/digits-dmp/gates", headers=auth).status_code == 200
