"""deploy/, Dockerfile and docker-compose.yml: they parse, agree with each other and with the real service."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.core.config import Settings

from .conftest import BASE_NAME, PATCH_NAME, REPO

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
K8S = DEPLOY / "k8s"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
CONFIG_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.json"),
                       REPO / "docker-compose.yml"])
# Labels Prometheus attaches at scrape time, so the service never exports them.
SCRAPE_LABELS = {"instance", "job"}


def load(path: Path) -> list:
    """Every document of a YAML or JSON file."""
    text = path.read_text()
    return [json.loads(text)] if path.suffix == ".json" else [d for d in yaml.safe_load_all(text) if d is not None]


def k8s(kind: str, name: str) -> dict:
    docs = [d for p in K8S.glob("*.yaml") for d in load(p)]
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def rules(kind: str) -> list[dict]:
    """Every recording (kind="record") or alerting (kind="alert") rule of deploy/prometheus/rules/."""
    return [r for path in RULES for g in load(path)[0]["groups"] for r in g["rules"] if kind in r]


def pod_specs() -> list[tuple[str, dict]]:
    """(name, pod spec) of every workload in namespace dmp: deploy/k8s and the training Job of deploy/train."""
    docs = [d for folder in ("k8s", "train") for p in (DEPLOY / folder).glob("*.yaml") for d in load(p)]
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs if d["kind"] in ("Deployment", "Job")]


def dashboard_queries() -> list[str]:
    dash = load(DASHBOARD)[0]
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: selectors `name{` / `name[` and label_values(name, ...)."""
    return (set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", expr))
            | set(re.findall(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", expr)))


def grouping_labels(expr: str) -> set[str]:
    """Labels a query groups by or reads: `by (a, b)` and label_values(metric, label)."""
    labels = {lab.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for lab in group.split(",")}
    labels |= set(re.findall(r"label_values\(\s*[a-zA-Z_:][a-zA-Z0-9_:]*\s*,\s*([a-zA-Z_]+)", expr))
    return labels - {""}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_file_parses(path):
    docs = load(path)
    assert docs and all(isinstance(d, (dict, list)) for d in docs)  # a list: a JSON 6902 patch


@pytest.fixture(scope="module")
def exposition(server) -> dict[str, set[str]]:
    """{series name: label names seen} from the live /metrics after real traffic (ok, 4xx, patched)."""
    assert server.post_json("/generate", {"model": BASE_NAME, "class_label": 0, "seed": 1})[0] == 200
    assert server.post_json("/generate", {"model": BASE_NAME, "patch": PATCH_NAME, "class_label": 2})[0] == 200
    assert server.post_json("/generate", {"model": BASE_NAME, "seed": -1})[0] == 422
    status, body = server.get("/metrics")
    assert status == 200
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        # Families without samples yet (labelled, never observed) still declare their series names.
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "summary": ["_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_dashboard_queries_only_use_exported_metrics(exposition):
    queries = dashboard_queries()
    recorded = {r["record"]: r["expr"] for r in rules("record")}
    used = set().union(*map(metric_names, queries))
    assert len(used) >= 15, f"expected the dashboard to chart most dmp_* series, found {sorted(used)}"
    missing = sorted(used - set(exposition) - set(recorded) - {"up"})
    assert not missing, f"dashboard charts series neither exported nor recorded: {missing}"
    # what the recording and alerting rules read must be exported (or recorded) too
    for expr in [*recorded.values(), *(r["expr"] for r in rules("alert"))]:
        missing = sorted(metric_names(expr) - set(exposition) - set(recorded) - {"up"})
        assert not missing, f"{expr!r} reads series the service does not export: {missing}"


def test_dashboard_groups_by_labels_the_metrics_have(exposition):
    for expr in dashboard_queries():
        names = metric_names(expr)
        if ":" in "".join(names) or not all(exposition.get(n) for n in names):
            # recorded series are checked against a real Prometheus (test_prometheus_live.py); unobserved ones
            # (e.g. device memory on CPU) have no labels to check
            continue  # a series with no samples yet (e.g. device memory on CPU) has no labels to check
        have = set().union(*(exposition[n] for n in names)) | SCRAPE_LABELS
        assert grouping_labels(expr) <= have, f"{expr!r} groups by labels its series lack: {have}"


def test_dashboard_panels_are_laid_out_and_use_the_datasource_variable():
    dash = load(DASHBOARD)[0]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
    datasources = load(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]["datasources"]
    assert any(d["type"] == "prometheus" for d in datasources)


def test_k8s_sets_only_real_settings_and_commits_no_secret():
    fields = {f"DMP_{name.upper()}" for name in Settings.model_fields}
    config = k8s("ConfigMap", "dmp-config")["data"]
    (container,) = k8s("Deployment", "dmp-server")["spec"]["template"]["spec"]["containers"]
    env = {e["name"] for e in container["env"] if e["name"].startswith("DMP_")}
    assert set(config) | env <= fields, sorted((set(config) | env) - fields)
    assert "DMP_ADMIN_TOKEN" not in config
    # no Secret with a value in the repo: kustomize generates them from files git ignores
    docs = [d for p in DEPLOY.rglob("*.yaml") for d in load(p) if isinstance(d, dict)]
    assert not [d for d in docs if d.get("kind") in ("Secret", "ExternalSecret") and ("data" in d or "stringData" in d)]
    generated = load(K8S / "kustomization.yaml")[0]["secretGenerator"]
    assert {g["name"] for g in generated} == {"dmp-admin", "dmp-redis"}
    for g in generated:
        ignored = subprocess.run(["git", "check-ignore", "-q", str(K8S / g["env"])], cwd=REPO)
        assert ignored.returncode == 0, f"{g['env']} must be git-ignored: it holds a secret value"


def test_k8s_deployment_probes_gpu_and_drain():
    pod = k8s("Deployment", "dmp-server")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # SIGKILL must not come before the preStop sleep plus the drain have run.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(k8s("ConfigMap", "dmp-config")["data"]["DMP_DRAIN_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    refs = {r.get("configMapRef", r.get("secretRef"))["name"] for r in container["envFrom"]}
    assert refs == {"dmp-config", "dmp-admin"}
    env = {e["name"]: e for e in container["env"]}
    # the Redis URL carries the generated password, expanded from the variable declared before it
    names = list(env)
    assert names.index("REDIS_PASSWORD") < names.index("DMP_REDIS_URL")
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dmp-redis"
    redis_host = k8s("Service", "dmp-redis")["metadata"]["name"]
    assert env["DMP_REDIS_URL"]["value"] == f"redis://:$(REDIS_PASSWORD)@{redis_host}:6379/0"
    redis_args = k8s("Deployment", "dmp-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "volatile-lru"  # only TTL'd cache keys go
    kustomization = load(K8S / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")


def test_compose_two_replicas_share_redis_and_mounts_exist():
    compose = load(REPO / "docker-compose.yml")[0]
    services = compose["services"]
    replicas = [s for s in services.values() if "DMP_REDIS_URL" in s.get("environment", {})]
    assert len(replicas) == 2
    assert {s["environment"]["DMP_REDIS_URL"] for s in replicas} == {"redis://redis:6379/0"}
    for svc in services.values():
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (REPO / host).exists(), f"compose mounts missing {host}"
    # Prometheus scrapes the replicas by their compose names on the port the image serves on.
    targets = load(DEPLOY / "prometheus/prometheus.yml")[0]["scrape_configs"][0]["static_configs"][0]["targets"]
    replica_names = {n for n, s in services.items() if s in replicas}
    assert {t.split(":")[0] for t in targets} == replica_names
    assert all(t.endswith(":8000") for t in targets)


def test_dockerfile_runs_the_contract_command_as_non_root():
    # One instruction per logical line: drop comments, join `\` continuations.
    text = "\n".join(ln for ln in (REPO / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#"))
    instructions = [" ".join(ins.split()) for ins in re.sub(r"\\\n", " ", text).splitlines() if ins.strip()]
    # the base is a build argument (not pinned here); both variants end in the one final stage
    args = dict(ln[len("ARG "):].split("=", 1) for ln in instructions if ln.startswith("ARG ") and "=" in ln)
    assert args["PYTHON_IMAGE"].startswith("python:3.11") and args["VARIANT"] == "cpu"
    stages = {ln.split()[-1]: ln.split()[1] for ln in instructions if ln.startswith("FROM ")}
    assert stages["base"] == "${PYTHON_IMAGE}" and stages["final"] == "deps-${VARIANT}"
    assert {"deps-cpu", "deps-cuda"} <= set(stages) and list(stages)[-1] == "final"
    cuda = "\n".join(instructions).split("AS deps-cuda")[1].split("FROM ")[0]
    assert re.search(r"apt-get install .*\bgcc\b", cuda), "Triton needs a C compiler in the CUDA image"
    users = [ln.split()[1] for ln in instructions if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    (cmd,) = [json.loads(ln[len("CMD "):]) for ln in instructions if ln.startswith("CMD ")]
    assert cmd == ["python", "-m", "app", "serve", "--host", "0.0.0.0", "--port", "8000"]
    # .dockerignore excludes everything, then lets back in exactly what is copied.
    allowed = {ln[1:].rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.startswith("!")}
    # models/ and patches/ are the trainer's outputs; a checkout without them cannot build the image yet.
    for src in re.findall(r"^COPY (?:--\S+ )*(\S+) ", "\n".join(instructions), flags=re.M):
        assert (REPO / src).exists() or src in {"models", "patches"}, f"Dockerfile copies missing {src}"
        assert src in allowed, f".dockerignore keeps {src} out of the build context"


def test_k8s_pods_meet_the_restricted_pod_security_standard():
    labels = k8s("Namespace", "dmp")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    allowed_volumes = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected", "downwardAPI",
                       "name"}
    assert {name for name, _ in pod_specs()} == {"dmp-server", "dmp-redis", "dmp-router", "dmp-train"}
    for name, pod in pod_specs():
        ctx = pod.get("securityContext", {})
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), name
        for volume in pod.get("volumes", []):
            assert set(volume) <= allowed_volumes, (name, volume)
        for c in pod["containers"] + pod.get("initContainers", []):
            c_ctx = c.get("securityContext", {})
            assert c_ctx.get("allowPrivilegeEscalation") is False and not c_ctx.get("privileged"), (name, c["name"])
            assert c_ctx.get("capabilities", {}).get("drop") == ["ALL"], (name, c["name"])
            assert set(c_ctx.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, (name, c["name"])
            assert c_ctx.get("runAsNonRoot", ctx.get("runAsNonRoot")) is True, (name, c["name"])
            assert c_ctx.get("runAsUser", ctx.get("runAsUser")) != 0, (name, c["name"])
            seccomp = c_ctx.get("seccompProfile", ctx.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), (name, c["name"])


def test_k8s_replicas_spread_and_autoscale_within_the_budget():
    pod = k8s("Deployment", "dmp-server")["spec"]["template"]["spec"]
    selector = {"app.kubernetes.io/name": "dmp-server"}
    assert any(t["labelSelector"]["matchLabels"] == selector for t in pod["topologySpreadConstraints"])
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    scaled = load(DEPLOY / "keda" / "scaledobject.yaml")[0]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "dmp-server"
    budget = k8s("PodDisruptionBudget", "dmp-server")["spec"]["minAvailable"]
    assert scaled["spec"]["minReplicaCount"] > budget  # else the budget blocks every node drain
    (trigger,) = scaled["spec"]["triggers"]
    assert "dmp_inflight" in trigger["metadata"]["query"] or "dmp_queue_depth" in trigger["metadata"]["query"]
    # scale-down waits longer than a replica takes to drain (preStop + DMP_DRAIN_SECONDS)
    (container,) = pod["containers"]
    drain = int(container["lifecycle"]["preStop"]["exec"]["command"][-1]) + float(
        k8s("ConfigMap", "dmp-config")["data"]["DMP_DRAIN_SECONDS"])
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert behavior["stabilizationWindowSeconds"] > drain and behavior["policies"][0]["periodSeconds"] > drain


def test_prometheus_configs_load_the_rules_and_every_alert_has_a_unit_test():
    for name in ("prometheus.yml", "prometheus-k8s.yml"):
        assert load(DEPLOY / "prometheus" / name)[0]["rule_files"] == ["rules/*.yml"], name
    alerts = {r["alert"] for r in rules("alert")}
    assert {"DMPTargetDown", "DMPNotReady", "DMPGenerateErrors", "DMPGenerateSlow", "DMPQueueNearFull",
            "DMPRejectingRequests", "DMPPatchRefused", "DMPFusedKernelFallback"} <= alerts
    unit = load(DEPLOY / "prometheus" / "tests" / "dmp-alerts.test.yml")[0]
    firing = {t["alertname"] for case in unit["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert firing == alerts, f"alerts without a firing unit test: {sorted(alerts - firing)}"
