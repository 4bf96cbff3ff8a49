"""deploy/ checked by the real tools: promtool, kubectl's kustomize + kubernetes-validate, hadolint, compose schema.

Each test skips, saying why, only when its tool is missing here; `.ci/run` installs them all.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .conftest import REPO

DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
K8S_VERSIONS = ("1.29.0", "1.37.0")


def tool(name: str) -> str:
    """Path of a command-line tool: on PATH or beside this Python (pip-installed ones)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed here (.ci/run installs it)")
    return path


def run(*cmd, **kw) -> str:
    """Run a tool; fail the test with its output unless it exits 0."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_promtool_check_config_compose():
    out = run(tool("promtool"), "check", "config", PROMETHEUS / "prometheus.yml")
    assert "SUCCESS: 2 rule files found" in out


def test_promtool_check_config_k8s():
    promtool = tool("promtool")
    proc = subprocess.run([promtool, "check", "config", PROMETHEUS / "prometheus-k8s.yml"], capture_output=True,
                          text=True, timeout=60)
    if "field kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        pytest.skip("this promtool is built without Kubernetes discovery (Debian's); the rules it loads are "
                    "checked by test_promtool_check_rules")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules():
    rules = sorted((PROMETHEUS / "rules").glob("*.yml"))
    out = run(tool("promtool"), "check", "rules", *rules)
    assert out.count("SUCCESS") == len(rules) == 2


def test_promtool_test_rules():
    out = run(tool("promtool"), "test", "rules", PROMETHEUS / "tests" / "dmp-alerts.test.yml")
    assert "SUCCESS" in out


@pytest.mark.parametrize("overlay", ["k8s", "keda"])
def test_kustomize_build_is_valid_kubernetes(overlay, tmp_path):
    """`kubectl kustomize` renders the overlay (with throwaway secret files) and every object validates."""
    kubectl = tool("kubectl")
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("*.env"))
    secrets = tmp_path / "deploy" / "k8s" / "secrets"
    (secrets / "admin.env").write_text("DMP_ADMIN_TOKEN=" + "ab" * 32 + "\n")
    (secrets / "redis.env").write_text("REDIS_PASSWORD=" + "cd" * 32 + "\n")
    docs = [d for d in yaml.safe_load_all(run(kubectl, "kustomize", tmp_path / "deploy" / overlay)) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "Secret"} <= kinds
    secret_names = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert all(name.startswith(("dmp-admin-", "dmp-redis-")) for name in secret_names)  # generated, hashed
    server = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "dmp-server")
    referenced = {r["secretRef"]["name"] for r in server["spec"]["template"]["spec"]["containers"][0]["envFrom"]
                  if "secretRef" in r}
    assert referenced <= secret_names  # kustomize rewrote the reference to the hashed name
    if overlay == "keda":
        assert "replicas" not in server["spec"] and "ScaledObject" in kinds  # the autoscaler owns the count
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            continue  # a KEDA custom resource: no schema in kubernetes-validate (checked in test_deploy_files)
        assert doc["metadata"].get("namespace", "dmp") == "dmp" or doc["kind"] == "Namespace"
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_hadolint_dockerfile():
    run(tool("hadolint"), REPO / "Dockerfile")


def test_compose_file_matches_the_compose_spec():
    run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", REPO / "docker-compose.yml")
