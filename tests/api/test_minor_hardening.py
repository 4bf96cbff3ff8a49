"""Minor red-team findings: HEAD on probes, uploaded files' mode, an aborted upload is a warning, not a trace."""
from __future__ import annotations

import socket
import stat
import time

from conftest import ADMIN_TOKEN, asgi_client, copy_dirs, make_patch_bytes, wait_ready

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/octet-stream"}


def test_head_on_probes(client):
    for path in ("/health/live", "/health/ready"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)


def test_uploaded_file_takes_the_directory_mode(class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    dirs["patches"].chmod(0o755)
    with asgi_client(dirs, admin_token=ADMIN_TOKEN, warmup=False) as c:
        wait_ready(c)
        data = make_patch_bytes(class_only_dirs["bases"]["digits"], "digits", seed=3)
        assert c.put("/patches/uploaded", content=data, headers=AUTH).status_code == 201
    assert stat.S_IMODE((dirs["patches"] / "uploaded.safetensors").stat().st_mode) == 0o644


def test_aborted_upload_logs_a_warning_without_traceback(start_server, class_only_dirs, tmp_path):
    dirs = copy_dirs(class_only_dirs, tmp_path)
    server = start_server(model_dir=dirs["models"], patch_dir=dirs["patches"], admin_token=ADMIN_TOKEN,
                          warmup="false")
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"PUT /patches/aborted HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
                  "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n".encode() + b"x" * 5000)
        time.sleep(0.5)
    end = time.monotonic() + 10
    while "aborted by the client" not in server.log.read_text():
        assert time.monotonic() < end, server.log.read_text()[-2000:]
        time.sleep(0.1)
    log = server.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-2000:]
    assert not (dirs["patches"] / "aborted.safetensors").exists()
