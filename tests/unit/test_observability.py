"""deploy/observability: every query of the Grafana dashboard and every alert names metrics the server exports.

The exported names come from a real registry: the default pipeline's stages bind their metrics
to it as the server's do (counters are scraped with ``_total``, histograms as ``_bucket``,
``_sum`` and ``_count``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.core.metrics import Metrics
from extproc.core.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "observability" / "grafana-dashboard.json"
RULES = ROOT / "deploy" / "observability" / "prometheus-rule.yaml"
_NAME = re.compile(r"\bmcp_extproc_[a-z0-9_]+\b")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> set[str]:
    """The series names a scrape of the server's registry can hold."""
    metrics = Metrics()
    Registry().build_pipeline(DEFAULT_PIPELINE, metrics)
    return {family.name + suffix for family in metrics.registry.collect() for suffix in _SUFFIXES[family.type]}


def dashboard_queries() -> list[str]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    assert (document["apiVersion"], document["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    return [rule for group in document["spec"]["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("expr", [*dashboard_queries(), *(rule["expr"] for rule in rules())])
def test_every_query_names_only_exported_metrics(expr: str) -> None:
    names = set(_NAME.findall(expr))
    assert names, f"{expr!r} names no mcp_extproc metric"
    assert names <= exported(), f"{expr!r} names {sorted(names - exported())}, which the server does not export"
    for opening, closing in ("()", "[]", "{}"):
        assert expr.count(opening) == expr.count(closing), f"{expr!r}: unbalanced {opening}{closing}"


def test_the_dashboard_covers_what_operators_look_at() -> None:
    queried = {name for expr in dashboard_queries() for name in _NAME.findall(expr)}
    for wanted in (
        "mcp_extproc_requests_total",
        "mcp_extproc_decisions_total",
        "mcp_extproc_decision_seconds_bucket",
        "mcp_extproc_stage_seconds_bucket",
        "mcp_extproc_keeper_sessions",
        "mcp_extproc_keeper_streams",
        "mcp_extproc_upstream_token_fetches_total",
        "mcp_extproc_config_reloads_total",
    ):
        assert wanted in queried


def test_every_alert_is_labelled_and_explained() -> None:
    found = rules()
    assert {rule["alert"] for rule in found} >= {
        "MCPExtProcStageFaults",
        "MCPExtProcConfigReloadRefused",
        "MCPExtProcTokenEndpointFailing",
        "MCPExtProcKeeperSessionsLost",
    }
    for rule in found:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
