"""Which of a spec's paths and MLflow stores are valid where a submitted job runs.

A job goes to a cluster as its spec, and the spec is resolved where the job runs (`python -m
stars.run` resolves it on the cluster). What is valid there:

- **A head on this machine** (a loopback address, `stars.ray_backend.jobs_api.is_loopback_address`):
  everything. The same filesystem is on both sides, so the spec is resolved here, against the directory
  `starsctl submit` runs in, exactly as for an embedded run (relative paths, the default `./mlflow.db`
  and $MLFLOW_TRACKING_URI all mean what they mean here).
- **A remote cluster**: the spec is uploaded unresolved, and
  - a *relative* local path (`storage_path`, `data.train_file`/`test_file`, `eval.benchmark_paths`,
    `tracking.artifact_location`; `~` too) is refused: it names a place relative to this machine's
    working directory, and on the cluster it would land in the job's temporary working_dir;
  - an *absolute* path or a URI (`/mnt/shared/stars`, `s3://bucket/stars`) is taken as written, as a
    place on the cluster (every node must see `storage_path`: a shared filesystem or object storage);
  - `model.pretrained`, `data.dataset`, `data.tokenizer` given as a relative path that exists here are
    refused (the cluster cannot see this machine's files); names that do not exist here are left to
    the cluster (a hub id, or a path there);
  - a local MLflow store (`sqlite:`, `file:`, a path) in `tracking.uri`, or in a forwarded or set
    `MLFLOW_TRACKING_URI`, is refused: only one machine can read it. Give a tracking server URI, or
    leave `tracking.uri` null to use the cluster's $MLFLOW_TRACKING_URI (or forward yours:
    `resources.forward_env: [MLFLOW_TRACKING_URI]`).

On the cluster, `python -m stars.run --temporary-cwd` (what `starsctl submit` runs) refuses a spec
whose outputs would resolve into its temporary working directory (`temporary_cwd_problems`): a relative
`storage_path`, or no tracking URI at all (neither in the spec nor $MLFLOW_TRACKING_URI there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stars.errors import UserError
from stars.spec import JobSpec, is_local_path, is_local_store

__all__ = ["RemoteSpecError", "check_remote_spec", "remote_spec_problems", "temporary_cwd_problems"]

#: Fields holding a path that `resolve_spec` makes absolute against the working directory.
_PATH_FIELDS = (("resources", "storage_path"), ("data", "train_file"), ("data", "test_file"),
                ("tracking", "artifact_location"))
#: Fields holding a local path or a hub id (absolute when they exist where the spec is resolved).
_NAME_FIELDS = (("model", "pretrained"), ("data", "dataset"), ("data", "tokenizer"))
_SERVER_HINT = ("give a tracking server URI (http://mlflow.internal:5000), or leave tracking.uri null to use the "
                "cluster's $MLFLOW_TRACKING_URI (or forward yours: resources.forward_env: [MLFLOW_TRACKING_URI])")


class RemoteSpecError(UserError):
    """A spec whose paths or tracking store do not mean the same on the cluster it goes to."""


def _relative(path: str) -> bool:
    """A local path that is relative to the working directory (or to a home directory)."""
    return is_local_path(path) and not path.startswith("file://") and not Path(path).is_absolute()


def _env_value(spec: JobSpec, name: str, environ: Mapping[str, str]) -> str | None:
    """The value `name` will have in the job: set in the spec, or forwarded from `environ`."""
    if name in spec.resources.env_vars:
        return spec.resources.env_vars[name]
    return environ.get(name) if name in spec.resources.forward_env else None


def remote_spec_problems(spec: JobSpec, environ: Mapping[str, str] | None = None,
                         cwd: str | Path | None = None) -> list[str]:
    """Why the unresolved `spec` cannot run on a remote cluster as written (see the module
    docstring); [] when it can. `environ` is the submitting environment (forwarded variables)."""
    environ = os.environ if environ is None else environ
    base = Path(cwd) if cwd is not None else Path.cwd()
    data: dict[str, Any] = spec.model_dump(mode="json")
    problems = []
    for section, key in _PATH_FIELDS:
        value = data[section].get(key)
        if value and _relative(value):
            problems.append(f"{section}.{key} {value!r} is a path relative to this machine; the job runs on a remote "
                            "cluster: give an absolute path there (a shared filesystem every node sees) or a URI "
                            "such as s3://bucket/stars")
    for name, value in data["eval"]["benchmark_paths"].items():
        if _relative(value):
            problems.append(f"eval.benchmark_paths.{name} {value!r} is a path relative to this machine; the job "
                            "runs on a remote cluster: give its absolute path there or a URI")
    for section, key in _NAME_FIELDS:
        value = data[section].get(key)
        if value and _relative(value) and (base / Path(value).expanduser()).exists():
            problems.append(f"{section}.{key} {value!r} is a path on this machine (it exists here); the job runs on "
                            "a remote cluster, which cannot see it: give its path on the cluster or a hub id")
    if spec.tracking.enabled:
        uri = spec.tracking.uri
        if uri is not None and is_local_store(uri):
            problems.append(f"tracking.uri {uri!r} is an MLflow store on one machine; the job runs on a remote "
                            f"cluster: {_SERVER_HINT}")
        forwarded = _env_value(spec, "MLFLOW_TRACKING_URI", environ)
        if uri is None and forwarded and is_local_store(forwarded):
            problems.append(f"MLFLOW_TRACKING_URI {forwarded!r} (resources.forward_env / env_vars) is an MLflow store "
                            f"on one machine; the job runs on a remote cluster: {_SERVER_HINT}")
    return problems


def check_remote_spec(spec: JobSpec, address: str, environ: Mapping[str, str] | None = None) -> None:
    """Raise `RemoteSpecError` listing every problem of `remote_spec_problems`, before anything is
    sent to the cluster at `address`."""
    problems = remote_spec_problems(spec, environ)
    if problems:
        raise RemoteSpecError("\n".join(
            [*problems, f"starsctl submit: not submitted to {address} ({len(problems)} problem(s) above)"]))


def temporary_cwd_problems(spec: JobSpec, environ: Mapping[str, str] | None = None) -> list[str]:
    """Outputs of the unresolved `spec` that would resolve into the working directory, when that is
    a Ray job's temporary working_dir (checked on the cluster by `python -m stars.run --temporary-cwd`)."""
    environ = os.environ if environ is None else environ
    problems = []
    storage = spec.resources.storage_path
    if _relative(storage):
        problems.append(f"resources.storage_path {storage!r} is relative: checkpoints would go to this job's "
                        "temporary working_dir; give an absolute path or a URI")
    uri = spec.tracking.uri or environ.get("MLFLOW_TRACKING_URI")
    if spec.tracking.enabled and not uri:
        problems.append("tracking.uri is not set and $MLFLOW_TRACKING_URI is not set here: the MLflow runs would go "
                        "to a store in this job's temporary working_dir; set tracking.uri, or MLFLOW_TRACKING_URI on "
                        "the cluster, or forward yours (resources.forward_env: [MLFLOW_TRACKING_URI])")
    elif spec.tracking.enabled and uri and is_local_store(uri) and _relative(uri.removeprefix("sqlite:///")):
        problems.append(f"tracking.uri {uri!r} is relative: the MLflow store would go to this job's temporary "
                        "working_dir; give a tracking server URI or an absolute path")
    return problems
