"""Grafana annotations: a run's scenario start and end and each policy's run, posted with
grafana-client when GRAFANA_URL is set (GRAFANA_TOKEN, or GRAFANA_USER and
GRAFANA_PASSWORD, authenticate). The dashboards show annotations tagged "dualpath".

An annotation is a convenience: a Grafana that cannot be reached or refuses one is reported
once, and the run goes on without annotations.
"""

from __future__ import annotations

import os
import sys
import time

TAG = "dualpath"


class Annotator:
    def __init__(self, url: str, credential: str | tuple[str, str] | None = None):
        from grafana_client import GrafanaApi   # only needed when Grafana is configured
        self.url = url
        self.api = GrafanaApi.from_url(url, credential=credential, timeout=5)
        self.failed = False

    def post(self, text: str, *tags: str, start: float | None = None,
             end: float | None = None) -> None:
        """One annotation at `start` (now if None), spanning to `end` if given."""
        if self.failed:
            return
        start = time.time() if start is None else start
        try:
            self.api.annotations.add_annotation(
                time_from=int(start * 1000), time_to=int(end * 1000) if end else None,
                tags=[TAG, *tags], text=text)
        except Exception as exc:      # any failure of an optional side channel: say so once
            self.failed = True
            print(f"warning: Grafana at {self.url} did not take an annotation ({exc}); "
                  "going on without annotations", file=sys.stderr, flush=True)


def annotator_from_env() -> Annotator | None:
    url = os.environ.get("GRAFANA_URL")
    if not url:
        return None
    token = os.environ.get("GRAFANA_TOKEN")
    user, password = os.environ.get("GRAFANA_USER"), os.environ.get("GRAFANA_PASSWORD")
    return Annotator(url, token or ((user, password) if user and password else None))
