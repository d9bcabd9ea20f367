"""The `resources` section: Ray Train workers, GPUs, accelerator type, storage, fault tolerance."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_core import InitErrorDetails

from stars.spec.base import Float, Int, Section, cross_error, raise_all

__all__ = ["DEFAULT_STORAGE_PATH", "MAX_CUSTOM_RESOURCE", "ResourcesSpec"]

DEFAULT_STORAGE_PATH = "./stars_runs"
#: Largest amount of one custom Ray resource a worker or evaluator may ask for.
MAX_CUSTOM_RESOURCE = 1e9
CustomResource = Annotated[Float, Field(ge=0, le=MAX_CUSTOM_RESOURCE)]
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ResourcesSpec(Section):
    """Where training runs: Ray Train `ScalingConfig`, storage and fault tolerance."""

    num_workers: Int = Field(default=1, ge=1, le=4096)
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One or more GPUs per worker."""
    accelerator_type: str | None = None
    """Required GPU type, e.g. `A800`, `H100` (Ray's `accelerator_type`); needs use_gpu."""
    cpus_per_worker: Float = Field(default=1.0, gt=0, le=1024)
    """CPUs reserved per worker (also the torch thread count on CPU)."""
    gpus_per_worker: Float | None = Field(default=None, ge=0, le=64)
    """GPUs per worker; null = 1 with use_gpu, else 0."""
    resources_per_worker: dict[str, CustomResource] = Field(default_factory=dict)
    """Extra custom Ray resources per worker, e.g. `{my_node_label: 1}` (CPU/GPU go above)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement group strategy for the workers."""
    storage_path: str = DEFAULT_STORAGE_PATH
    """Where checkpoints and Ray Train results go (`<storage_path>/<name>/...`). A local path is
    made absolute against the working directory when the spec is resolved. On a multi-node
    cluster it must be storage every node sees: a shared filesystem path or a URI like
    `s3://bucket/stars`."""
    max_failures: Int = Field(default=0, ge=-1, le=10**6)
    """Worker-group restarts from the latest checkpoint after a failure (-1 = unlimited)."""
    env_vars: dict[str, str] = Field(default_factory=dict)
    """Environment variables set on the driver and every worker (Ray runtime_env). Values whose
    names look secret (token, password, secret, key) are never logged to MLflow nor printed by
    `--dry-run`/`--show`."""
    forward_env: list[str] = Field(default_factory=list)
    """Names of environment variables whose values `starsctl submit` reads from the submitting
    shell, e.g. `[HF_TOKEN, MLFLOW_TRACKING_TOKEN]`: the way to give a cluster job a secret. Only
    the names are in the spec; the values travel in the Ray job's runtime env (`env_vars`, inherited
    by the driver and every worker), never in the uploaded spec, MLflow params or printed output.
    Ray shows a job's runtime env, values included, to anyone who can open the cluster's dashboard,
    and writes it to the head's Ray logs.
    A name that is not set when submitting is an error."""

    @model_validator(mode="after")
    def _check(self) -> ResourcesSpec:
        errors: list[InitErrorDetails] = []
        if self.accelerator_type is not None and not self.use_gpu:
            errors.append(
                cross_error(("accelerator_type",), "needs resources.use_gpu: true", self.accelerator_type)
            )
        if self.gpus_per_worker is None:
            self.gpus_per_worker = 1.0 if self.use_gpu else 0.0
        elif self.gpus_per_worker > 0 and not self.use_gpu:
            errors.append(
                cross_error(("gpus_per_worker",), "needs resources.use_gpu: true", self.gpus_per_worker)
            )
        elif self.use_gpu and self.gpus_per_worker == 0:
            errors.append(cross_error(("gpus_per_worker",), "must be > 0 with use_gpu: true", 0))
        reserved = sorted({"CPU", "GPU", "cpu", "gpu"} & set(self.resources_per_worker))
        for key in reserved:
            errors.append(
                cross_error(
                    ("resources_per_worker", key),
                    "set CPUs and GPUs with cpus_per_worker / gpus_per_worker",
                    self.resources_per_worker[key],
                )
            )
        if not self.storage_path.strip():
            errors.append(cross_error(("storage_path",), "must not be empty", self.storage_path))
        for i, name in enumerate(self.forward_env):
            if not _ENV_NAME.fullmatch(name):
                errors.append(cross_error(("forward_env", i), "must be an environment variable name "
                                          "(letters, digits, _; not starting with a digit)", name))
            elif name in self.env_vars:
                errors.append(cross_error(("forward_env", i), "is also set in resources.env_vars; "
                                          "give it in one of the two", name))
        if len(set(self.forward_env)) != len(self.forward_env):
            errors.append(cross_error(("forward_env",), "names a variable twice", self.forward_env))
        raise_all("ResourcesSpec", errors)
        return self
