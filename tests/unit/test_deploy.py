"""The Grafana dashboard and Prometheus config refer only to metrics the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from proxygate.config import GatewaySettings
from proxygate.observability.logging import AccessLog
from proxygate.wiring import build_gateway

ROOT = Path(__file__).resolve().parents[2]


def exported_names() -> set[str]:
    gw = build_gateway(GatewaySettings(), access_log=AccessLog("json", stream=open("/dev/null", "w")))  # noqa: SIM115
    names = set()
    for metric in gw.metrics.registry.collect():
        names.add(metric.name)
        names.update(s.name for s in metric.samples)
    return names


def test_dashboard_queries_use_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "proxygate.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 12
    names = exported_names()
    for expr in exprs:
        for name in re.findall(r"\b((?:proxy|inference|rate)_[a-z_]+)\b", expr):
            # Families are named without their sample suffixes (`_total`, `_bucket`).
            base = name.removesuffix("_total").removesuffix("_bucket")
            assert name in names or base in names, (name, expr)


def test_prometheus_scrapes_the_gateway() -> None:
    text = (ROOT / "deploy" / "prometheus.yml").read_text()
    assert "gateway:8080" in text
