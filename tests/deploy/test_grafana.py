"""deploy/grafana: the provisioned datasource and the dashboard's panels and queries."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .metric_names import (
    DASHBOARD,
    dashboard_queries,
    dashboard_unknown_names,
    documented_names,
    plain_promql,
)

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "fractal.yaml"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_named(fragment: str) -> dict[str, Any]:
    panels = [p for p in dashboard()["panels"] if fragment.lower() in p["title"].lower()]
    assert len(panels) == 1, f"one panel titled like {fragment!r}, got {len(panels)}"
    return panels[0]


def exprs(panel: dict[str, Any]) -> str:
    return "\n".join(target["expr"] for target in panel["targets"])


def test_dashboard_queries_only_documented_metrics() -> None:
    assert dashboard_unknown_names(documented_names()) == {}


def test_name_check_catches_an_undocumented_metric() -> None:
    unknown = dashboard_unknown_names(documented_names() - {"fractal_queue_depth"})
    assert unknown == {"panel 'Queue depth by variant' A": {"fractal_queue_depth"}}


def test_panels_the_issue_asks_for() -> None:
    assert "fractal_request_duration_seconds_count" in exprs(panel_named("requests/s by column"))
    latency = exprs(panel_named("latency p50 / p99 by column"))
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.99," in latency
    assert "by (le, column)" in latency and "$deadline_ms" in latency
    outcomes = panel_named("met / missed / shed")
    assert "by (outcome) (rate(fractal_deadline_outcomes_total" in exprs(outcomes)
    assert "fractal_batch_size" in exprs(panel_named("batch size"))
    assert "fractal_queue_depth" in exprs(panel_named("queue depth"))
    admission = exprs(panel_named("concurrency limit"))
    assert "fractal_admission_limit" in admission and "fractal_admission_in_flight" in admission
    assert "fractal_deadline_close_share" in exprs(panel_named("deadlines tight"))


def test_panels_are_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip()
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
    variables = {v["name"] for v in board["templating"]["list"]}
    used = {
        name
        for expr in dashboard_queries(board).values()
        for name in variables
        if f"${name}" in expr
    }
    assert used == variables, "every variable is used by some query"


def test_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses each query (variables substituted) as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; make system)")
    queries = list(dashboard_queries(dashboard()).values())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": plain_promql(expr)}
                    for i, expr in enumerate(queries)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "dashboard.rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_points_at_the_dashboards() -> None:
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090", "the Compose service name"
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
