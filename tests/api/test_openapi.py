"""OpenAPI: every route declares its errors; schemathesis over /openapi.json against a real server finds no 5xx."""
from __future__ import annotations

import shutil
import subprocess
import sys

import httpx
from conftest import ADMIN_TOKEN


def test_every_route_declares_its_errors(client):
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "500" in codes, (method, path)
            for code in codes - {"200", "201"}:
                schema = op["responses"][code]["content"]["application/json"]["schema"]
                body = "OpenAIErrorBody" if path.startswith("/v1/") else "ErrorBody"  # OpenAI's shape there
                assert schema == {"$ref": f"#/components/schemas/{body}"}, (method, path, code)
    assert {"400", "404", "422", "429", "503"} <= set(spec["paths"]["/generate"]["post"]["responses"])
    assert {"401", "413", "415", "422"} <= set(spec["paths"]["/patches/{name}"]["put"]["responses"])


def test_schemathesis_finds_no_server_error(start_server, class_only_dirs, tmp_path):
    shutil.copytree(class_only_dirs["patches"], tmp_path / "patches")
    server = start_server(model_dir=class_only_dirs["models"], patch_dir=tmp_path / "patches",
                          admin_token=ADMIN_TOKEN, warmup="false", max_steps=20)
    cli = shutil.which("schemathesis", path=str(__import__("pathlib").Path(sys.executable).parent))
    # positive_data_acceptance is excluded: the schema cannot express "caption only on text models" or
    # "bytes must be a valid patch", so schema-valid requests are rightly refused with 4xx.
    proc = subprocess.run([cli, "run", server.url + "/openapi.json", "--max-examples", "10", "-w", "1",
                           "--seed", "7", "-H", f"Authorization: Bearer {ADMIN_TOKEN}",
                           "--exclude-checks", "positive_data_acceptance"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its report dir
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert httpx.get(server.url + "/health/ready").status_code == 200
