"""The `eval` section: depth-curve evaluation of checkpoints and its resources."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, field_serializer, field_validator, model_validator
from pydantic_core import PydanticCustomError

from stars.spec.base import Float, Int, Section
from stars.spec.depths import DEPTHS_SCHEMA, compact_depths, parse_depths
from stars.spec.resources import CustomResource

__all__ = [
    "EVAL_TASKS",
    "EVAL_TASK_NEEDS",
    "MATH_BENCHMARKS",
    "EvalResources",
    "EvalSpec",
    "EvalTask",
    "MathBenchmark",
]

EvalTask = Literal["addition", "gsm8k", "math500", "asdiv", "svamp", "amc23"]
#: Evaluation tasks the platform knows: the spec's declaration of the task registry's evaluation tasks
#: (`stars.tasks.registry`; tests/tasks/test_registry.py checks that the two agree).
EVAL_TASKS: tuple[str, ...] = get_args(EvalTask)
MathBenchmark = Literal["gsm8k", "math500", "asdiv", "svamp", "amc23"]
MATH_BENCHMARKS: tuple[str, ...] = get_args(MathBenchmark)
#: Evaluation task -> (the `data.task` whose checkpoints it can score, why). The registry's entries
#: carry the same `trained_on`; the spec keeps its own copy so validating needs no task code.
EVAL_TASK_NEEDS: dict[str, tuple[str, str]] = {
    "addition": ("addition", "uses the addition task's own character vocabulary"),
    **{name: ("math_sft", "is a math benchmark scored from generated text") for name in MATH_BENCHMARKS},
}


class EvalResources(Section):
    """Resources of one evaluation actor."""

    cpus: Float = Field(default=1.0, gt=0, le=1024)
    """CPUs per evaluation actor."""
    gpus: Float = Field(default=0.0, ge=0, le=64)
    """GPUs per evaluation actor."""
    accelerator_type: str | None = None
    """Required GPU type for evaluation actors (needs gpus > 0)."""
    custom: dict[str, CustomResource] = Field(default_factory=dict)
    """Extra custom Ray resources per evaluation actor."""

    @model_validator(mode="after")
    def _check(self) -> EvalResources:
        if self.accelerator_type is not None and self.gpus <= 0:
            raise PydanticCustomError("stars_cross", "accelerator_type needs gpus > 0")
        return self


class EvalSpec(Section):
    """Depth-curve evaluation: every task scored at every depth in `depths`, plus dynamics
    diagnostics (hidden norm, step size, distance from start, spectral radius)."""

    tasks: list[EvalTask] | None = None
    """Tasks to score: `addition`, or math benchmarks `gsm8k`, `math500`, `asdiv`, `svamp`,
    `amc23`. null = the training task when it is `addition`, else none; [] = no evaluation."""
    depths: Annotated[list[int], Field(min_length=1), DEPTHS_SCHEMA] = Field(
        default_factory=lambda: parse_depths("1-16")
    )
    """Depths to score, e.g. `"1-16"`, `"1,2,4,8,16"`, `"1-8,12"` or a list."""
    rho_depths: Annotated[list[int], DEPTHS_SCHEMA] = Field(default_factory=lambda: [1, 4, 8, 16])
    """Depths at which to estimate the spectral radius of the block's Jacobian (costly; keep it to
    a few). [] = none."""
    rho_iters: Int = Field(default=20, ge=1, le=10_000)
    """Power iterations for each spectral radius estimate."""
    limit: Int | None = Field(default=None, ge=1, le=10**9)
    """Score at most this many examples per task; null = all."""
    batch_size: Int = Field(default=64, ge=1, le=65536)
    """Sequences per evaluation batch."""
    max_new_tokens: Int | None = Field(default=None, ge=1, le=1_048_576)
    """Generation budget; null = the task's default (addition: the answer length; math: 2048)."""
    every_checkpoint: bool = True
    """Evaluate every committed checkpoint; false = only the final one."""
    workers: Int = Field(default=1, ge=1, le=4096)
    """Evaluation actors running in parallel."""
    timeout_s: Float | None = Field(default=14_400.0, ge=1, le=604_800)
    """Seconds one (checkpoint, task) unit may run on an evaluator before the evaluator counts as
    hung: it is killed and restarted, and the unit tried again. null = no timeout. The default, 4 h,
    is about twice an estimate (not a measurement) of the longest unit in jobs/stars_numina.yaml:
    gsm8k's 1319 problems at depths 1-16 with a 2048-token budget on a 1.4B LoopLM and one A800. Set
    it to a few times the seconds your units take (each done record in the ledger says); short tasks
    (addition takes seconds) catch a hang sooner with a lower value."""
    max_attempts: Int = Field(default=3, ge=1, le=100)
    """Tries per (checkpoint, task) unit: after this many timed out or lost their evaluator, the unit
    is recorded as failed (its MLflow eval run ends FAILED with the reason in the tag
    `stars.eval.failure`), never scored again, and training goes on."""
    resources: EvalResources = Field(default_factory=EvalResources)
    """Resources of each evaluation actor."""
    benchmark_paths: dict[MathBenchmark, str] = Field(default_factory=dict)
    """Local copies of math benchmarks, for clusters without hub access: benchmark -> a file
    (jsonl/json/parquet/csv) or directory in the benchmark's own format, e.g.
    `{gsm8k: /data/gsm8k/test.jsonl}`. Relative paths are relative to where the job is started.
    Benchmarks not named here load from the Hugging Face hub."""

    @field_validator("depths", "rho_depths", mode="before")
    @classmethod
    def _parse_depths(cls, value: Any) -> list[int]:
        return [] if value == [] else parse_depths(value)

    @field_serializer("depths", "rho_depths")
    def _compact(self, value: list[int]) -> str | list[int]:
        return compact_depths(value) if value else []
