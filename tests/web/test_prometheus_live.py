"""A real Prometheus (Debian's) scrapes a real `python -m app serve`, loads deploy/prometheus/rules/ and
evaluates every dashboard query and every alert expression: no error, and data wherever this run made some."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import httpx
import pytest
import yaml

from .conftest import BASE_NAME, PATCH_NAME, TEXT_NAME, free_port, submit_one_line_batch
from .test_deploy_files import RULES, dashboard_queries, rules

SCRAPE_S = 1
# Dashboard series this run cannot produce, and why; every other query must return data.
NO_DATA_HERE = {
    "dmp_device_memory_bytes": "CUDA only; the test server runs on CPU",
    "dmp_requests_dropped_total": "no client leaves and no deadline passes",
    "dmp_result_cache_total": "no Redis, so no result cache",
    "dmp_images_cached": "no Redis, so no result cache",
    "dmp_patch_swaps_total": "no patch is replaced (admin routes are off here)",
    "dmp_patch_refusals_total": "no patch is refused (admin routes are off here)",
    "dmp_cuda_graph_forwards": "eager CPU steps: no CUDA graphs, DMP_CPU_COMPILE is off",
    "dmp_webhook_deliveries_total": "no DMP_WEBHOOK_URL here (tests/api/test_batches.py delivers webhooks)",
}


def grafana_to_promql(expr: str) -> str:
    """The query Grafana sends with every variable at `All` and a 1 m rate interval."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$model", ".*")


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus scraping `server` every second with the repo's rule files (group intervals cut to 1 s)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed here (.ci/run installs Debian's)")
    root = tmp_path_factory.mktemp("prometheus")
    for path in RULES:  # the same rules; only the evaluation interval is shortened so a test minute suffices
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            group["interval"] = f"{SCRAPE_S}s"
        (root / path.name).write_text(yaml.safe_dump(doc))
    target = server.url.removeprefix("http://")
    config = {"global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
              "rule_files": [str(root / p.name) for p in RULES],
              "scrape_configs": [{"job_name": "dmp", "static_configs": [{"targets": [target]}]}]}
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(root / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        until(lambda: query(url, 'up{job="dmp"}') == [1.0], 60, proc, root / "prometheus.log")
        traffic(server)
        time.sleep(3 * SCRAPE_S)
        traffic(server)  # a second round after a scrape: rate() sees an increase inside its window
        until(lambda: query(url, "instance_model_patch:dmp_images_generated:rate1m"), 30, proc,
              root / "prometheus.log")
        time.sleep(3 * SCRAPE_S)  # every rule group has evaluated on the new samples
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def traffic(server) -> None:
    """Ok, patched, text, cached-nothing and failing requests, plus probes and a scrape."""
    assert server.post_json("/generate", {"model": BASE_NAME, "class_label": 0, "seed": 1})[0] == 200
    assert server.post_json("/generate", {"model": BASE_NAME, "patch": PATCH_NAME, "class_label": 1})[0] == 200
    assert server.post_json("/generate", {"model": TEXT_NAME, "caption": "a circle", "seed": 2})[0] == 200
    assert server.post_json("/generate", {"model": BASE_NAME, "seed": -1})[0] == 422
    batch(server)
    assert server.get("/health/ready")[0] == 200 and server.get("/metrics")[0] == 200


def batch(server) -> None:
    """A one-line batch through the Batch API, waited for (its lines and its end are counted)."""
    created = submit_one_line_batch(server.url)
    end = time.monotonic() + 60
    while httpx.get(f"{server.url}/v1/batches/{created['id']}").json()["status"] != "completed":
        assert time.monotonic() < end, "the batch did not complete in 60 s"
        time.sleep(0.2)


def api(url: str, path: str, **params) -> dict:
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=30) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def query(url: str, promql: str) -> list[float]:
    """Instant query; the values (NaN included) of the result vector. Any PromQL error fails the test."""
    data = api(url, "query", query=promql)
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    return [float(r["value"][1]) for r in data["result"]]


def until(ready, timeout: float, proc, log) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
        try:
            if ready():
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f"prometheus: condition not met in {timeout}s:\n{log.read_text()[-3000:]}")


def test_rule_groups_load_and_evaluate_without_error(prometheus):
    groups = api(prometheus, "rules")["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    assert {r.get("record") or r.get("alert") for r in rules("record") + rules("alert")} == loaded
    broken = {r["name"]: r.get("lastError") for g in groups for r in g["rules"] if r["health"] != "ok"}
    assert not broken, broken


def test_every_dashboard_query_evaluates_with_data_where_expected(prometheus):
    empty = []
    for expr in dashboard_queries():
        if expr.startswith("label_values("):
            metric = expr[len("label_values("):].split(",")[0].strip()
            assert api(prometheus, "series", **{"match[]": metric}), f"{expr}: no series"
            continue
        if not query(prometheus, grafana_to_promql(expr)):
            empty.append(expr)
    unexplained = [e for e in empty if not any(name in e for name in NO_DATA_HERE)]
    assert not unexplained, f"dashboard queries with no data: {unexplained}"
    explained = [name for name in NO_DATA_HERE if any(name in e for e in dashboard_queries())]
    assert explained == list(NO_DATA_HERE), "NO_DATA_HERE lists series the dashboard no longer reads"


def test_error_ratio_reads_zero_when_healthy(prometheus):
    """Without a single error series the ratio is 0, not Grafana's "No data" (this run has no 5xx: ask for those)."""
    (expr,) = [e for e in dashboard_queries() if 'status=~"[45].."' in e]
    assert query(prometheus, grafana_to_promql(expr.replace('"[45].."', '"5.."'))) == [0.0]
    assert query(prometheus, grafana_to_promql(expr))[0] > 0  # the 422 of traffic() shows


def test_request_rates_leave_out_probes_and_scrapes(prometheus):
    routes = {r["metric"]["route"] for r in api(prometheus, "query",
                                                query="instance_route_status:dmp_requests:rate1m")["result"]}
    assert "/generate" in routes and not routes & {"/health/ready", "/health/live", "/metrics"}
    raw = {r["metric"]["route"] for r in api(prometheus, "query", query="dmp_requests_total")["result"]}
    assert {"/health/ready", "/metrics"} <= raw  # they were scraped: the recording rule dropped them


def test_every_alert_expression_evaluates(prometheus):
    """No error on real series; on a healthy server none fires (the unit tests make each one fire)."""
    for alert in rules("alert"):
        assert query(prometheus, alert["expr"]) == [], f"{alert['alert']} fires on a healthy server"
    firing = [a for a in api(prometheus, "alerts")["alerts"] if a["state"] == "firing"]
    assert not firing, firing
    # the alerts' inputs exist, so an empty result above means "healthy", not "no such series"
    for series in ('up{job="dmp"}', "dmp_ready", "dmp_inflight / dmp_max_queue", "dmp_fused_kernels",
                   "job:dmp_generate_requests:rate5m", "job_le:dmp_generate_seconds_bucket:rate5m"):
        assert query(prometheus, series), series
