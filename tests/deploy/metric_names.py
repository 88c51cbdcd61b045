"""Metric names: documented (docs/metrics.md), exported (a live /metrics), and used.

The deployment files (alert rules, the Grafana dashboard) may only query names that
docs/metrics.md lists. `dashboard_unknown_names(known)` is that check for the dashboard,
for any set of known names: `documented_names()`, or `exported_names(text)` of a live
server's /metrics.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
METRICS_DOC = REPO / "docs" / "metrics.md"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "fractal.json"

# Series a histogram or summary adds to its name.
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana's variables, replaced by values that make a panel query plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$deadline_ms": "50"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*+(?!\s*\()")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
}


def documented_names(doc: Path = METRICS_DOC) -> set[str]:
    """Names in the first column of docs/metrics.md's table."""
    names = set()
    for line in doc.read_text().splitlines():
        match = re.match(r"\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|", line)
        if match:
            names.add(match.group(1))
    return names


def exported_names(metrics_text: str) -> set[str]:
    """Names a Prometheus text exposition declares, as queries spell them."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "info":
            names.add(family.name + "_info")
    return names


def plain_promql(expr: str) -> str:
    """A Grafana query with its variables replaced, so Prometheus can parse it."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def promql_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a lexical scan; enough for our files)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _GROUPING.sub("", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def unknown_names(used: Iterable[str], known: set[str]) -> set[str]:
    """Names in `used` that are neither in `known` nor a histogram series of one."""
    unknown = set()
    for name in used:
        bases = {name} | {name.removesuffix(s) for s in SERIES_SUFFIXES if name.endswith(s)}
        if not bases & known:
            unknown.add(name)
    return unknown


def dashboard_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every PromQL query of a dashboard (panel targets and template variables), by where."""
    queries: dict[str, str] = {}
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            queries[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((\w+)\s*,\s*\w+\)", query)
        queries[f"variable {variable['name']!r}"] = match.group(1) if match else query
    return queries


def dashboard_unknown_names(known: set[str], path: Path = DASHBOARD) -> dict[str, set[str]]:
    """Queries of the dashboard at `path` that select names outside `known`, by where."""
    unknown = {
        where: unknown_names(promql_names(expr), known)
        for where, expr in dashboard_queries(json.loads(path.read_text())).items()
    }
    return {where: names for where, names in unknown.items() if names}
