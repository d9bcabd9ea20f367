"""The STARS job spec: Pydantic models for everything a job configures, and its YAML loader.

The modules import one way, each only from those above it:

1. `base`, `depths`, `paths`, `redaction`, `schema`, `problems`: the `Section` base and strict
   number types, depth lists, path and secret helpers, schema walking and error descriptions;
   `architecture`: the LoopLM architecture rules (shared with `stars.model.config`).
2. one module per section: `model`, `data`, `stars`, `train`, `resources`, `eval`, `sweep`,
   `tracking`.
3. `job`: `JobSpec`, the rules across sections and the defaults that follow from them.
4. `expand`: a sweep (variants x grid x sampled draws x seeds) as trials.
5. `resolve`: `resolve_spec`, `resolved_yaml`, `spec_hash` (the resume identity), warnings.
6. `loader`: `load_spec` and friends, every problem at once with file, line and path.

The field docstrings are the documentation (`starsctl schema` prints them as JSON schema). Every
model forbids unknown keys. Importing this package imports pydantic and yaml only (never torch, ray,
mlflow or numpy), so `starsctl validate` is instant.
"""

from stars.spec.architecture import (
    INJECTIONS,
    MLPS,
    NORM_POSITIONS,
    NORM_TYPES,
    POSITIONS,
    architecture_problems,
)
from stars.spec.base import MAX_SEED, Float, Int, Section
from stars.spec.data import DEFAULT_SYSTEM_PROMPT, AdditionData, DataSpec, MathSFTData, addition_capacity
from stars.spec.depths import MAX_DEPTH, compact_depths, parse_depths
from stars.spec.eval import EVAL_TASK_NEEDS, EVAL_TASKS, MATH_BENCHMARKS, EvalResources, EvalSpec, EvalTask
from stars.spec.expand import Trial, sweep_trials
from stars.spec.job import SECTION_NAMES, UNSWEEPABLE, JobSpec, cross_section_errors, fill_derived_defaults
from stars.spec.loader import (
    SpecError,
    SpecProblem,
    apply_overrides,
    load_spec,
    parse_override,
    validate_data,
)
from stars.spec.model import (
    CheckpointModel,
    LoopLMModel,
    ModelSpec,
    NormSpec,
    WeightsDtype,
    checkpoint_location_problem,
)
from stars.spec.paths import absolute_path, is_local_path, is_path_like, safe_path_component
from stars.spec.problems import describe_errors
from stars.spec.redaction import REDACTED, is_secret_key, redact_tree, redact_uri
from stars.spec.resolve import (
    COMPUTING_FIELDS,
    NON_COMPUTING_FIELDS,
    computing_view,
    default_tracking_uri,
    is_local_store,
    resolve_spec,
    resolved_yaml,
    spec_hash,
    spec_warnings,
)
from stars.spec.resources import DEFAULT_STORAGE_PATH, ResourcesSpec
from stars.spec.schema import check_schema_path, did_you_mean, format_path, schema_field_names
from stars.spec.stars import (
    FixedLoops,
    JsrrMode,
    JSRRSpec,
    LognormalLoops,
    LoopSampling,
    PoissonLognormalLoops,
    SeededSampler,
    StarsSpec,
    UniformLoops,
)
from stars.spec.sweep import (
    MAX_TRIALS,
    SAMPLE_DIGITS,
    EarlyStopSpec,
    SampleDistribution,
    SweepSpec,
    trial_key,
)
from stars.spec.tracking import TrackingSpec
from stars.spec.train import TrainSpec

__all__ = [
    "COMPUTING_FIELDS",
    "DEFAULT_STORAGE_PATH",
    "DEFAULT_SYSTEM_PROMPT",
    "EVAL_TASKS",
    "EVAL_TASK_NEEDS",
    "INJECTIONS",
    "MATH_BENCHMARKS",
    "MAX_DEPTH",
    "MAX_SEED",
    "MAX_TRIALS",
    "MLPS",
    "NON_COMPUTING_FIELDS",
    "NORM_POSITIONS",
    "NORM_TYPES",
    "POSITIONS",
    "REDACTED",
    "SAMPLE_DIGITS",
    "SECTION_NAMES",
    "UNSWEEPABLE",
    "AdditionData",
    "CheckpointModel",
    "DataSpec",
    "EarlyStopSpec",
    "EvalResources",
    "EvalSpec",
    "EvalTask",
    "FixedLoops",
    "Float",
    "Int",
    "JSRRSpec",
    "JobSpec",
    "JsrrMode",
    "LognormalLoops",
    "LoopLMModel",
    "LoopSampling",
    "MathSFTData",
    "ModelSpec",
    "NormSpec",
    "PoissonLognormalLoops",
    "ResourcesSpec",
    "SampleDistribution",
    "Section",
    "SeededSampler",
    "SpecError",
    "SpecProblem",
    "StarsSpec",
    "SweepSpec",
    "TrackingSpec",
    "TrainSpec",
    "Trial",
    "UniformLoops",
    "WeightsDtype",
    "absolute_path",
    "checkpoint_location_problem",
    "addition_capacity",
    "apply_overrides",
    "architecture_problems",
    "check_schema_path",
    "compact_depths",
    "computing_view",
    "cross_section_errors",
    "default_tracking_uri",
    "describe_errors",
    "did_you_mean",
    "fill_derived_defaults",
    "format_path",
    "is_local_path",
    "is_local_store",
    "is_path_like",
    "is_secret_key",
    "load_spec",
    "parse_depths",
    "parse_override",
    "redact_tree",
    "redact_uri",
    "resolve_spec",
    "resolved_yaml",
    "safe_path_component",
    "schema_field_names",
    "spec_hash",
    "spec_warnings",
    "sweep_trials",
    "trial_key",
    "validate_data",
]
