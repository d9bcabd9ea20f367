"""Starting or joining Ray."""

from __future__ import annotations

import os
from collections.abc import Callable

import ray
from ray.job_config import JobConfig

from stars.ray_backend.jobs_api import dashboard_lines, token_auth_requested


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *, job_name: str | None = None,
               console: Callable[[str], None] = print) -> None:
    """Join the Ray cluster this process belongs to, or start an embedded local one.

    Inside a Ray job (`RAY_ADDRESS` set by the Jobs API) `ray.init()` joins that cluster. Otherwise a
    local single-node Ray starts with its dashboard on 127.0.0.1 only, and its URL and how to log in
    (token auth is on by default in Ray 2.60) are printed; `job_name` names the run in the
    dashboard's job list (a submitted job is named by its submission's metadata instead).
    """
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    context = ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
        job_config=JobConfig(metadata={"job_name": job_name}) if job_name else None,
    )
    if not context.dashboard_url:
        console("Ray dashboard: did not start (see the dashboard log under /tmp/ray/session_latest/logs)")
        return
    for line in dashboard_lines(f"http://{context.dashboard_url}", token_auth=token_auth_requested()):
        console(line)
