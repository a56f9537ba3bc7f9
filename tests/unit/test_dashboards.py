"""The Grafana dashboards and provisioning are well formed. No Grafana runs here: each
dashboard is loaded through grafana-foundation-sdk (Grafana 11.3's schema as Python models)
and must come back unchanged in what Grafana reads, with a panel plugin and a Prometheus
query it knows. That every query returns data is checked against a real Prometheus in
tests/integration/test_observability.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard as sdk
from grafana_foundation_sdk.models.prometheus import Dataquery as PrometheusQuery

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
FILES = sorted(DASHBOARDS.glob("*.json"))
register_default_plugins()
# Grafana's per-second units: a panel in one of these shows an absolute rate.
PER_SECOND_UNITS = {"Bps", "binBps", "bps", "binbps", "pps", "ops", "reqps", "rps", "wps",
                    "iops", "cps", "KBs", "MBs", "GBs", "Kbits", "Mbits", "Gbits"}
RATE = re.compile(r"\b(?:rate|irate|increase)\(")
# The rate times the TDF, as a scalar or joined on the topology.
TIMES_DILATION = re.compile(r"\*\s*(?:scalar\(\s*max\(\s*)?(?:on\s*\([\w\s,]*\)\s*"
                            r"group_left\s*(?:\([\w\s,]*\)\s*)?)?dualpath_time_dilation\b")


def provisioned_datasource() -> dict:
    config = yaml.safe_load((DASHBOARDS / "provisioning/datasources/prometheus.yml").read_text())
    [source] = config["datasources"]
    return source


def test_the_three_dashboards_are_there():
    assert {json.loads(f.read_text())["title"] for f in FILES} == {"Fabric", "DualPath", "Requests"}


def test_provisioning_files_parse_and_point_at_the_dashboards():
    source = provisioned_datasource()
    assert source["type"] == "prometheus" and source["uid"]
    config = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/dualpath.yml").read_text())
    [provider] = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/var/lib/grafana/dashboards")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_a_dashboard_loads_through_the_grafana_11_models_unchanged(path):
    data = json.loads(path.read_text())
    model = sdk.Dashboard.from_json(data)
    back = json.loads(json.dumps(model.to_json(), default=lambda o: o.to_json()))
    assert back["uid"] == data["uid"] and back["title"] == data["title"]
    assert [v["name"] for v in back["templating"]["list"]] == ["scenario", "node"]
    uid = provisioned_datasource()["uid"]
    for panel, loaded, original in zip(model.panels, back["panels"], data["panels"]):
        assert cogruntime.panelcfg_config(original["type"]) is not None, original["type"]
        assert loaded["type"] == original["type"] and loaded["gridPos"] == original["gridPos"]
        assert panel.datasource.uid == uid, original["title"]
        assert panel.targets, f"{original['title']}: no query"
        for query, target in zip(panel.targets, original["targets"]):
            assert isinstance(query, PrometheusQuery), original["title"]
            assert query.expr == target["expr"] and query.datasource.uid == uid


def panel_queries() -> list[tuple[dict, str]]:
    """(panel, query) of every panel of every dashboard."""
    return [(panel, target["expr"]) for path in FILES
            for panel in json.loads(path.read_text())["panels"] for target in panel["targets"]]


def is_absolute_rate(expr: str) -> bool:
    """A counter's rate over wall time, in its own units: not a histogram's (a latency) and
    not divided by anything (a utilization or a max/avg ratio, where wall time cancels)."""
    unquoted = re.sub(r'"[^"]*"', '""', expr)
    return bool(RATE.search(unquoted)) and "_bucket" not in unquoted and "/" not in unquoted


def test_absolute_rates_are_multiplied_by_the_time_dilation_into_emulated_time():
    rates = [(panel, expr) for panel, expr in panel_queries() if is_absolute_rate(expr)]
    assert rates
    for panel, expr in rates:
        assert TIMES_DILATION.search(expr), f"{panel['title']}: wall rate in {expr}"
        assert "emulated" in panel["title"] + panel["description"], panel["title"]
    for panel, _ in panel_queries():
        shows_rates = all(is_absolute_rate(target["expr"]) for target in panel["targets"])
        assert (panel["fieldConfig"]["defaults"]["unit"] in PER_SECOND_UNITS) == shows_rates, \
            panel["title"]


def test_utilizations_ratios_and_latencies_are_left_undilated():
    others = [(panel, expr) for panel, expr in panel_queries() if not is_absolute_rate(expr)]
    utilizations = [expr for _, expr in others if "dualpath_link_rate_bytes" in expr]
    assert utilizations and all("/" in expr for expr in utilizations)
    for panel, expr in others:
        assert "dualpath_time_dilation" not in expr, panel["title"]
