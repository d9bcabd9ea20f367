"""`JobSpec`: the whole job, its rules across sections, and the defaults that follow from them.

A job spec is a YAML file (see `jobs/`) validated into `JobSpec`. Each section has its own model:

| section     | model                         | what                                                  |
|-------------|-------------------------------|-------------------------------------------------------|
| `model`     | `LoopLMModel`/`CheckpointModel` | a new LoopLM or a checkpoint (union on `source`)    |
| `data`      | `AdditionData`/`MathSFTData`  | the training task (union on `task`)                   |
| `stars`     | `StarsSpec`                   | the loop sampler (union on `kind`) and JSRR           |
| `train`     | `TrainSpec`                   | optimiser, schedule, batch sizes, precision, checkpoints |
| `resources` | `ResourcesSpec`               | Ray Train workers, GPUs, accelerator type, storage    |
| `eval`      | `EvalSpec`                    | depth-curve evaluation of checkpoints                 |
| `sweep`     | `SweepSpec`                   | a grid over dotted spec paths (one trial per point)   |
| `tracking`  | `TrackingSpec`                | MLflow tracking store and experiment                  |

`JobSpec.model_validate(data)` checks every field and every rule below and fills the defaults that
follow from other sections (`experiment`, `train.micro_batch_size`, `eval.tasks`). A sweep's grid is
checked here too: every path must exist and may be swept, and every value (and, for grids up to
1024 points, every point) must validate with the rest of the spec.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails

from stars.spec.base import MAX_SEED, Int, Section, cross_error, raise_all
from stars.spec.data import DataSpec
from stars.spec.eval import EVAL_TASK_NEEDS, EvalSpec
from stars.spec.model import LoopLMModel, ModelSpec
from stars.spec.problems import describe_errors
from stars.spec.resources import ResourcesSpec
from stars.spec.schema import check_schema_path, format_path, set_path
from stars.spec.stars import StarsSpec
from stars.spec.sweep import SweepSpec
from stars.spec.tracking import TrackingSpec
from stars.spec.train import TrainSpec

__all__ = ["SECTION_NAMES", "UNSWEEPABLE", "JobSpec", "cross_section_errors", "fill_derived_defaults"]

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
#: Paths a sweep may not vary (they name or configure the job itself).
UNSWEEPABLE = ("name", "experiment", "sweep", "tracking", "resources.storage_path")
SECTION_NAMES = ("model", "data", "stars", "train", "resources", "eval", "sweep", "tracking")
#: Grids with more points than this are checked value by value only, not point by point.
_MAX_CHECKED_POINTS = 1024


class JobSpec(Section):
    """A STARS job: train (and evaluate) one LoopLM, or one per point of a sweep grid."""

    name: str = Field(min_length=1, max_length=64)
    """Job name: lowercase letters, digits, '-' and '_'. Names the MLflow runs and the storage
    directory, so a resubmitted job finds its runs and checkpoints again."""
    experiment: str | None = Field(default=None, min_length=1)
    """MLflow experiment; null = `name`."""
    description: str = ""
    """Free text, shown as the MLflow run description."""
    seed: Int = Field(default=0, ge=0, le=MAX_SEED)
    """Seed of initialisation, data order and loop sampling."""
    model: ModelSpec = Field(default_factory=LoopLMModel)
    """The model to train, selected by `source`: a new `looplm` (the default), or a `pretrained`
    or `ouro` checkpoint."""
    data: DataSpec
    """The training task, selected by `task`: `addition` or `math_sft`."""
    stars: StarsSpec = Field(default_factory=StarsSpec)
    """Loop sampling and JSRR."""
    train: TrainSpec
    """Optimisation."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Workers and storage."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Checkpoint evaluation."""
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    """Optional grid sweep."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """MLflow."""

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError(
                f"expected a slug (lowercase letters, digits, '-', '_'; starting with a letter or "
                f"digit), got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _cross(self) -> JobSpec:
        if self.experiment is None:
            self.experiment = self.name
        sections = {name: getattr(self, name) for name in SECTION_NAMES}
        fill_derived_defaults(sections)
        errors = cross_section_errors(sections)
        raise_all("JobSpec", errors or _sweep_errors(self))
        return self

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        assert self.train.micro_batch_size is not None
        return self.train.global_batch_size // (self.train.micro_batch_size * self.resources.num_workers)


def fill_derived_defaults(sections: Mapping[str, Any]) -> None:
    """Fill defaults that depend on other sections, in place (each only if its sections exist)."""
    train, resources, ev, data = (sections.get(k) for k in ("train", "resources", "eval", "data"))
    if train is not None and resources is not None and train.micro_batch_size is None:
        if train.global_batch_size % resources.num_workers == 0:
            train.micro_batch_size = train.global_batch_size // resources.num_workers
    if ev is not None and data is not None and ev.tasks is None:
        ev.tasks = ["addition"] if data.task == "addition" else []


def cross_section_errors(sections: Mapping[str, Any]) -> list[InitErrorDetails]:
    """Rules across sections; a rule is checked only when all the sections it reads are given."""
    errors: list[InitErrorDetails] = []
    model, data, train, resources, ev, stars = (
        sections.get(k) for k in ("model", "data", "train", "resources", "eval", "stars")
    )
    if train is not None and resources is not None:
        workers = resources.num_workers
        if train.micro_batch_size is None:
            errors.append(
                cross_error(
                    ("train", "global_batch_size"),
                    f"must be divisible by resources.num_workers={workers}, got {train.global_batch_size}",
                    train.global_batch_size,
                )
            )
        elif train.global_batch_size % (train.micro_batch_size * workers):
            errors.append(
                cross_error(
                    ("train", "global_batch_size"),
                    f"must be divisible by train.micro_batch_size * resources.num_workers = "
                    f"{train.micro_batch_size} * {workers}, got {train.global_batch_size}",
                    train.global_batch_size,
                )
            )
    if isinstance(model, LoopLMModel) and data is not None:
        if data.task == "math_sft" and data.tokenizer is None:
            errors.append(
                cross_error(
                    ("data", "tokenizer"),
                    "required when model.source is 'looplm' (a new model has no tokenizer of its own)",
                )
            )
        need = data.max_seq_len() if data.task == "addition" else data.max_seq_len
        if model.positions == "learned" and model.max_position_embeddings < need:
            errors.append(
                cross_error(
                    ("model", "max_position_embeddings"),
                    f"must be >= {need}, the longest {data.task} sequence (positions are learned), "
                    f"got {model.max_position_embeddings}",
                    model.max_position_embeddings,
                )
            )
    if model is not None and stars is not None and stars.jsrr.enabled and stars.jsrr.mode == "fd":
        if model.dtype != "float32":
            errors.append(
                cross_error(
                    ("stars", "jsrr", "mode"),
                    f"'fd' (a central difference) needs model.dtype float32, got {model.dtype!r}: in "
                    "16-bit weights the difference is rounding noise; use 'vjp' or 'jvp', or float32 "
                    "weights with train.precision bf16",
                    stars.jsrr.mode,
                )
            )
    if ev is not None and data is not None and ev.tasks:
        for i, task in enumerate(ev.tasks):
            need, why = EVAL_TASK_NEEDS[task]
            if data.task != need:
                errors.append(
                    cross_error(("eval", "tasks", i), f"{task!r} {why}; it needs data.task {need!r}", task)
                )
    return errors


def _with(base: dict[str, Any], assignments: Mapping[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(base))
    for key, value in assignments.items():
        set_path(data, key.split("."), value)
    return data


def _sweep_errors(spec: JobSpec) -> list[InitErrorDetails]:
    """Every grid path must exist and may be swept; every value must validate at its path (with
    the rest of the spec); and (for grids up to 1024 points) every point must validate."""
    grid = spec.sweep.grid
    if not grid:
        return []
    errors: list[InitErrorDetails] = []
    base = spec.model_dump(mode="json", exclude={"sweep"})
    good_keys: list[str] = []
    for key, values in grid.items():
        loc = ("sweep", "grid", key)
        problem = check_schema_path(JobSpec, key)
        if problem is None and any(key == p or key.startswith(p + ".") for p in UNSWEEPABLE):
            problem = "this path names or places the job and cannot be swept"
        if problem is not None:
            errors.append(cross_error(loc, problem, key))
            continue
        keys = tuple(key.split("."))
        ok = True
        for i, value in enumerate(values):
            try:
                JobSpec.model_validate(_with(base, {key: value}))
            except ValidationError as exc:
                ok = False
                msgs = []
                for path, msg in describe_errors(exc.errors(), JobSpec):
                    if path[: len(keys)] == keys:
                        rest = format_path(path[len(keys) :])
                        msgs.append(f"{rest}: {msg}" if rest else msg)
                    else:
                        msgs.append(f"makes {format_path(path)} invalid: {msg}")
                errors.append(cross_error(loc + (i,), "; ".join(msgs), value))
        if ok:
            good_keys.append(key)
    if len(good_keys) > 1 and len(good_keys) == len(grid) and spec.sweep.num_trials <= _MAX_CHECKED_POINTS:
        shown = 0
        for combo in itertools.product(*(grid[k] for k in good_keys)):
            point = dict(zip(good_keys, combo, strict=True))
            try:
                JobSpec.model_validate(_with(base, point))
            except ValidationError as exc:
                where = ", ".join(f"{k}={v!r}" for k, v in point.items())
                msg = "; ".join(f"{format_path(p)}: {m}" for p, m in describe_errors(exc.errors(), JobSpec))
                errors.append(cross_error(("sweep", "grid"), f"grid point {where} is invalid: {msg}"))
                shown += 1
                if shown >= 5:
                    break
    return errors
