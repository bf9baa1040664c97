"""Connecting to Ray for prep: a cluster when an address is given, else a private local instance.

``ray.init()`` without an address attaches to any cluster whose address file an earlier run left
behind (see DESIGN.md), so the local case always passes ``address="local"`` explicitly.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("ctssl.ray")


def ensure_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 configure_logging=False)
