"""Connecting to Ray for prep: a cluster when an address is given, else a private local instance.

``ray.init()`` without an address attaches to any cluster whose address file an earlier run left
behind (see DESIGN.md), so the local case always passes ``address="local"`` explicitly.

A local instance is this machine's alone (:func:`init_local`): every Ray process listens on
127.0.0.1 only, and the instance requires a token that only this process and its Ray processes
know, so neither other hosts nor other users' processes can submit work to it.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

log = logging.getLogger("ctssl.ray")

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


def ensure_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        init_local(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)
