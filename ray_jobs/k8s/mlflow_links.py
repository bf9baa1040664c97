"""Links from a study's RayJob to its MLflow experiment, through the tracking server's REST API.

A study is one MLflow experiment (its ``metadata.name``, in the RayJob's ``ctssl.io/mlflow-experiment``
annotation) holding every pre-training run, the fine-tuning study's runs and the report; the link
is to that experiment's page, where the UI compares them.
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
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return f"(no MLflow experiment {experiment} yet)"
            if e.code in (401, 403):
                return "(MLflow login needed: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
            return f"(MLflow HTTP {e.code})"
        except (urllib.error.URLError, OSError, KeyError, json.JSONDecodeError) as e:
            return f"(MLflow unreachable at {self.base}: {getattr(e, 'reason', e)})"
        return f"{self.base}/#/experiments/{eid}"
