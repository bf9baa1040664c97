"""Links from a RayJob to its MLflow run, through the tracking server's REST API.

Each pre-training RayJob logs to the MLflow experiment named in its ``ctssl.io/mlflow-experiment``
annotation; the link is to that experiment's latest run (or the experiment while no run exists).
Plain urllib keeps `ctssl k8s status` light: no mlflow import for a table. A server that requires a
login (the chart's MLflow runs the basic-auth app) gets the one MLflow's own client would send:
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class MLflowLinks:
    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self._cache: dict[str, str] = {}

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if user and password:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(f"{self.base}{path}", data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read() or b"{}")

    def link(self, experiment: str) -> str:
        if experiment not in self._cache:
            self._cache[experiment] = self._lookup(experiment)
        return self._cache[experiment]

    def _lookup(self, experiment: str) -> str:
        try:
            q = urllib.parse.urlencode({"experiment_name": experiment})
            exp = self._request(f"/api/2.0/mlflow/experiments/get-by-name?{q}")["experiment"]
            eid = exp["experiment_id"]
            runs = self._request("/api/2.0/mlflow/runs/search", {
                "experiment_ids": [eid], "max_results": 1, "order_by": ["attributes.start_time DESC"]})
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return f"(no MLflow experiment {experiment} yet)"
            if e.code in (401, 403):
                return "(MLflow login needed: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
            return f"(MLflow HTTP {e.code})"
        except (urllib.error.URLError, OSError, KeyError, json.JSONDecodeError) as e:
            return f"(MLflow unreachable at {self.base}: {getattr(e, 'reason', e)})"
        found = runs.get("runs") or []
        if not found:
            return f"{self.base}/#/experiments/{eid}"
        return f"{self.base}/#/experiments/{eid}/runs/{found[0]['info']['run_id']}"
