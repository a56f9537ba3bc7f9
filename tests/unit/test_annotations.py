"""Annotations, posted to a local HTTP stand-in for Grafana: no Grafana can run here. The
real check, with `docker compose up grafana`, is in the README."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from testbed.annotations import Annotator, annotator_from_env


class StandIn(BaseHTTPRequestHandler):
    received: list[dict] = []
    status = 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.received.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                 "body": body})
        reply = json.dumps({"id": 1, "message": "Annotation added"}).encode()
        self.send_response(StandIn.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    StandIn.received, StandIn.status = [], 200
    server = HTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_annotations_reach_a_local_http_stand_in_for_grafana(stand_in, monkeypatch):
    monkeypatch.setenv("GRAFANA_URL", stand_in)
    monkeypatch.setenv("GRAFANA_USER", "admin")
    monkeypatch.setenv("GRAFANA_PASSWORD", "secret")
    annotator = annotator_from_env()
    annotator.post("policy basic on 1p1d", "scenario:quickstart", "policy", start=1000.5,
                   end=1010.25)
    [got] = StandIn.received
    assert got["path"] == "/api/annotations"
    assert got["auth"] == "Basic " + base64.b64encode(b"admin:secret").decode()
    body = got["body"]
    assert body["text"] == "policy basic on 1p1d"
    assert body["tags"] == ["dualpath", "scenario:quickstart", "policy"]
    assert body["time"] == 1_000_500 and body["timeEnd"] == 1_010_250


def test_a_grafana_refusing_annotations_is_reported_once_and_the_run_goes_on(stand_in, capsys):
    StandIn.status = 401
    annotator = Annotator(stand_in, ("admin", "wrong"))
    annotator.post("scenario start")
    annotator.post("scenario end")
    assert len(StandIn.received) == 1          # it stopped trying after the first refusal
    assert capsys.readouterr().err.count("did not take an annotation") == 1


def test_no_grafana_url_means_no_annotations(monkeypatch):
    monkeypatch.delenv("GRAFANA_URL", raising=False)
    assert annotator_from_env() is None


def test_each_fault_action_is_logged_with_its_time_and_annotated(stand_in, capsys):
    """The injector's log and annotation, on a cluster plan with no fabric behind it: the
    kill cannot be carried out (no agents), which is logged as the action's error."""
    from types import SimpleNamespace

    from testbed.faults import FaultSpec
    from testbed.injector import Injector
    from testbed.plan import build_plan
    from testbed.scenario import REPO
    from testbed.topology import load_topology

    plan = build_plan(load_topology(REPO / "topologies/1p1d-g2.yaml"))
    injector = Injector(SimpleNamespace(plan=plan), None, Annotator(stand_in),
                        tags=("policy:dualpath",))
    [event] = injector.apply(FaultSpec(kind="kill", target="n0g1", at=0))
    assert event["action"] == "n0g1 agent killed" and event["fault"] == "kill n0g1"
    assert "runs no agents" in event["error"] and 0 <= event["t"] < 5
    assert "fault at" in capsys.readouterr().out
    [got] = StandIn.received
    assert got["body"]["text"] == "fault: n0g1 agent killed"
    assert got["body"]["tags"] == ["dualpath", "fault", "policy:dualpath"]
