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
| `sweep`     | `SweepSpec`                   | variants x grid x sampled draws x seeds (one trial each) |
| `tracking`  | `TrackingSpec`                | MLflow tracking store and experiment                  |

`JobSpec.model_validate(data)` checks every field and every rule below and fills the defaults that
follow from other sections (`experiment`, `train.micro_batch_size`, `eval.tasks`). A sweep is
checked here too: every grid and sample path must exist and may be swept, every variant and value
must validate with the rest of the spec, and then every trial must validate as a complete spec.
"""

from __future__ import annotations

import copy
import hashlib
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
from stars.spec.sweep import SweepPoint, SweepSpec, VariantPatch, merge_variant, sweep_points
from stars.spec.tracking import TrackingSpec
from stars.spec.train import TrainSpec

__all__ = [
    "SECTION_NAMES",
    "UNSWEEPABLE",
    "JobSpec",
    "cross_section_errors",
    "fill_derived_defaults",
    "trial_base",
]

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
#: Paths a sweep may not vary (they name or configure the job itself).
UNSWEEPABLE = ("name", "experiment", "sweep", "tracking", "resources.storage_path")
SECTION_NAMES = ("model", "data", "stars", "train", "resources", "eval", "sweep", "tracking")


class JobSpec(Section):
    """A STARS job: train (and evaluate) one LoopLM, or one per trial of a sweep."""

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
    """Optional sweep: variants, a grid, random samples and seeds, one trial per combination."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """MLflow."""

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        problem = _slug_problem(value)
        if problem is not None:
            raise ValueError(problem)
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


def trial_base(spec: JobSpec) -> dict[str, Any]:
    """The mapping a sweep's trials are built on: the spec without `sweep`, and without the defaults
    that follow from other sections (`train.micro_batch_size`, `eval.tasks`) wherever the spec holds
    just the derived value, so that each trial derives them from its own sections (a trial with 2
    workers splits the batch in 2; a variant that trains math_sft does not evaluate addition)."""
    data = spec.model_dump(mode="json", exclude={"sweep"})
    derived: dict[str, Any] = {
        "train": spec.train.model_copy(update={"micro_batch_size": None}),
        "resources": spec.resources,
        "eval": spec.eval.model_copy(update={"tasks": None}),
        "data": spec.data,
    }
    fill_derived_defaults(derived)
    if derived["train"].micro_batch_size == spec.train.micro_batch_size:
        del data["train"]["micro_batch_size"]
    if derived["eval"].tasks == spec.eval.tasks:
        del data["eval"]["tasks"]
    return data


def _with(base: dict[str, Any], assignments: Mapping[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for key, value in assignments.items():
        set_path(data, key.split("."), copy.deepcopy(value))
    return data


#: Invalid trials described one by one; the rest are counted.
_MAX_TRIAL_PROBLEMS = 5


def _sweep_errors(spec: JobSpec) -> list[InitErrorDetails]:
    """The sweep's rules that need the whole spec. First each part on its own against the spec:
    variants (slug names, nothing unsweepable, the merged spec valid), grid and sample paths (exist,
    may be swept) and values (valid at their path), the early-stop metric. Then, when those pass,
    every trial as a complete JobSpec, and no two trials of one draw the same spec."""
    sweep = spec.sweep
    errors = _early_stop_errors(spec)
    if not sweep.enabled:
        return errors
    base = trial_base(spec)
    for name, variant in sweep.variants.items():
        errors.extend(_variant_errors(spec, base, name, variant))
    for key, values in sweep.grid.items():
        errors.extend(_values_errors(base, ("sweep", "grid", key), key, values))
    for key, dist in sweep.sample.items():
        errors.extend(_values_errors(base, ("sweep", "sample", key), key, dist.extremes(), dist.kind))
    return errors or _trial_errors(spec, base)


def _unsweepable(path: tuple[str | int, ...]) -> bool:
    dotted = ".".join(str(p) for p in path)
    return any(dotted == u or dotted.startswith(u + ".") for u in UNSWEEPABLE)


def _path_problem(key: str) -> str | None:
    problem = check_schema_path(JobSpec, key)
    if problem is None and _unsweepable(tuple(key.split("."))):
        problem = "this path names or places the job and cannot be swept"
    return problem


def _values_errors(
    base: dict[str, Any], loc: tuple[str, ...], key: str, values: list[Any], kind: str | None = None
) -> list[InitErrorDetails]:
    """A swept path and each of its values, alone on the spec. `kind` is a sample distribution's (its
    values are then the choices, or the rounded bounds that every draw lies between)."""
    problem = _path_problem(key)
    if problem is not None:
        return [cross_error(loc, problem, key)]
    if kind is not None:
        loc = (*loc, kind)
    keys = tuple(key.split("."))
    errors = []
    for i, value in enumerate(values):
        try:
            JobSpec.model_validate(_with(base, {key: value}))
        except ValidationError as exc:
            msgs = []
            for path, msg in describe_errors(exc.errors(), JobSpec):
                if path[: len(keys)] == keys:
                    rest = format_path(path[len(keys) :])
                    msgs.append(f"{rest}: {msg}" if rest else msg)
                else:
                    msgs.append(f"makes {format_path(path)} invalid: {msg}")
            text = "; ".join(msgs)
            if kind in ("uniform", "loguniform") and "expected an integer" in text:
                text += f" ({kind} draws numbers with a fraction; list integers with `choice`)"
            errors.append(cross_error((*loc, i), text, value))
    return errors


def _slug_problem(value: str) -> str | None:
    if _SLUG.match(value):
        return None
    return (
        "expected a slug (lowercase letters, digits, '-', '_'; starting with a letter or digit), "
        f"got {value!r}"
    )


def _variant_errors(
    spec: JobSpec, base: dict[str, Any], name: str, variant: dict[str, Any]
) -> list[InitErrorDetails]:
    """A variant's name, the paths it names, and the spec it makes, on its own."""
    loc = ("sweep", "variants", name)
    problem = _slug_problem(name)
    if problem is not None:
        return [cross_error(loc, f"variant name: {problem}", name)]
    patch = merge_variant(base, name, variant, JobSpec)
    errors = [
        cross_error((*loc, *path), "this path names or places the job and cannot be varied")
        for path in sorted(patch.touched)
        if _unsweepable(path) and not _unsweepable(path[:-1])
    ]
    if errors:
        return errors
    # a variant pins what it sets: pinning a path the sweep varies exhaustively repeats its trials
    sweep = spec.sweep
    varied = {k: len(v) for k, v in sweep.grid.items()} | ({"seed": len(sweep.seeds)} if sweep.seeds else {})
    for key, n in varied.items():
        pinned = patch.pinned_at(tuple(key.split(".")))
        if n > 1 and pinned is not None:
            where = "sweep.seeds" if key == "seed" and sweep.seeds else format_path(("sweep", "grid", key))
            errors.append(
                cross_error(
                    loc,
                    f"sets {'.'.join(pinned)}, which {where} varies: the variant pins it, so its trials "
                    "would repeat",
                )
            )
    sampled = [tuple(k.split(".")) for k in sweep.sample]
    if sweep.num_samples > 1 and sampled and all(patch.pins(p) for p in sampled):
        errors.append(
            cross_error(
                loc,
                f"sets every sampled path ({', '.join('.'.join(p) for p in sampled)}): the variant pins "
                f"them, so its {sweep.num_samples} draws would be the same trial",
            )
        )
    try:
        JobSpec.model_validate(patch.data)
    except ValidationError as exc:
        for path, msg in describe_errors(exc.errors(), JobSpec):
            if _set_by_variant(patch, path):
                errors.append(cross_error((*loc, *path), msg))
            else:
                errors.append(cross_error(loc, f"makes {format_path(path)} invalid: {msg}"))
    return errors


def _set_by_variant(patch: VariantPatch, path: tuple[str | int, ...]) -> bool:
    return path in patch.touched or any(path[: len(p)] == p for p in patch.pinned)


def _metric_problem(metric: str, tasks: list[str]) -> str | None:
    """Why trials with these `eval.tasks` would not report `metric` (None if they would)."""
    prefix, _, name = metric.partition("/")
    if name and (prefix == "train" or prefix in tasks):
        return None
    summaries = f" or '<task>/<name>' for a task in eval.tasks ({', '.join(tasks)})" if tasks else ""
    return f"expected a reported metric, 'train/<name>'{summaries}, got {metric!r}"


def _early_stop_errors(spec: JobSpec) -> list[InitErrorDetails]:
    stop = spec.sweep.early_stop
    if stop is None:
        return []
    loc = ("sweep", "early_stop")
    if not spec.sweep.enabled:
        return [
            cross_error(
                loc,
                "needs a sweep (variants, grid, sample or seeds): a job of one trial runs without Ray "
                "Tune, so nothing would stop it early",
            )
        ]
    problem = _metric_problem(stop.metric, spec.eval.tasks or [])
    return [cross_error((*loc, "metric"), problem, stop.metric)] if problem else []


def _trial_errors(spec: JobSpec, base: dict[str, Any]) -> list[InitErrorDetails]:
    """Every trial as a complete JobSpec (a combination can be invalid where each part is valid), and
    no two trials of one draw that would train the same spec (e.g. a variant pinning a grid path).
    Each problem is placed at the part of the sweep that set the invalid value."""
    sweep = spec.sweep
    errors: list[InitErrorDetails] = []
    invalid = 0
    first_of: dict[tuple[int | None, str], str] = {}
    for point in sweep_points(sweep, base, JobSpec):
        problems: list[InitErrorDetails] = []
        try:
            trial = JobSpec.model_validate(point.data)
        except ValidationError as exc:
            problems = [_trial_problem(sweep, point, p, m) for p, m in describe_errors(exc.errors(), JobSpec)]
        else:
            stop = sweep.early_stop
            problem = _metric_problem(stop.metric, trial.eval.tasks or []) if stop is not None else None
            if problem is not None:  # a variant changed the evaluated tasks
                problems.append(
                    cross_error(("sweep", "early_stop", "metric"), f"trial {point.key}: {problem}")
                )
            text = json.dumps(trial.model_dump(mode="json"), sort_keys=True)
            first = first_of.setdefault((point.draw, hashlib.sha256(text.encode()).hexdigest()), point.key)
            if first != point.key:
                problems.append(_duplicate_problem(point, first))
        if problems:
            invalid += 1
            if invalid <= _MAX_TRIAL_PROBLEMS:
                errors.extend(problems)
    if invalid > _MAX_TRIAL_PROBLEMS:
        errors.append(
            cross_error(
                ("sweep",),
                f"{invalid} of {sweep.num_trials} trials are invalid; "
                f"the first {_MAX_TRIAL_PROBLEMS} are shown",
            )
        )
    return errors


def _trial_problem(
    sweep: SweepSpec, point: SweepPoint, path: tuple[str | int, ...], msg: str
) -> InitErrorDetails:
    """An invalid value of a trial, at what set it: a grid or sample path, the variant, or (set by
    none of them) the sweep itself. (Seeds are valid wherever the section is.)"""
    where = f"trial {point.key}: {format_path(path)}: {msg}"
    for key in point.assignments:
        if key == "variant" or (key == "seed" and sweep.seeds):
            continue
        keys = tuple(key.split("."))
        if path[: len(keys)] == keys:
            return cross_error(("sweep", "grid" if key in sweep.grid else "sample", key), where)
    if point.variant is not None and _set_by_variant(point.variant, path):
        return cross_error(("sweep", "variants", point.variant.name, *path), f"trial {point.key}: {msg}")
    return cross_error(("sweep",), f"trial {point.key} makes {format_path(path)} invalid: {msg}")


def _duplicate_problem(point: SweepPoint, first: str) -> InitErrorDetails:
    loc = ("sweep",) if point.variant is None else ("sweep", "variants", point.variant.name)
    return cross_error(
        loc,
        f"trials {first} and {point.key} would train the same spec (a value or a variant repeats another)",
    )
