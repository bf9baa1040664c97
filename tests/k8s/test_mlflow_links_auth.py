"""`ctssl k8s status --mlflow-url` against an MLflow server that requires a login (the chart's default):
it logs in as MLflow's client does, from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, and
says what is missing when they are not set."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ray_jobs.k8s.mlflow_links import MLflowLinks

LOGIN = "Basic " + base64.b64encode(b"ctssl-admin:s3cret-pass-word").decode()


class _AuthMLflow(BaseHTTPRequestHandler):
    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        if self.headers.get("Authorization") != LOGIN:
            return self._reply(401, {"error_code": "UNAUTHENTICATED"})
        if self.path.startswith("/api/2.0/mlflow/experiments/get-by-name"):
            return self._reply(200, {"experiment": {"experiment_id": "7", "name": "study-byol"}})
        if self.path.startswith("/api/2.0/mlflow/runs/search"):
            return self._reply(200, {"runs": [{"info": {"run_id": "abc123"}}]})
        return self._reply(404, {})

    do_GET = do_POST = _handle

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _AuthMLflow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def test_links_log_in_with_the_tracking_credentials(server, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ctssl-admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pass-word")
    assert MLflowLinks(server).link("study-byol") == f"{server}/#/experiments/7"


def test_without_credentials_the_link_says_a_login_is_needed(server, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert MLflowLinks(server).link("study-byol") == (
        "(MLflow login needed: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)")
