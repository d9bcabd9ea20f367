"""Starting or joining Ray."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import ray
from ray.job_config import JobConfig

from stars.ray_backend.jobs_api import dashboard_lines, token_auth_requested

#: Set by the Ray Jobs API in a submitted job's driver: the job's config, its runtime env included
#: (`ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR`).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *, job_name: str | None = None,
               env_vars: Mapping[str, str] | None = None, console: Callable[[str], None] = print) -> None:
    """Join the Ray cluster this process belongs to, or start an embedded local one.

    Inside a Ray job (`RAY_ADDRESS` set by the Jobs API) `ray.init()` joins that cluster. Otherwise a
    local single-node Ray starts with its dashboard on 127.0.0.1 only, and its URL and how to log in
    (token auth is on by default in Ray 2.60) are printed; `job_name` names the run in the
    dashboard's job list (a submitted job is named by its submission's metadata instead).

    `env_vars` (the spec's `resources.env_vars`) are set in this process (the driver) and in the
    job's runtime env, so every process Ray starts for the job has them: the Ray Train controller,
    the training workers, the evaluators. Their values are never printed (they may be secrets).
    """
    job_env = _env_vars_to_add(env_vars or {})
    os.environ.update(job_env)
    if ray.is_initialized():  # the caller's Ray and runtime env (a test, a notebook): the driver has them
        return
    runtime_env = {"env_vars": job_env} if job_env else None
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True, runtime_env=runtime_env)
        return
    metadata = {"job_name": job_name} if job_name else None
    context = ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
        job_config=JobConfig(metadata=metadata, runtime_env=runtime_env) if metadata or runtime_env else None,
    )
    if not context.dashboard_url:
        console("Ray dashboard: did not start (see the dashboard log under /tmp/ray/session_latest/logs)")
        return
    for line in dashboard_lines(f"http://{context.dashboard_url}", token_auth=token_auth_requested()):
        console(line)


def _env_vars_to_add(env_vars: Mapping[str, str]) -> dict[str, str]:
    """`env_vars` less those the job's runtime env already sets: a job submitted through the Jobs API
    (`stars.ray_backend.submit`) carries the spec's variables there, and `ray.init` refuses a runtime
    env that sets a variable the job's sets too."""
    submitted = _submitted_job_env_vars()
    return {name: value for name, value in env_vars.items() if name not in submitted}


def _submitted_job_env_vars() -> dict[str, Any]:
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}
