"""A small JSON client for the few Kubernetes API paths ``ctssl k8s`` uses.

It rides on the official client's configuration and transport (in-cluster service account or
kubeconfig, TLS, tokens, exec plugins) but sends plain dicts: RayJobs are custom objects the typed
models do not know, and a dict is what the chart renders and the CRD schema validates. Every error
from the API server becomes one :class:`~ctssl_base.errors.UserError` line that names the verb, the
object and the server's reason, with a hint for the usual causes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ctssl_base.errors import UserError

IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the API (enough to build its URLs and name it in messages)."""

    kind: str
    plural: str
    group: str  # "" = core
    version: str

    def collection(self, namespace: str) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{base}/namespaces/{quote(namespace)}/{self.plural}"

    def item(self, namespace: str, name: str) -> str:
        return f"{self.collection(namespace)}/{quote(name)}"


RAYJOB = Kind("RayJob", "rayjobs", "ray.io", "v1")
POD = Kind("Pod", "pods", "", "v1")

_HINTS = {
    401: "the credentials in the kubeconfig were rejected (expired token or certificate?)",
    403: "your user or service account lacks RBAC permission for this; ask a cluster admin for a Role "
         "granting it; the chart's <release>-viewer Role covers status and logs",
    422: "the API server rejected the object's fields",
}


class KubeAPIError(UserError):
    """An API call failed; ``status`` is the HTTP status (0 when the server was unreachable)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _server_message(body: bytes | str | None) -> tuple[str, str]:
    """(reason, message) from a Kubernetes Status body, or the raw text when it is not one."""
    if not body:
        return "", ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        status = json.loads(text)
    except json.JSONDecodeError:
        return "", text.strip()[:300]
    if isinstance(status, dict):
        return str(status.get("reason", "")), str(status.get("message", ""))
    return "", text.strip()[:300]


def describe_error(verb: str, kind: Kind, namespace: str, name: str | None, status: int,
                   http_reason: str, body: bytes | str | None) -> str:
    obj = f"{kind.kind} {namespace}/{name}" if name else f"{kind.plural} in namespace {namespace}"
    reason, message = _server_message(body)
    head = f"cannot {verb} {obj}: HTTP {status} {reason or http_reason}"
    if message:
        head += f": {message}"
    if status == 404:
        if name is None:
            hint = (f"the API has no {kind.plural}.{kind.group or 'core'}/{kind.version} in namespace {namespace}"
                    + ("; is the KubeRay operator (its CRDs) installed? check `kubectl get crd rayjobs.ray.io`"
                       if kind is RAYJOB else "; does the namespace exist?"))
        else:
            hint = f"no {kind.kind} named {name!r} in namespace {namespace}"
    else:
        hint = _HINTS.get(status, "").format(name=name or "", namespace=namespace)
    return f"{head} ({hint})" if hint else head


class KubeAPI:
    """GET/DELETE of dict objects through the official client's transport."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api = api_client
        self.namespace = namespace

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None,
                namespace: str | None = None) -> KubeAPI:
        """In-cluster config inside a pod (unless a kubeconfig is named), else the kubeconfig."""
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        cfg = client.Configuration()
        ns = namespace
        try:
            if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(client_configuration=cfg)
                if ns is None and os.path.exists(IN_CLUSTER_NAMESPACE_FILE):
                    with open(IN_CLUSTER_NAMESPACE_FILE) as f:
                        ns = f.read().strip()
            else:
                config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
                if ns is None:
                    _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                    if context:
                        contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
                        active = next((c for c in contexts if c["name"] == context), active)
                    ns = (active or {}).get("context", {}).get("namespace")
        except (ConfigException, OSError) as e:
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise UserError(f"no usable Kubernetes configuration ({where}): {e}") from e
        return cls(client.ApiClient(cfg), ns or "default")

    # -- transport --------------------------------------------------------------------------------
    def _call(self, method: str, path: str, verb: str, kind: Kind, name: str | None,
              query: list[tuple[str, str]] | None = None, body: Any = None, stream: bool = False) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        try:
            m, url, hdrs, data, _ = self.api.param_serialize(method, path, query_params=query or [],
                                                          header_params=headers, body=body,
                                                          auth_settings=["BearerToken"])
            resp = self.api.call_api(m, url, hdrs, data)
        except ApiException as e:  # raised for transport failures wrapped by the client
            raise KubeAPIError(describe_error(verb, kind, self.namespace, name, e.status or 0,
                                              str(e.reason or ""), e.body), e.status or 0) from e
        except (HTTPError, OSError) as e:
            host = self.api.configuration.host
            raise KubeAPIError(f"cannot {verb} {kind.kind} {name or ''}: API server {host} unreachable "
                               f"({type(e).__name__}: {e})", 0) from e
        if stream and 200 <= resp.status < 300:
            return resp.response
        data_bytes = resp.read()
        if not 200 <= resp.status < 300:
            raise KubeAPIError(describe_error(verb, kind, self.namespace, name, resp.status, resp.reason or "",
                                              data_bytes), resp.status)
        if kind is POD and path.endswith("/log"):
            return data_bytes.decode("utf-8", "replace")
        return json.loads(data_bytes) if data_bytes else {}

    # -- verbs ------------------------------------------------------------------------------------
    def get(self, kind: Kind, name: str) -> dict[str, Any]:
        return self._call("GET", kind.item(self.namespace, name), "get", kind, name)

    def list(self, kind: Kind, selector: str) -> list[dict[str, Any]]:
        out = self._call("GET", kind.collection(self.namespace), "list", kind, None,
                         query=[("labelSelector", selector)])
        return list(out.get("items") or [])

    def delete(self, kind: Kind, name: str) -> dict[str, Any]:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        return self._call("DELETE", kind.item(self.namespace, name), "delete", kind, name, body=body)

    def pod_log(self, pod: str, container: str, tail: int | None = None) -> str:
        q = [("container", container)] + ([("tailLines", str(tail))] if tail else [])
        return self._call("GET", POD.item(self.namespace, pod) + "/log", "read the log of", POD, pod, query=q)

    def follow_pod_log(self, pod: str, container: str) -> Iterator[bytes]:
        resp = self._call("GET", POD.item(self.namespace, pod) + "/log", "follow the log of", POD, pod,
                          query=[("container", container), ("follow", "true")], stream=True)
        try:
            yield from resp.stream(4096)
        finally:
            resp.release_conn()
