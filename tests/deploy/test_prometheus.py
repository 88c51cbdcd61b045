"""deploy/prometheus: promtool checks and rule unit tests, and (slow) a real Prometheus
scraping a live server on 127.0.0.1 with the project's rules loaded."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .local_services import classify, fractal_server, free_port, ready, running, wait_for
from .metric_names import (
    DASHBOARD,
    dashboard_queries,
    dashboard_unknown_names,
    documented_names,
    exported_names,
    plain_promql,
    promql_names,
    unknown_names,
)

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
ALERTS = {
    "FractalServerDown",
    "FractalNotReady",
    "FractalDeadlineMisses",
    "FractalLatencyNearDeadline",
    "FractalSheddingSustained",
    "FractalServedAccuracyFalling",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package prometheus; make system)")
    return path


def promtool(*args: str | Path) -> None:
    result = subprocess.run(
        [tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def test_promtool_check_config() -> None:
    promtool("check", "config", CONFIG)


def test_promtool_check_rules() -> None:
    promtool("check", "rules", RULES)


def test_alerts_fire_on_their_series() -> None:
    """alerts.test.yml: each alert fires on the series it is for, stays quiet otherwise."""
    tool("promtool")
    result = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_the_issue_asks_for() -> None:
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    assert set(alerts) == ALERTS
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "for" in rule, f"{rule['alert']} would fire on one bad evaluation"


def test_rules_query_only_documented_metrics() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set().union(*(promql_names(rule["expr"]) for rule in rules()))
    assert unknown_names(used, documented_names() | recorded | {"up"}) == set()
    assert recorded <= used, "every recording rule feeds an alert"


def test_scrape_config_loads_the_rules_and_scrapes_the_server() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert [PROMETHEUS_DIR / name for name in config["rule_files"]] == [RULES]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "fractal", "alerts.yml selects job=fractal"
    assert job.get("metrics_path", "/metrics") == "/metrics"


# --- a real Prometheus ----------------------------------------------------------------


def query(prometheus: str, promql: str) -> dict[str, Any]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5)
    body: dict[str, Any] = response.json()
    assert body["status"] == "success", f"{promql}: {body}"
    return body["data"]


def vector_value(prometheus: str, promql: str) -> float | None:
    data = query(prometheus, promql)
    return float(data["result"][0]["value"][1]) if data["result"] else None


@pytest.mark.slow
def test_prometheus_scrapes_a_live_server(tiny_bundle: Path, tmp_path: Path) -> None:
    """The project's scrape job and rules against a real server: samples arrive, the
    rules evaluate on real labels, and every dashboard query is valid PromQL there."""
    binary = tool("prometheus")
    with fractal_server(tiny_bundle, tmp_path / "server.log") as server:
        exported = exported_names(httpx.get(f"{server}/metrics", timeout=5).text)
        assert unknown_names(documented_names(), exported) == set(), "docs/metrics.md vs /metrics"

        config = yaml.safe_load(CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(RULES)]
        config["scrape_configs"][0]["static_configs"] = [
            {"targets": [server.removeprefix("http://")]}
        ]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        command = [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        log = tmp_path / "prometheus.log"
        with running(command, log) as process:
            prometheus = f"http://127.0.0.1:{port}"
            wait_for(ready(f"{prometheus}/-/ready"), 60, "prometheus", process, log)
            # Traffic after the first scrape, so the counters' rates see it.
            wait_for(
                lambda: vector_value(prometheus, 'up{job="fractal"}'),
                30,
                "the first scrape",
                process,
                log,
            )

            requests = 12
            for _ in range(requests):
                assert classify(server, deadline_ms=5000).status_code == 200

            def served() -> float | None:
                value = vector_value(prometheus, 'sum(fractal_requests_total{job="fractal"})')
                return value if value is not None and value >= requests else None

            wait_for(served, 30, "fractal_requests_total through Prometheus", process, log)
            assert vector_value(prometheus, 'up{job="fractal"}') == 1
            assert vector_value(prometheus, 'fractal_ready{job="fractal"}') == 1

            # The recording rules see the server's real label sets: all deadlines met
            # (NaN, 0/0, until a scrape after the traffic is in the rate window).
            def miss_ratio() -> float | None:
                value = vector_value(prometheus, "fractal:deadline_miss_ratio:rate5m")
                return None if value is None or math.isnan(value) else value

            assert wait_for(miss_ratio, 30, "fractal:deadline_miss_ratio:rate5m", process, log) == 0

            loaded = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
            states = {r["name"]: r for g in loaded for r in g["rules"] if r["type"] == "alerting"}
            assert set(states) == ALERTS
            assert all(r["health"] == "ok" for g in loaded for r in g["rules"]), loaded

            assert dashboard_unknown_names(exported) == {}
            for expr in dashboard_queries(json.loads(DASHBOARD.read_text())).values():
                query(prometheus, plain_promql(expr))
