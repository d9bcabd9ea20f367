"""`starsctl submit`: run a job on an embedded local Ray, or hand it to a cluster's Ray Jobs API."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from stars.spec import JobSpec, is_secret_key, resolved_yaml, spec_hash

SPEC_FILE = "job.yaml"


def submit(spec: JobSpec, *, spec_path: str | Path | None = None, address: str | None = None) -> int | str:
    """No address: run here and now (embedded Ray, local MLflow store) and return the exit code (1 when
    a trial failed). With an address: submit `python -m stars.run job.yaml` to that cluster and return
    how to follow it."""
    if address is None:
        from stars.ray_backend.job import run_job

        return 1 if run_job(spec).failed else 0
    return submit_to_cluster(spec, address)


def spec_for_upload(spec: JobSpec) -> JobSpec:
    """The spec as it travels in the job's working_dir: environment variables whose names look secret
    (`is_secret_key`) are left out of the file. Their values reach the job through the runtime env's
    `env_vars` (which Ray Train workers inherit), never through an uploaded file."""
    env = {k: v for k, v in spec.resources.env_vars.items() if not is_secret_key(k)}
    return spec.model_copy(update={"resources": spec.resources.model_copy(update={"env_vars": env})})


def submit_to_cluster(spec: JobSpec, address: str) -> str:
    """Submit through the Ray Jobs API. The cluster image must have `stars` installed; the spec travels
    in the job's working_dir. Token auth: export RAY_AUTH_MODE=token and keep the cluster's token in
    ~/.ray/auth_token (or RAY_AUTH_TOKEN); Ray's client sends it."""
    from ray.job_submission import JobSubmissionClient

    workdir = Path(tempfile.mkdtemp(prefix="stars-submit-"))
    (workdir / SPEC_FILE).write_text(resolved_yaml(spec_for_upload(spec)), encoding="utf-8")
    client = JobSubmissionClient(address)
    submission_id = f"stars-{spec.name}-{spec_hash(spec)[:8]}-{int(time.time())}"
    job_id = client.submit_job(
        entrypoint=f"python -m stars.run {SPEC_FILE}",
        submission_id=submission_id,
        runtime_env={"working_dir": str(workdir), "env_vars": dict(spec.resources.env_vars)},
        metadata={"stars.name": spec.name, "stars.spec_hash": spec_hash(spec)},
    )
    return (f"submitted {job_id} to {address}\n"
            f"follow: ray job logs --follow {job_id} --address {address}")
