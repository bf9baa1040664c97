"""Connecting to Ray, for every entry point: a cluster when an address is given, else a private local
instance; and the environment that Ray workers need.

``ray.init()`` without an address silently attaches to any cluster whose address file an earlier run
left behind, so every entry point goes through :func:`connect`, which always names the address
(``address="local"`` for a new local instance).

A local instance is this machine's alone (:func:`init_local`): every Ray process listens on
127.0.0.1 only, and the instance requires a token that only this process and its Ray processes
know, so neither other hosts nor other users' processes can submit work to it.

The settings that Ray workers need to reach object storage and MLflow (S3 endpoint, region, tracking
URI) are forwarded explicitly (:func:`forwarded_env`), because worker processes of an already running
cluster do not inherit the driver's environment; secrets are not (see :data:`FORWARDED_ENV`).

``ray`` is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from typing import Any

from ctssl_base.errors import UserError
from ctssl_base.uri_secrets import redact_uri

log = logging.getLogger("ctssl.ray")

#: the environment variables a worker needs to reach object storage and MLflow, and ctssl's own
#: switches: settings, never secrets. Runtime envs are logged by Ray's runtime-env agent on every node
#: (and served by its dashboard), so credentials (AWS keys, MLflow password/token) and the
#: de-identification key are never put there: workers of the local instance inherit them from the
#: driver, pods of a cluster get them from their own environment (Kubernetes secrets, an IAM role).
FORWARDED_ENV = frozenset({
    "CTSSL_S3_ENDPOINT_URL", "CTSSL_TORCH_THREADS", "CTSSL_SPARSE_BN_KERNEL", "CTSSL_FAILPOINT",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "AWS_CA_BUNDLE", "AWS_S3_ADDRESSING_STYLE",
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_ALLOW_FILE_STORE",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_S3_IGNORE_TLS",
})

#: Ray's switch for single-node mode (the default on macOS and Windows): with it off, a node takes
#: the loopback address as its IP and binds its GCS, raylet, agents and dashboard there
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def init_local(**kwargs: Any) -> None:
    """``ray.init(address="local", **kwargs)``, bound to 127.0.0.1 and protected by a token.

    On Linux Ray gives a new node the machine's routable IP and listens on every interface, whatever
    ``ray.init`` is told (it replaces 127.0.0.1 by the routable IP); only its single-node mode keeps
    a node on the loopback address. That mode is read when ``ray`` is imported, so it is switched on
    both in the environment the Ray processes inherit and, for this already-running driver, in
    ``ray._private.ray_constants`` (restored afterwards, so a later connection to a real cluster
    from this process advertises a reachable address again).

    Unless the environment already chooses Ray's authentication (``RAY_AUTH_*``), the instance's
    token (Ray requires one for new local instances) is a fresh random one, held in this process's
    environment (inherited by the Ray processes and kept for the driver's own calls) instead of
    Ray's default file ~/.ray/auth_token, which a read-only root filesystem (the Kubernetes pods)
    cannot hold and which every later run would share.
    """
    import ray
    from ray._private import ray_constants

    if not any(os.environ.get(v) for v in _AUTH_ENV):
        # Ray turns token mode on itself for a new local instance (and reloads its config for that);
        # it finds this token first and so writes no file
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray starts its workers at niceness 15 (so a busy node's own services stay responsive); on a
    # laptop that makes training lose the CPU to any other program, and to nothing gain: the driver
    # waits on the workers anyway. The instance ctssl starts for itself runs them at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    saved_env = os.environ.get(_SINGLE_NODE_ENV)
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", dashboard_host="127.0.0.1", **kwargs)
    finally:
        if saved_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_SINGLE_NODE_ENV, None)
        else:
            os.environ[_SINGLE_NODE_ENV] = saved_env


def forwarded_env() -> dict[str, str]:
    """The driver's storage and tracking settings (:data:`FORWARDED_ENV`), to be set again inside Ray
    workers; a tracking URI holding a password is not forwarded."""
    env = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV}
    uri = env.get("MLFLOW_TRACKING_URI")
    if uri and redact_uri(uri) != uri:
        # not even stripped: a runtime env's variables replace the worker's own, and a local worker's
        # own is the full URI, which its MLflow client needs (workers are handed the URI without it)
        del env["MLFLOW_TRACKING_URI"]
    return env


#: credentials that Ray Tune copies from the driver's environment into every trial actor's runtime
#: env (``ray.tune.execution.class_cache``), where the runtime-env agent logs them
_TUNE_COPIED_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_secrets_out_of_tune() -> None:
    """Stop Ray Tune from putting the driver's AWS credentials into its trials' runtime envs.

    Tune does so that trials on other nodes can reach S3; here they need not: a local instance's
    workers inherit the driver's environment, a cluster's pods carry their own credentials. Its list
    is a module-level set read whenever a trial actor class is made, so removing the names is enough;
    a Ray without that list is left alone (the secrets test then says whether Tune copies them)."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:
        return
    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(names, set):
        names.difference_update(_TUNE_COPIED_SECRETS)


def job_env_vars() -> dict[str, str]:
    """The ``env_vars`` of the runtime env this driver was submitted with (``ray job submit
    --runtime-env-json``); empty outside a submitted job. Ray refuses a ``ray.init`` whose runtime env
    names a variable the job's already sets, and the job's reach every worker anyway."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}


def apply_env(env: dict[str, str] | None) -> None:
    """Set forwarded variables in a worker (without overriding what the worker already has set)."""
    for k, v in (env or {}).items():
        os.environ.setdefault(k, v)


def resolve_address(address: str | None) -> str:
    """``address`` if given, else ``$RAY_ADDRESS`` (set by ``ray job submit``), else ``"local"`` (a new
    local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def connect(address: str | None = None, *, log_to_driver: bool = True, **local_kwargs: Any) -> None:
    """Attach to (or start) Ray at an explicit address; a no-op when this process is already connected.

    Without an address (nor ``$RAY_ADDRESS``), a private local Ray is started on 127.0.0.1, see
    :func:`init_local`; ``local_kwargs`` (e.g. ``num_cpus``, ``include_dashboard``) go to its
    ``ray.init`` only, a cluster's resources being the cluster's own. The forwarded environment
    (:func:`forwarded_env`, less what a submitted job's runtime env already sets) reaches every worker.
    A connection that fails raises :class:`~ctssl_base.errors.UserError` naming the address.

    Being already connected is the in-process case (tests, ``ctssl demo``): the caller chose the
    cluster, so it is respected.
    """
    import ray

    if ray.is_initialized():
        return
    addr = resolve_address(address)
    job_env = job_env_vars()
    runtime_env: dict[str, Any] = {"env_vars": {k: v for k, v in forwarded_env().items() if k not in job_env}}
    try:
        if addr == "local":  # this machine's alone: 127.0.0.1 only, with a private token
            init_local(runtime_env=runtime_env, log_to_driver=log_to_driver, **local_kwargs)
        else:
            ray.init(address=addr, runtime_env=runtime_env, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to the Ray cluster at {addr!r}: {e}") from e
    log.info("connected to Ray at %s: %s", addr, _describe(ray.cluster_resources()))


def _describe(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={res[k]:g}" for k in ("CPU", "GPU") if k in res) or "no resources"
