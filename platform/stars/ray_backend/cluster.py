"""Starting or joining Ray."""

from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster this process belongs to, or start an embedded local one.

    Inside a Ray job (`RAY_ADDRESS` set by the Jobs API) `ray.init()` joins that cluster. Otherwise a
    local single-node Ray starts with its dashboard on 127.0.0.1 only.
    """
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
