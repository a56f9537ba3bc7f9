"""The Grafana dashboards and provisioning are well formed. No Grafana runs here: each
dashboard is loaded through grafana-foundation-sdk (Grafana 11.3's schema as Python models)
and must come back unchanged in what Grafana reads, with a panel plugin and a Prometheus
query it knows. That every query returns data is checked against a real Prometheus in
tests/integration/test_observability.py."""

from __future__ import annotations

import json
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
