"""`starsctl submit`: run a job on an embedded local Ray, or hand it to a cluster's Ray Jobs API.

A submitted job is `python -m stars.run job.yaml --temporary-cwd` with the spec in the job's
working_dir (`prepare_submission` builds everything that is sent):

- the spec is resolved where the job runs (`stars.ray_backend.cluster_spec`): here for a head on this
  machine, on the cluster otherwise (uploaded unresolved);
- code: the cluster's image must have `stars` installed (the default), or `--ship-code` sends this
  machine's `stars` package along (Ray `py_modules`; its dependencies must be on the cluster);
- secrets: values of `resources.forward_env` (read here, now) and secret-looking `resources.env_vars`
  travel only in the runtime env's `env_vars`, never in the uploaded spec. Ray shows a job's runtime
  env, values included, to anyone who can open the dashboard, and writes it to the head's Ray logs;
- identity: the job's metadata holds the spec name, spec hash and git sha, and `STARS_GIT_SHA` goes to
  the job so that its MLflow runs are tagged with the commit submitted from (`stars.tracking.git_info`).
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stars.errors import UserError
from stars.spec import JobSpec, is_secret_key, resolved_yaml, spec_hash

SPEC_FILE = "job.yaml"
ENTRYPOINT = f"python -m stars.run {SPEC_FILE} --temporary-cwd"
#: Left out of the shipped `stars` package (Ray `excludes`).
SHIP_EXCLUDES = ["__pycache__", "*.pyc"]


class MissingForwardEnvError(UserError):
    """A variable named in `resources.forward_env` is not set where the job is submitted from."""


def submit(spec: JobSpec, *, spec_path: str | Path | None = None, address: str | None = None,
           ship_code: bool = False, wait: bool = False, console: Callable[[str], None] = print) -> int | str:
    """No address: run here and now (embedded Ray) and return the exit code (1 when a trial failed).
    With a Jobs API address: submit the job (`spec` resolved for a head on this machine, unresolved
    for a remote one; see `stars.ray_backend.cluster_spec`), then return how to follow it, or with
    `wait` follow its logs to the end and return 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED."""
    if address is None:
        if ship_code:
            raise UserError("--ship-code sends the code to a cluster: it needs --address (or $RAY_ADDRESS)")
        forwarded_env(spec)  # a missing variable fails now, as for a cluster job
        from stars.ray_backend.job import run_job

        return 1 if run_job(spec).failed else 0
    from stars.ray_backend.jobs_api import JobsApi, dashboard_lines, exit_code_of, token_auth_requested

    forwarded_env(spec)  # user errors first, then the cluster (unreachable, token), then the git lookup
    api = JobsApi(address)
    job_id = submit_prepared(api, prepare_submission(spec, ship_code=ship_code))
    lines = [f"submitted {job_id} to {address}",
             *dashboard_lines(address, token_auth=token_auth_requested(), job_id=job_id)]
    if not wait:
        return "\n".join([*lines, f"follow:    starsctl logs --follow {job_id} --address {address}",
                          f"status:    starsctl status {job_id} --address {address}",
                          f"stop:      starsctl stop {job_id} --address {address}"])
    for line in lines:
        console(line)
    start = time.monotonic()
    try:
        final = api.follow(job_id, write=lambda chunk: (sys.stdout.write(chunk), sys.stdout.flush()))
    except KeyboardInterrupt:
        console(f"stopped following; {job_id} goes on: starsctl logs --follow {job_id} / starsctl stop {job_id}")
        return 130
    reason = f": {final.message}" if final.message and final.status != "SUCCEEDED" else ""
    console(f"job {job_id} {final.status} after {time.monotonic() - start:.0f} s{reason}")
    return exit_code_of(final.status)


# ------------------------------------------------------------------------------------ what is sent
@dataclass(frozen=True)
class Submission:
    """Everything a Jobs API submission sends, but the client: built without a cluster, so tests can
    read what would travel where."""

    submission_id: str
    entrypoint: str
    spec_yaml: str
    """The uploaded `job.yaml`: secret-looking env_vars left out, forward_env by name only."""
    runtime_env: dict[str, Any] = field(repr=False)
    """Ray runtime env without its working_dir; `env_vars` holds the secret values (so no repr)."""
    metadata: dict[str, str]


def spec_for_upload(spec: JobSpec) -> JobSpec:
    """The spec as it travels in the job's working_dir: environment variables whose names look secret
    (`is_secret_key`) are left out of the file. Their values reach the job through the runtime env's
    `env_vars` (which Ray Train workers inherit), never through an uploaded file."""
    env = {k: v for k, v in spec.resources.env_vars.items() if not is_secret_key(k)}
    return spec.model_copy(update={"resources": spec.resources.model_copy(update={"env_vars": env})})


def forwarded_env(spec: JobSpec, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The values of `resources.forward_env` in `environ` (default: this process's environment);
    `MissingForwardEnvError` naming every variable that is not set."""
    environ = os.environ if environ is None else environ
    missing = [name for name in spec.resources.forward_env if name not in environ]
    if missing:
        names = ", ".join(missing)
        raise MissingForwardEnvError(
            f"resources.forward_env: {names} {'is' if len(missing) == 1 else 'are'} not set in this environment; "
            "export it before submitting (the value is read now and sent to the job, never written anywhere)")
    return {name: environ[name] for name in spec.resources.forward_env}


def submission_id_for(spec: JobSpec) -> str:
    """`stars-<name>-<spec hash[:8]>-<UTC time>-<4 hex>`: readable, sortable, and unique per submit."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"stars-{spec.name}-{spec_hash(spec)[:8]}-{stamp}-{secrets.token_hex(2)}"


def prepare_submission(spec: JobSpec, *, ship_code: bool = False,
                       environ: Mapping[str, str] | None = None) -> Submission:
    """The job `submit` sends for `spec` (forwarded variables read from `environ`)."""
    from stars.tracking import git_info

    env_vars = {**spec.resources.env_vars, **forwarded_env(spec, environ)}
    sha, dirty = git_info()
    metadata = {"job_name": spec.name,  # the Name column of the dashboard's job list
                "stars.name": spec.name, "stars.spec_hash": spec_hash(spec),
                "stars.code": "shipped" if ship_code else "image"}
    if sha:
        metadata["stars.git_sha"] = sha
        env_vars.setdefault("STARS_GIT_SHA", sha)
    if dirty is not None:
        metadata["stars.git_dirty"] = str(dirty).lower()
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if ship_code:
        import stars

        runtime_env["py_modules"] = [str(Path(stars.__file__).resolve().parent)]
        runtime_env["excludes"] = list(SHIP_EXCLUDES)
    return Submission(submission_id_for(spec), ENTRYPOINT, resolved_yaml(spec_for_upload(spec)), runtime_env,
                      metadata)


def submit_prepared(api: Any, submission: Submission) -> str:
    """Send `submission` through `api` (`stars.ray_backend.jobs_api.JobsApi`): the spec goes in a
    temporary working_dir that Ray uploads before `submit` returns."""
    with tempfile.TemporaryDirectory(prefix="stars-submit-") as workdir:
        (Path(workdir) / SPEC_FILE).write_text(submission.spec_yaml, encoding="utf-8")
        return api.submit(entrypoint=submission.entrypoint, submission_id=submission.submission_id,
                          runtime_env={**submission.runtime_env, "working_dir": workdir},
                          metadata=submission.metadata)
