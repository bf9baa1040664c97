"""A small Kubernetes API server on 127.0.0.1 for `ctssl k8s` tests (plus two MLflow REST paths).

It speaks the real wire protocol for the paths ctssl uses (create / get / list with label selector /
delete of namespaced objects, pod logs), answers errors with Kubernetes ``Status`` bodies, and
records every request so tests can inspect exactly what the client sent.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/(?P<ns>[^/]+)/"
                   r"(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?P<log>/log)?$")
SERVED = {"rayjobs", "pods"}


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name) -> obj
        self.logs: dict[tuple[str, str], str] = {}  # (pod, container) -> text
        self.requests: list[dict[str, Any]] = []
        self.failures: dict[tuple[str, str], tuple[int, str, str]] = {}  # (METHOD, plural) -> error
        self.served = set(SERVED)
        self.mlflow: dict[str, tuple[str, list[str]]] = {}  # experiment -> (id, run ids newest first)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> FakeKube:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def kubeconfig(self, path: Path, namespace: str = "ml") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "tester", "namespace": namespace}}],
        }))
        return path

    def put(self, plural: str, obj: dict[str, Any], namespace: str = "ml") -> None:
        self.objects[(plural, namespace, obj["metadata"]["name"])] = obj

    def created(self, plural: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["method"] == "POST" and r["plural"] == plural]

    # -------------------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, code: int, body: Any, text: bool = False) -> None:
                data = body.encode() if text else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _mlflow(self, url, body) -> None:
                if url.path.endswith("/experiments/get-by-name"):
                    name = parse_qs(url.query)["experiment_name"][0]
                    if name not in fake.mlflow:
                        return self._send(404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
                    return self._send(200, {"experiment": {"experiment_id": fake.mlflow[name][0], "name": name}})
                if url.path.endswith("/runs/search"):
                    eid = body["experiment_ids"][0]
                    runs = next((r for i, r in fake.mlflow.values() if i == eid), [])
                    return self._send(200, {"runs": [{"info": {"run_id": r}} for r in runs[: body["max_results"]]]})
                return self._send(404, {"error_code": "ENDPOINT_NOT_FOUND"})

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                body = self._body() if method in ("POST", "DELETE") else None
                if url.path.startswith("/api/2.0/mlflow/"):
                    return self._mlflow(url, body)
                m = _PATH.match(url.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                rec = {"method": method, "path": url.path, "query": query, "body": body,
                       "auth": self.headers.get("Authorization"),
                       "plural": m["plural"] if m else None, "name": m["name"] if m else None}
                fake.requests.append(rec)
                if not m or m["plural"] not in fake.served:
                    return self._send(404, status_body(404, "NotFound",
                                                       "the server could not find the requested resource"))
                plural, ns, name = m["plural"], m["ns"], m["name"]
                if (method, plural) in fake.failures:
                    code, reason, msg = fake.failures[(method, plural)]
                    return self._send(code, status_body(code, reason, msg))
                group = f"{plural}.{m['group']}" if m["group"] else plural
                if m["log"]:
                    text = fake.logs.get((name, query.get("container", "")))
                    if text is None:
                        return self._send(404, status_body(404, "NotFound", f'pods "{name}" not found'))
                    return self._send(200, text, text=True)
                if method == "POST":
                    key = (plural, ns, body["metadata"]["name"])
                    if key in fake.objects:
                        return self._send(409, status_body(409, "AlreadyExists",
                                                           f'{group} "{key[2]}" already exists'))
                    obj = json.loads(json.dumps(body))
                    obj["metadata"]["namespace"] = ns
                    fake.objects[key] = obj
                    return self._send(201, obj)
                if name is None:  # list with an equality label selector
                    want = dict(kv.split("=", 1) for kv in query.get("labelSelector", "").split(",") if kv)
                    items = [o for (p, n, _), o in sorted(fake.objects.items()) if p == plural and n == ns and
                             all((o["metadata"].get("labels") or {}).get(k) == v for k, v in want.items())]
                    return self._send(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items})
                key = (plural, ns, name)
                if key not in fake.objects:
                    return self._send(404, status_body(404, "NotFound", f'{group} "{name}" not found'))
                if method == "DELETE":
                    del fake.objects[key]
                    return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                return self._send(200, fake.objects[key])

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        return Handler
