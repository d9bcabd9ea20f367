"""The STARS job spec: one Pydantic model for everything a job configures.

A job spec is a YAML file (see `jobs/`) validated into `JobSpec`. Each section has its own model:

| section     | model           | what                                                           |
|-------------|-----------------|----------------------------------------------------------------|
| `model`     | `ModelSpec`     | a new LoopLM (architecture fields) or a checkpoint to load      |
| `data`      | `DataSpec`      | the training task: `addition` or `math_sft` (union on `task`)  |
| `stars`     | `StarsSpec`     | random loop sampling (union on `kind`) and JSRR                |
| `train`     | `TrainSpec`     | optimiser, schedule, batch sizes, precision, checkpoints       |
| `resources` | `ResourcesSpec` | Ray Train workers, GPUs, accelerator type, storage             |
| `eval`      | `EvalSpec`      | depth-curve evaluation of checkpoints                          |
| `sweep`     | `SweepSpec`     | a grid over dotted spec paths (one Ray Tune trial per point)   |
| `tracking`  | `TrackingSpec`  | MLflow tracking store and experiment                           |

The field docstrings are the documentation (`starsctl schema` prints them as JSON schema).
Every model forbids unknown keys. Validation is pure and fast: this module imports only pydantic
and yaml (never torch, ray or mlflow), so `starsctl validate` is instant.

Two stages:
- `JobSpec.model_validate(data)` checks every field and every cross-section rule and fills the
  defaults that follow from other fields (`experiment`, `train.micro_batch_size`,
  `resources.gpus_per_worker`, `eval.tasks`, the LoopLM architecture defaults).
- `resolve_spec(spec)` fills what depends on where the job is started: absolute local paths and the
  tracking URI. `stars.spec_loader.load_spec` does both and reports all errors at once.
The resolved spec (`resolved_yaml`) is what a job runs and what is saved with its MLflow run.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "AdditionData",
    "DataSpec",
    "EVAL_TASKS",
    "EvalResources",
    "EvalSpec",
    "FixedLoops",
    "JSRRSpec",
    "JobSpec",
    "LognormalLoops",
    "LoopSampling",
    "MathSFTData",
    "ModelSpec",
    "NormSpec",
    "PoissonLognormalLoops",
    "ResourcesSpec",
    "StarsSpec",
    "SweepSpec",
    "TrackingSpec",
    "TrainSpec",
    "Trial",
    "UniformLoops",
    "compact_depths",
    "default_tracking_uri",
    "flatten_params",
    "is_local_path",
    "is_local_store",
    "load_spec",
    "parse_depths",
    "resolve_spec",
    "resolved_yaml",
    "schema_field_names",
    "spec_hash",
    "spec_warnings",
    "sweep_trials",
]

#: Evaluation tasks the platform knows (kept in sync with `stars.tasks`).
EVAL_TASKS: tuple[str, ...] = ("addition", "gsm8k", "math500", "asdiv", "svamp", "amc23")
MATH_BENCHMARKS: tuple[str, ...] = ("gsm8k", "math500", "asdiv", "svamp", "amc23")
MAX_DEPTH = 1024
DEFAULT_STORAGE_PATH = "./stars_runs"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant that can assist users with reasoning."

EvalTask = Literal["addition", "gsm8k", "math500", "asdiv", "svamp", "amc23"]
assert get_args(EvalTask) == EVAL_TASKS


class _Section(BaseModel):
    """Base of every spec model: unknown keys are errors; attribute docstrings are the field help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def _cross_error(loc: tuple[str | int, ...], message: str, value: Any = None) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError("stars_cross", "{message}", {"message": message}), loc=loc, input=value
    )


def _raise_all(title: str, errors: list[InitErrorDetails]) -> None:
    if errors:
        raise ValidationError.from_exception_data(title, errors)


# --------------------------------------------------------------------------------------- depths
_DEPTH_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_depths(value: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """Parse a depth list: `"1-16"`, `"1,2,4,8"`, `"1-8,12,16"`, an int or a list of ints.

    Returns the sorted unique depths. Raises ValueError with a readable message.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected depths like '1-16' or [1, 2, 4], got {value!r}")
    if isinstance(value, int):
        items: list[int] = [value]
    elif isinstance(value, str):
        items = []
        for part in value.split(","):
            m = _DEPTH_ITEM.match(part)
            if not m:
                raise ValueError(f"expected depths like '1-16' or '1,2,4,8', got {value!r}")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            if hi < lo:
                raise ValueError(f"depth range {part.strip()!r} is empty (end < start)")
            if hi > MAX_DEPTH:
                raise ValueError(f"depths must be <= {MAX_DEPTH}, got {hi}")
            items.extend(range(lo, hi + 1))
    elif isinstance(value, (list, tuple)):
        items = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"expected a list of integers, got {v!r} in {list(value)!r}")
            items.append(v)
    else:
        raise ValueError(f"expected depths like '1-16' or [1, 2, 4], got {value!r}")
    if not items:
        raise ValueError("expected at least one depth")
    bad = [d for d in items if d < 1 or d > MAX_DEPTH]
    if bad:
        raise ValueError(f"depths must be between 1 and {MAX_DEPTH}, got {bad[0]}")
    return sorted(set(items))


def compact_depths(depths: list[int]) -> str:
    """The inverse of `parse_depths`: `[1, 2, 3, 4, 8]` -> `"1-4,8"`."""
    parts: list[str] = []
    ds = sorted(set(depths))
    i = 0
    while i < len(ds):
        j = i
        while j + 1 < len(ds) and ds[j + 1] == ds[j] + 1:
            j += 1
        parts.append(str(ds[i]) if i == j else f"{ds[i]}-{ds[j]}")
        i = j + 1
    return ",".join(parts)


# ---------------------------------------------------------------------------------------- model
class NormSpec(_Section):
    """Normalisation inside the recurrent block (reference section 2: 4 positions x 3 types)."""

    type: Literal["layernorm", "rmsnorm", "simplenorm"] = "layernorm"
    """`layernorm` (affine LayerNorm), `rmsnorm` (learned gain) or `simplenorm` (LayerNorm without
    gain or bias)."""
    position: Literal["pre", "post", "pre_sandwich", "post_sandwich"] = "post_sandwich"
    """Where the norms sit around each sublayer f: `pre` x+f(N(x)); `post` N(x+f(x));
    `pre_sandwich` x+N2(f(N1(x))); `post_sandwich` N2(x+f(N1(x))) (the STARS choice)."""
    eps: float = Field(default=1e-5, gt=0, lt=1)
    """Epsilon of every norm."""


#: Architecture fields of `ModelSpec` and their defaults for `source: looplm` (LoopLMConfig's).
ARCH_DEFAULTS: dict[str, Any] = {
    "d_model": 128,
    "n_heads": 4,
    "n_kv_heads": None,
    "d_ff": None,
    "n_prelude": 0,
    "n_block": 2,
    "n_coda": 0,
    "norm": None,  # NormSpec()
    "loop_norm": False,
    "injection": "none",
    "positions": "learned",
    "rope_theta": 10000.0,
    "max_position_embeddings": 128,
    "mlp": "gelu",
    "attn_bias": True,
    "mlp_bias": True,
    "dropout": 0.0,
    "tie_word_embeddings": True,
    "embed_init_std": 0.02,
    "init_std": 0.02,
    "default_depth": 4,
    "exit_gate": False,
}
#: Fields that may stay null in a resolved `looplm` spec (LoopLMConfig derives them).
_ARCH_NULLABLE = {"n_kv_heads", "d_ff"}


class ModelSpec(_Section):
    """The model: a new LoopLM built from the architecture fields below (`source: looplm`), or a
    checkpoint (`pretrained`, `ouro`) whose architecture comes from the checkpoint itself.

    Architecture fields left out get LoopLMConfig's defaults for `looplm` and must be left out for
    `pretrained`/`ouro`. `vocab_size` and the pad/bos/eos ids come from the task's tokenizer.
    """

    source: Literal["looplm", "pretrained", "ouro"] = "looplm"
    """`looplm`: a new LoopLM from this config; `pretrained`: a LoopLM saved by this platform
    (a `save_pretrained` directory); `ouro`: an Ouro checkpoint (directory or hub id)."""
    pretrained: str | None = None
    """Checkpoint directory or hub id; required for `pretrained` and `ouro`, not allowed for
    `looplm`."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own Python code (transformers `trust_remote_code`). Off by default:
    the platform's loaders do not need it."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the weights (the optimiser's master weights). Keep `float32` and train with
    `train.precision: bf16` (autocast): with bf16 weights most updates at lr ~1e-6 round to zero."""

    d_model: int | None = Field(default=None, ge=1)
    """Hidden size (default 128)."""
    n_heads: int | None = Field(default=None, ge=1)
    """Attention heads; must divide d_model (default 4)."""
    n_kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads (grouped-query attention); must divide n_heads; null = n_heads."""
    d_ff: int | None = Field(default=None, ge=1)
    """MLP inner size; null = 4 * d_model."""
    n_prelude: int | None = Field(default=None, ge=0)
    """Layers before the loop, applied once (default 0)."""
    n_block: int | None = Field(default=None, ge=1)
    """Layers in the shared recurrent block applied `depth` times (default 2)."""
    n_coda: int | None = Field(default=None, ge=0)
    """Layers after the loop, applied once (default 0)."""
    norm: NormSpec | None = None
    """Norm type, position and eps inside the block (default layernorm, post_sandwich, 1e-5)."""
    loop_norm: bool | None = None
    """Apply the final norm after every loop step and feed it to the next (Ouro's layout;
    default false)."""
    injection: Literal["none", "add", "linear"] | None = None
    """Input injection before each loop step: `none`, `add` (h + e) or `linear` (W[h; e])
    (default none)."""
    positions: Literal["learned", "rope"] | None = None
    """Position encoding: `learned` embeddings or `rope` (default learned)."""
    rope_theta: float | None = Field(default=None, gt=0)
    """RoPE base (default 10000)."""
    max_position_embeddings: int | None = Field(default=None, ge=1)
    """Longest sequence the model accepts (default 128); must cover the task's sequences when
    positions are learned."""
    mlp: Literal["gelu", "swiglu"] | None = None
    """MLP kind: `gelu` or gated `swiglu` (default gelu)."""
    attn_bias: bool | None = None
    """Bias in the attention projections (default true)."""
    mlp_bias: bool | None = None
    """Bias in the MLP projections (default true)."""
    dropout: float | None = Field(default=None, ge=0, lt=1)
    """Dropout probability (default 0)."""
    tie_word_embeddings: bool | None = None
    """Share the embedding matrix with the LM head (default true)."""
    embed_init_std: float | None = Field(default=None, gt=0)
    """Std of the embedding initialisation (default 0.02; N(0, 1) makes pre-norm models stall)."""
    init_std: float | None = Field(default=None, gt=0)
    """Std of the other weights' initialisation (default 0.02)."""
    default_depth: int | None = Field(default=None, ge=1, le=MAX_DEPTH)
    """Depth used when a forward call gives none (default 4). Training depth comes from
    `stars.loop_sampling`, evaluation depths from `eval.depths`."""
    exit_gate: bool | None = None
    """Keep an Ouro-style early-exit gate (default false)."""

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        errors: list[InitErrorDetails] = []
        if self.source == "looplm":
            if self.pretrained is not None:
                errors.append(
                    _cross_error(
                        ("pretrained",),
                        "only for model.source 'pretrained' or 'ouro'; a 'looplm' model is built new "
                        "from the architecture fields",
                        self.pretrained,
                    )
                )
            for name, default in ARCH_DEFAULTS.items():
                if getattr(self, name) is None and name not in _ARCH_NULLABLE:
                    setattr(self, name, NormSpec() if name == "norm" else default)
            assert self.d_model is not None and self.n_heads is not None
            if self.d_model % self.n_heads:
                errors.append(
                    _cross_error(
                        ("n_heads",),
                        f"must divide d_model={self.d_model}, got {self.n_heads}",
                        self.n_heads,
                    )
                )
            elif self.positions == "rope" and (self.d_model // self.n_heads) % 2:
                errors.append(
                    _cross_error(
                        ("n_heads",),
                        f"positions 'rope' needs an even head size d_model/n_heads, got "
                        f"{self.d_model}/{self.n_heads}",
                        self.n_heads,
                    )
                )
            if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
                errors.append(
                    _cross_error(
                        ("n_kv_heads",),
                        f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}",
                        self.n_kv_heads,
                    )
                )
        else:
            if not self.pretrained:
                errors.append(
                    _cross_error(
                        ("pretrained",),
                        f"required when model.source is {self.source!r}: a checkpoint directory or hub id",
                    )
                )
            for name in ARCH_DEFAULTS:
                value = getattr(self, name)
                if value is not None:
                    errors.append(
                        _cross_error(
                            (name,),
                            f"the architecture comes from the checkpoint when model.source is "
                            f"{self.source!r}; remove this key",
                            value if not isinstance(value, BaseModel) else value.model_dump(),
                        )
                    )
        _raise_all("ModelSpec", errors)
        return self

    def looplm_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `stars.model.LoopLMConfig` (names as in docs/interfaces.md).

        Only for `source: looplm`. Leaves out vocab_size and the pad/bos/eos ids: the task supplies
        them. `n_kv_heads`/`d_ff` may be None (LoopLMConfig derives them).
        """
        if self.source != "looplm":
            raise ValueError(
                f"looplm_config_kwargs() is only for model.source 'looplm', not {self.source!r}: "
                "the architecture of a checkpoint comes from the checkpoint"
            )
        assert self.norm is not None
        kwargs: dict[str, Any] = {}
        for name in ARCH_DEFAULTS:
            if name == "norm":
                kwargs["norm_type"] = self.norm.type
                kwargs["norm_position"] = self.norm.position
                kwargs["norm_eps"] = self.norm.eps
            else:
                kwargs[name] = getattr(self, name)
        return kwargs


# ----------------------------------------------------------------------------------------- data
def _check_file(value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    if not p.exists():
        raise ValueError(f"file not found: {value!r} (relative paths are relative to {os.getcwd()})")
    if not p.is_file():
        raise ValueError(f"not a file: {value!r}")
    return value


class AdditionData(_Section):
    """The 4-digit addition diagnostic (reference section 5): `1750+4733= 3846<eos>` with the
    answer reversed, character tokens (vocab 15), loss on the answer only."""

    task: Literal["addition"] = "addition"
    """Task selector."""
    digits: int = Field(default=4, ge=1, le=9)
    """Digits per operand (operands are uniform `digits`-digit numbers)."""
    num_train: int = Field(default=100_000, ge=1)
    """Generated training problems (ignored when `train_file` is given)."""
    num_test: int = Field(default=1000, ge=1)
    """Generated held-out problems, all scored (ignored when `test_file` is given)."""
    seed: int = Field(default=0, ge=0)
    """Seed of the generated problems (train and test are disjoint)."""
    train_file: str | None = None
    """Optional jsonl of training problems in the reference format (`num1`, `num2`, `sum`, ...).
    Must exist; relative paths are relative to the working directory."""
    test_file: str | None = None
    """Optional jsonl of test problems, same format. Must exist."""

    @field_validator("train_file", "test_file")
    @classmethod
    def _files_exist(cls, value: str | None) -> str | None:
        return _check_file(value)

    def max_seq_len(self) -> int:
        """Length of the longest problem in tokens: 2 operands, '+', '=', space, digits+1, eos."""
        return 3 * self.digits + 5


class MathSFTData(_Section):
    """Chat-format math supervised fine-tuning (reference section 7): system prompt, user = problem,
    assistant = solution, loss on the assistant's tokens only."""

    task: Literal["math_sft"] = "math_sft"
    """Task selector."""
    dataset: str = "AI-MO/NuminaMath-1.5"
    """Hub dataset id, or a local path (a `save_to_disk` directory or a json/jsonl/parquet file)."""
    config: str | None = None
    """Dataset configuration name, if the dataset has several."""
    split: str = "train"
    """Dataset split."""
    problem_column: str = "problem"
    """Column holding the problem (the user turn)."""
    solution_column: str = "solution"
    """Column holding the solution (the assistant turn)."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """System prompt of every conversation (the paper's)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; null = the model checkpoint's (`model.pretrained`). Required
    when `model.source` is `looplm`."""
    num_samples: int | None = Field(default=None, ge=1)
    """Keep the first N rows after dropping empty ones and shuffling; null = all (paper: 400000)."""
    shuffle_seed: int = Field(default=74, ge=0)
    """Seed of the shuffle before taking `num_samples` (paper: 74)."""
    max_seq_len: int = Field(default=2048, ge=8)
    """Longest tokenized conversation used in training."""
    length_policy: Literal["drop", "truncate"] = "drop"
    """What to do with longer conversations: `drop` them or `truncate` them to `max_seq_len`."""
    num_proc: int = Field(default=1, ge=1)
    """Processes for tokenization (datasets `map(num_proc=...)`)."""


DataSpec = Annotated[Union[AdditionData, MathSFTData], Field(discriminator="task")]  # noqa: UP007

# ---------------------------------------------------------------------------------------- stars


class _MinMax(_Section):
    @model_validator(mode="after")
    def _check_range(self) -> _MinMax:
        lo, hi = self.min, self.max  # type: ignore[attr-defined]
        if lo > hi:
            raise PydanticCustomError("stars_cross", "min ({lo}) must be <= max ({hi})", {"lo": lo, "hi": hi})
        return self


class FixedLoops(_Section):
    """Always the same depth (the SFT baseline)."""

    kind: Literal["fixed"] = "fixed"
    """Sampler selector."""
    depth: int = Field(default=4, ge=1, le=MAX_DEPTH)
    """The depth of every training step."""


class LognormalLoops(_MinMax):
    """`t = clip(round(lognormal(mu, sigma)), min, max)` (STARS; paper: mu 1.7, sigma 0.4, [1, 16],
    mean ~5.9)."""

    kind: Literal["lognormal"] = "lognormal"
    """Sampler selector."""
    mu: float = 1.7
    """Mean of the underlying normal."""
    sigma: float = Field(default=0.4, gt=0)
    """Standard deviation of the underlying normal."""
    min: int = Field(default=1, ge=1, le=MAX_DEPTH)
    """Smallest depth."""
    max: int = Field(default=16, ge=1, le=MAX_DEPTH)
    """Largest depth."""


class PoissonLognormalLoops(_MinMax):
    """Huginn's sampler: `r = Poisson(exp(N(log(mean) - sigma^2/2, sigma))) + 1`, clipped to
    [min, max], with gradients only through the last `backprop_depth` steps."""

    kind: Literal["poisson_lognormal"] = "poisson_lognormal"
    """Sampler selector."""
    mean: float = Field(default=6.0, gt=0)
    """Mean depth (before the +1 and clipping)."""
    sigma: float = Field(default=0.5, gt=0)
    """Standard deviation of the log-normal rate."""
    backprop_depth: int | None = Field(default=None, ge=1)
    """Truncated backprop: gradients flow only through the last k loop steps; null = all."""
    min: int = Field(default=1, ge=1, le=MAX_DEPTH)
    """Smallest depth."""
    max: int = Field(default=32, ge=1, le=MAX_DEPTH)
    """Largest depth."""


class UniformLoops(_MinMax):
    """Depth uniform on the integers [min, max]."""

    kind: Literal["uniform"] = "uniform"
    """Sampler selector."""
    min: int = Field(default=1, ge=1, le=MAX_DEPTH)
    """Smallest depth."""
    max: int = Field(default=16, ge=1, le=MAX_DEPTH)
    """Largest depth."""


LoopSampling = Annotated[
    Union[FixedLoops, LognormalLoops, PoissonLognormalLoops, UniformLoops],  # noqa: UP007
    Field(discriminator="kind"),
]


class JSRRSpec(_Section):
    """Jacobian Spectral Radius Regularization (reference section 4):
    loss = (1 - weight) * CE + weight * ||J v||^2 at the last loop state."""

    weight: float = Field(default=0.1, ge=0, lt=1)
    """lambda in [0, 1); 0 disables JSRR."""
    mode: Literal["vjp", "jvp", "fd"] = "vjp"
    """`vjp`: u = J^T v by double backward (the research code's); `jvp`: u = J v by forward mode;
    `fd`: J v by a central difference of two plain block applications (~25% cheaper than `vjp` on
    CPU, relative error ~1e-5 in float32; needs model.dtype float32; autocast is off inside it)."""
    power_iters: int = Field(default=1, ge=1, le=100)
    """Power-iteration steps for the estimate (1 = the paper's)."""
    start_step: int = Field(default=0, ge=0)
    """First optimizer step with the penalty (the addition recipe turns it on after warmup)."""
    batch_fraction: float = Field(default=1.0, gt=0, le=1)
    """Fraction of the micro-batch's sequences the penalty is computed on (cost vs noise)."""

    @property
    def enabled(self) -> bool:
        return self.weight > 0


class StarsSpec(_Section):
    """The STARS training recipe: random loop depth per step plus JSRR."""

    loop_sampling: LoopSampling = Field(default_factory=LognormalLoops)
    """Depth sampler, selected by `kind`: `fixed`, `lognormal`, `poisson_lognormal`, `uniform`.
    Every DDP rank uses the same depth in a step."""
    jsrr: JSRRSpec = Field(default_factory=JSRRSpec)
    """Jacobian spectral radius regularization."""


# ---------------------------------------------------------------------------------------- train
class TrainSpec(_Section):
    """Optimisation: AdamW, LR schedule, batch sizes, length, precision, checkpoints."""

    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to train. Give exactly one of `max_steps` and `epochs`."""
    epochs: int | None = Field(default=None, ge=1)
    """Passes over the training data (steps = epochs * ceil(len(data) / global_batch_size))."""
    global_batch_size: int = Field(default=128, ge=1)
    """Sequences per optimizer step over all workers; must be divisible by
    micro_batch_size * resources.num_workers (the rest is gradient accumulation)."""
    micro_batch_size: int | None = Field(default=None, ge=1)
    """Sequences per forward/backward on one worker; null = global_batch_size / num_workers
    (no accumulation)."""
    lr: float = Field(default=3e-4, gt=0, le=10)
    """Peak learning rate."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW decoupled weight decay."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    schedule: Literal["constant", "cosine", "wsd"] = "cosine"
    """LR schedule after warmup: `constant`; `cosine` decay to min_lr_ratio * lr; `wsd`
    (warmup-stable-decay) flat, then a linear decay over the last `decay_fraction` of training."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup steps from 0 (give this or warmup_fraction)."""
    warmup_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Warmup as a fraction of the total steps (paper's wsd: 0.1)."""
    decay_fraction: float = Field(default=0.1, gt=0, le=1)
    """`wsd` only: fraction of the total steps spent decaying."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final LR as a fraction of `lr` (`cosine`, `wsd`; paper's wsd: 0.001)."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value; null = no clipping."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`fp32`, or `bf16` autocast (weights stay in model.dtype). bf16 autocast also runs on CPU,
    so it does not require GPUs; on CPU it is usually slower than fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    checkpoint_every: int | None = Field(default=None, ge=1)
    """Save (and report to Ray Train) a checkpoint every N optimizer steps; the final step is
    always saved; null = final only."""
    keep_checkpoints: int | None = Field(default=None, ge=1)
    """Checkpoints kept in storage (oldest deleted first); null = all."""
    log_every: int = Field(default=10, ge=1)
    """Log training metrics every N optimizer steps."""

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        errors: list[InitErrorDetails] = []
        if (self.max_steps is None) == (self.epochs is None):
            which = "both are set" if self.max_steps is not None else "neither is set"
            errors.append(_cross_error(("max_steps",), f"give exactly one of max_steps and epochs ({which})"))
        if self.warmup_steps and self.warmup_fraction:
            errors.append(
                _cross_error(("warmup_fraction",), "give warmup_steps or warmup_fraction, not both")
            )
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            errors.append(
                _cross_error(
                    ("warmup_steps",),
                    f"must be < max_steps={self.max_steps}, got {self.warmup_steps}",
                    self.warmup_steps,
                )
            )
        if self.schedule == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            errors.append(
                _cross_error(("decay_fraction",), "warmup_fraction + decay_fraction must be <= 1")
            )
        _raise_all("TrainSpec", errors)
        return self


# ------------------------------------------------------------------------------------ resources
_URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_local_path(path: str) -> bool:
    """True for a plain filesystem path or a `file://` URI, False for s3://, gs://, ... URIs."""
    return not _URI_SCHEME.match(path) or path.startswith("file://")


class ResourcesSpec(_Section):
    """Where training runs: Ray Train `ScalingConfig`, storage and fault tolerance."""

    num_workers: int = Field(default=1, ge=1)
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One or more GPUs per worker."""
    accelerator_type: str | None = None
    """Required GPU type, e.g. `A800`, `H100` (Ray's `accelerator_type`); needs use_gpu."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs reserved per worker (also the torch thread count on CPU)."""
    gpus_per_worker: float | None = Field(default=None, ge=0)
    """GPUs per worker; null = 1 with use_gpu, else 0."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Extra custom Ray resources per worker, e.g. `{my_node_label: 1}` (CPU/GPU go above)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement group strategy for the workers."""
    storage_path: str = DEFAULT_STORAGE_PATH
    """Where checkpoints and Ray Train results go (`<storage_path>/<name>/...`). A local path is
    made absolute against the working directory when the spec is resolved. On a multi-node
    cluster it must be storage every node sees: a shared filesystem path or a URI like
    `s3://bucket/stars`."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker-group restarts from the latest checkpoint after a failure (-1 = unlimited)."""
    env_vars: dict[str, str] = Field(default_factory=dict)
    """Environment variables set on the driver and every worker (Ray runtime_env). Values whose
    names look secret (token, password, secret, key) are never logged to MLflow."""

    @model_validator(mode="after")
    def _check(self) -> ResourcesSpec:
        errors: list[InitErrorDetails] = []
        if self.accelerator_type is not None and not self.use_gpu:
            errors.append(
                _cross_error(("accelerator_type",), "needs resources.use_gpu: true", self.accelerator_type)
            )
        if self.gpus_per_worker is None:
            self.gpus_per_worker = 1.0 if self.use_gpu else 0.0
        elif self.gpus_per_worker > 0 and not self.use_gpu:
            errors.append(
                _cross_error(("gpus_per_worker",), "needs resources.use_gpu: true", self.gpus_per_worker)
            )
        elif self.use_gpu and self.gpus_per_worker == 0:
            errors.append(_cross_error(("gpus_per_worker",), "must be > 0 with use_gpu: true", 0))
        reserved = sorted({"CPU", "GPU", "cpu", "gpu"} & set(self.resources_per_worker))
        for key in reserved:
            errors.append(
                _cross_error(
                    ("resources_per_worker", key),
                    "set CPUs and GPUs with cpus_per_worker / gpus_per_worker",
                    self.resources_per_worker[key],
                )
            )
        for key, value in self.resources_per_worker.items():
            if value < 0:
                errors.append(_cross_error(("resources_per_worker", key), "must be >= 0", value))
        if not self.storage_path.strip():
            errors.append(_cross_error(("storage_path",), "must not be empty", self.storage_path))
        _raise_all("ResourcesSpec", errors)
        return self


# ----------------------------------------------------------------------------------------- eval
class EvalResources(_Section):
    """Resources of one evaluation actor."""

    cpus: float = Field(default=1.0, gt=0)
    """CPUs per evaluation actor."""
    gpus: float = Field(default=0.0, ge=0)
    """GPUs per evaluation actor."""
    accelerator_type: str | None = None
    """Required GPU type for evaluation actors (needs gpus > 0)."""
    custom: dict[str, float] = Field(default_factory=dict)
    """Extra custom Ray resources per evaluation actor."""

    @model_validator(mode="after")
    def _check(self) -> EvalResources:
        if self.accelerator_type is not None and self.gpus <= 0:
            raise PydanticCustomError("stars_cross", "accelerator_type needs gpus > 0")
        return self


#: How depth lists look in YAML / JSON: "1-16", "1,2,4,8" or a list of integers.
_DEPTHS_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "string", "pattern": r"^\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*$"},
            {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": MAX_DEPTH}},
        ]
    }
)


class EvalSpec(_Section):
    """Depth-curve evaluation: every task scored at every depth in `depths`, plus dynamics
    diagnostics (hidden norm, step size, distance from start, spectral radius)."""

    tasks: list[EvalTask] | None = None
    """Tasks to score: `addition`, or math benchmarks `gsm8k`, `math500`, `asdiv`, `svamp`,
    `amc23`. null = the training task when it is `addition`, else none; [] = no evaluation."""
    depths: Annotated[list[int], Field(min_length=1), _DEPTHS_SCHEMA] = Field(
        default_factory=lambda: parse_depths("1-16")
    )
    """Depths to score, e.g. `"1-16"`, `"1,2,4,8,16"`, `"1-8,12"` or a list."""
    rho_depths: Annotated[list[int], _DEPTHS_SCHEMA] = Field(default_factory=lambda: [1, 4, 8, 16])
    """Depths at which to estimate the spectral radius of the block's Jacobian (costly; keep it to
    a few). [] = none."""
    rho_iters: int = Field(default=20, ge=1)
    """Power iterations for each spectral radius estimate."""
    limit: int | None = Field(default=None, ge=1)
    """Score at most this many examples per task; null = all."""
    batch_size: int = Field(default=64, ge=1)
    """Sequences per evaluation batch."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    """Generation budget; null = the task's default (addition: the answer length; math: 2048)."""
    every_checkpoint: bool = True
    """Evaluate every committed checkpoint; false = only the final one."""
    workers: int = Field(default=1, ge=1)
    """Evaluation actors running in parallel."""
    resources: EvalResources = Field(default_factory=EvalResources)
    """Resources of each evaluation actor."""

    @field_validator("depths", "rho_depths", mode="before")
    @classmethod
    def _parse_depths(cls, value: Any) -> list[int]:
        return [] if value == [] else parse_depths(value)

    @field_serializer("depths", "rho_depths")
    def _compact(self, value: list[int]) -> str | list[int]:
        return compact_depths(value) if value else []


# ---------------------------------------------------------------------------------- sweep/track
class SweepSpec(_Section):
    """A grid sweep: one Ray Tune trial (and one MLflow child run) per point of the grid."""

    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    """Dotted spec path -> values, e.g. `{model.norm.type: [layernorm, rmsnorm]}`. Every path must
    exist in the spec and every value must be valid there; the trials are the cross product."""
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    """Trials running at once; null = as many as the cluster's resources allow."""

    @property
    def num_trials(self) -> int:
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return n


_CREDENTIALS_IN_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@]*:[^/@]*@")


class TrackingSpec(_Section):
    """MLflow tracking."""

    enabled: bool = True
    """Log to MLflow (false: no tracking at all, e.g. quick local tests)."""
    uri: str | None = None
    """Tracking URI, e.g. `http://mlflow.internal:5000`. null = $MLFLOW_TRACKING_URI if set, else
    the local store `sqlite:///<working dir>/mlflow.db`. Credentials go in MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, never in the URI."""
    artifact_location: str | None = None
    """Artifact root of a newly created experiment; null = `<working dir>/mlruns` for a local store,
    the server's default otherwise."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra tags on every run of the job."""

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value is not None and _CREDENTIALS_IN_URI.match(value):
            raise ValueError(
                "put credentials in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN), not in the URI"
            )
        if value is not None and not value.strip():
            raise ValueError("must not be empty (use null for the default local store)")
        return value


# ------------------------------------------------------------------------------------------ job
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
#: Paths a sweep may not vary (they name or configure the job itself).
_UNSWEEPABLE = ("name", "experiment", "sweep", "tracking", "resources.storage_path")


# Spec values that validate but cannot run yet; `stars.run` refuses them before any cluster time.
UNSUPPORTED_SOURCES = {
    "ouro": "model.source 'ouro': loading Ouro checkpoints (the weight-name mapping onto "
    "LoopLMConfig.ouro_layout()) is not implemented yet; convert the checkpoint to a LoopLM "
    "and use model.source 'pretrained'",
}


class JobSpec(_Section):
    """A STARS job: train (and evaluate) one LoopLM, or one per point of a sweep grid."""

    name: str = Field(min_length=1, max_length=64)
    """Job name: lowercase letters, digits, '-' and '_'. Names the MLflow runs and the storage
    directory, so a resubmitted job finds its runs and checkpoints again."""
    experiment: str | None = Field(default=None, min_length=1)
    """MLflow experiment; null = `name`."""
    description: str = ""
    """Free text, shown as the MLflow run description."""
    seed: int = Field(default=0, ge=0)
    """Seed of initialisation, data order and loop sampling."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """The model to train."""
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
        sections = {name: getattr(self, name) for name in _SECTION_NAMES}
        fill_derived_defaults(sections)
        errors = cross_section_errors(sections)
        _raise_all("JobSpec", errors or _sweep_errors(self))
        return self

    # convenience -------------------------------------------------------------------------
    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        assert self.train.micro_batch_size is not None
        return self.train.global_batch_size // (self.train.micro_batch_size * self.resources.num_workers)


_SECTION_NAMES = ("model", "data", "stars", "train", "resources", "eval", "sweep", "tracking")


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
                _cross_error(
                    ("train", "global_batch_size"),
                    f"must be divisible by resources.num_workers={workers}, got {train.global_batch_size}",
                    train.global_batch_size,
                )
            )
        elif train.global_batch_size % (train.micro_batch_size * workers):
            errors.append(
                _cross_error(
                    ("train", "global_batch_size"),
                    f"must be divisible by train.micro_batch_size * resources.num_workers = "
                    f"{train.micro_batch_size} * {workers}, got {train.global_batch_size}",
                    train.global_batch_size,
                )
            )
    if model is not None and data is not None and model.source == "looplm":
        if data.task == "math_sft" and data.tokenizer is None:
            errors.append(
                _cross_error(
                    ("data", "tokenizer"),
                    "required when model.source is 'looplm' (a new model has no tokenizer of its own)",
                )
            )
        need = data.max_seq_len() if data.task == "addition" else data.max_seq_len
        if model.positions == "learned" and model.max_position_embeddings < need:
            errors.append(
                _cross_error(
                    ("model", "max_position_embeddings"),
                    f"must be >= {need}, the longest {data.task} sequence (positions are learned), "
                    f"got {model.max_position_embeddings}",
                    model.max_position_embeddings,
                )
            )
    if model is not None and stars is not None and stars.jsrr.enabled and stars.jsrr.mode == "fd":
        if model.dtype != "float32":
            errors.append(
                _cross_error(
                    ("stars", "jsrr", "mode"),
                    f"'fd' (a central difference) needs model.dtype float32, got {model.dtype!r}: in "
                    "16-bit weights the difference is rounding noise; use 'vjp' or 'jvp', or float32 "
                    "weights with train.precision bf16",
                    stars.jsrr.mode,
                )
            )
    if ev is not None and data is not None and ev.tasks:
        for i, task in enumerate(ev.tasks):
            if task == "addition" and data.task != "addition":
                errors.append(
                    _cross_error(
                        ("eval", "tasks", i),
                        "'addition' uses the addition task's own character vocabulary; it needs "
                        "data.task 'addition'",
                        task,
                    )
                )
            elif task in MATH_BENCHMARKS and data.task != "math_sft":
                errors.append(
                    _cross_error(
                        ("eval", "tasks", i),
                        f"{task!r} is a math benchmark; it needs a text tokenizer (data.task 'math_sft')",
                        task,
                    )
                )
    return errors


# ---------------------------------------------------------------------------------------- sweep
def _unwrap(annotation: Any) -> Any:
    """Strip Annotated/Optional from a field annotation."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
            continue
        if origin is Union or origin is types.UnionType:
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def _members(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation can hold (one, several for a union, none)."""
    ann = _unwrap(annotation)
    origin = get_origin(ann)
    if origin is Union or origin is types.UnionType:
        return [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return []


def _is_dict(annotation: Any) -> bool:
    return get_origin(_unwrap(annotation)) is dict


def schema_field_names(path: tuple[str, ...], root: type[BaseModel] | None = None) -> list[str] | None:
    """Field names allowed under `path` (a tuple of keys; () = top level); None if `path` does not
    lead to a model (a scalar, list or free-form mapping). Unions give their members' fields."""
    models: list[type[BaseModel]] = [root or JobSpec]
    for key in path:
        nxt: list[type[BaseModel]] = []
        for m in models:
            if key in m.model_fields:
                nxt.extend(_members(m.model_fields[key].annotation))
        if not nxt:
            return None
        models = nxt
    names: list[str] = []
    for m in models:
        names.extend(n for n in m.model_fields if n not in names)
    return names


def check_schema_path(dotted: str) -> str | None:
    """None if `dotted` names a field of the spec, else an error message (with did-you-mean)."""
    keys = dotted.split(".")
    models: list[type[BaseModel]] = [JobSpec]
    for i, key in enumerate(keys):
        allowed: list[str] = []
        nxt: list[type[BaseModel]] = []
        dict_field = False
        for m in models:
            allowed.extend(n for n in m.model_fields if n not in allowed)
            if key in m.model_fields:
                ann = m.model_fields[key].annotation
                nxt.extend(_members(ann))
                dict_field = dict_field or _is_dict(ann)
        where = ".".join(keys[:i]) or "the top level"
        if key not in allowed:
            return f"no field {key!r} in {where}{did_you_mean(key, allowed)}"
        rest = keys[i + 1 :]
        if not rest:
            return None
        if dict_field and len(rest) == 1:
            return None
        if not nxt:
            return f"{'.'.join(keys[: i + 1])!r} has no sub-fields"
        models = nxt
    return None


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """`"; did you mean 'x'?"` for the closest choice, or `""`."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _set_path(data: dict[str, Any], keys: tuple[str, ...] | list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def _sweep_errors(spec: JobSpec) -> list[InitErrorDetails]:
    """Every grid path must exist and may be swept; every value must validate at its path (with
    the rest of the spec); and (for grids up to 1024 points) every point must validate."""
    from stars.spec_loader import describe_errors, format_path  # the loader imports this module

    grid = spec.sweep.grid
    if not grid:
        return []
    errors: list[InitErrorDetails] = []
    base = spec.model_dump(mode="json", exclude={"sweep"})
    good_keys: list[str] = []
    for key, values in grid.items():
        loc = ("sweep", "grid", key)
        problem = check_schema_path(key)
        if problem is None and any(key == p or key.startswith(p + ".") for p in _UNSWEEPABLE):
            problem = "this path names or places the job and cannot be swept"
        if problem is not None:
            errors.append(_cross_error(loc, problem, key))
            continue
        keys = tuple(key.split("."))
        ok = True
        for i, value in enumerate(values):
            data = json.loads(json.dumps(base))
            _set_path(data, keys, value)
            try:
                JobSpec.model_validate(data)
            except ValidationError as exc:
                ok = False
                msgs = []
                for path, msg in describe_errors(exc.errors()):
                    if path[: len(keys)] == keys:
                        rest = format_path(path[len(keys) :])
                        msgs.append(f"{rest}: {msg}" if rest else msg)
                    else:
                        msgs.append(f"makes {format_path(path)} invalid: {msg}")
                errors.append(_cross_error(loc + (i,), "; ".join(msgs), value))
        if ok:
            good_keys.append(key)
    if len(good_keys) > 1 and len(good_keys) == len(grid) and spec.sweep.num_trials <= 1024:
        shown = 0
        for combo in itertools.product(*(grid[k] for k in good_keys)):
            data = json.loads(json.dumps(base))
            for k, v in zip(good_keys, combo, strict=True):
                _set_path(data, k.split("."), v)
            try:
                JobSpec.model_validate(data)
            except ValidationError as exc:
                point = ", ".join(f"{k}={v!r}" for k, v in zip(good_keys, combo, strict=True))
                msg = "; ".join(f"{format_path(p)}: {m}" for p, m in describe_errors(exc.errors()))
                errors.append(_cross_error(("sweep", "grid"), f"grid point {point} is invalid: {msg}"))
                shown += 1
                if shown >= 5:
                    break
    return errors


@dataclass(frozen=True)
class Trial:
    """One point of a sweep grid (or the only trial of a job without a sweep)."""

    index: int
    """0-based position in the grid's cross product."""
    assignments: dict[str, Any]
    """Dotted path -> value of this point ({} without a sweep)."""
    spec: JobSpec
    """The job spec with the assignments applied and an empty sweep."""

    @property
    def key(self) -> str:
        """Deterministic, readable id: `t003-type=rmsnorm,position=pre` (`t000` without a sweep)."""
        if not self.assignments:
            return f"t{self.index:03d}"
        lasts = [p.rsplit(".", 1)[-1] for p in self.assignments]
        names = [p if lasts.count(p.rsplit(".", 1)[-1]) > 1 else p.rsplit(".", 1)[-1] for p in self.assignments]
        parts = [f"{n}={_short(v)}" for n, v in zip(names, self.assignments.values(), strict=True)]
        return f"t{self.index:03d}-" + ",".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    else:
        text = str(value)
    return text if len(text) <= 40 else text[:32] + "~" + hashlib.sha256(text.encode()).hexdigest()[:6]


def sweep_trials(spec: JobSpec) -> list[Trial]:
    """Expand the sweep grid into trials (cross product in the grid's key order). Without a sweep,
    one trial holding the spec itself."""
    if not spec.sweep.grid:
        return [Trial(0, {}, spec)]
    keys = list(spec.sweep.grid)
    base = spec.model_dump(mode="json")
    base["sweep"] = {"grid": {}, "max_concurrent_trials": None}
    trials = []
    for i, combo in enumerate(itertools.product(*(spec.sweep.grid[k] for k in keys))):
        data = json.loads(json.dumps(base))
        for k, v in zip(keys, combo, strict=True):
            _set_path(data, k.split("."), v)
        trials.append(Trial(i, dict(zip(keys, combo, strict=True)), JobSpec.model_validate(data)))
    return trials


# ------------------------------------------------------------------------------ resolve/export
def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The default local MLflow store: `sqlite:///<cwd>/mlflow.db` (absolute path).

    MLflow 3 made SQLite its default store and refuses the `./mlruns` file store unless
    MLFLOW_ALLOW_FILE_STORE is set; artifacts of this store go to `<cwd>/mlruns`.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def _absolute(path: str, base: Path) -> str:
    if path.startswith("file://"):
        return path
    p = Path(path).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def _is_path_like(uri: str) -> bool:
    """A filesystem path (not `databricks`, not `http://...`)."""
    return "://" not in uri and (uri.startswith((".", "/", "~")) or "/" in uri or "\\" in uri)


def is_local_store(uri: str) -> bool:
    """Whether a tracking URI is a store on this machine (sqlite file, file store, plain path)."""
    return uri.startswith(("sqlite:", "file:")) or _is_path_like(uri)


def resolve_spec(spec: JobSpec, cwd: str | Path | None = None) -> JobSpec:
    """The spec with everything that depends on where it is started made explicit: local paths
    absolute against `cwd` (default: the working directory), the tracking URI chosen
    (spec, else $MLFLOW_TRACKING_URI, else `default_tracking_uri`) and, for a local store, the
    artifact location. Idempotent."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    data = spec.model_dump(mode="json")
    res = data["resources"]
    if is_local_path(res["storage_path"]):
        res["storage_path"] = _absolute(res["storage_path"], base)
    d = data["data"]
    for key in ("train_file", "test_file"):
        if d.get(key):
            d[key] = _absolute(d[key], base)
    tr = data["tracking"]
    if tr["uri"] is None:
        tr["uri"] = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(base)
    uri = tr["uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        tr["uri"] = "sqlite:///" + _absolute(uri[len("sqlite:///") :], base)
    elif _is_path_like(uri):
        tr["uri"] = _absolute(uri, base)
    if tr["artifact_location"] is None and is_local_store(tr["uri"]):
        tr["artifact_location"] = str((base / "mlruns").resolve())
    elif tr["artifact_location"] and is_local_path(tr["artifact_location"]):
        tr["artifact_location"] = _absolute(tr["artifact_location"], base)
    return JobSpec.model_validate(data)


def resolved_yaml(spec: JobSpec, *, redact: bool = False) -> str:
    """The spec as YAML, every field explicit, in schema order; loads back to an equal spec.

    `redact=True` (what is logged to MLflow) replaces values under secret-looking keys
    (`is_secret_key`, e.g. `resources.env_vars.HF_TOKEN`) by `<redacted>`."""
    data = spec.model_dump(mode="json")
    header = f"# resolved STARS job spec; spec_hash {spec_hash(spec)}\n"
    if redact:
        data = _redact(data, False)
        header += "# values of secret-looking keys are redacted\n"
    return header + yaml.safe_dump(data, sort_keys=False, width=100)


def _redact(value: Any, secret: bool) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, secret or is_secret_key(str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, secret) for v in value]
    if secret and value not in (None, ""):
        return REDACTED
    return redact_uri(value) if isinstance(value, str) else value


#: Fields that say where a job goes, not what it computes: left out of `spec_hash`.
_HASH_EXCLUDE = {
    "name": True,
    "experiment": True,
    "description": True,
    "tracking": True,
    "resources": {"storage_path"},
}


def spec_hash(spec: JobSpec) -> str:
    """16 hex digits identifying what the job computes: a SHA-256 of the canonical JSON of the
    spec, without the fields that only name or place it (name, experiment, description, tracking,
    resources.storage_path). Equal specs started from different directories hash equally."""
    data = spec.model_dump(mode="json", exclude=_HASH_EXCLUDE)  # type: ignore[arg-type]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Name parts that mark a secret: `HF_TOKEN`, `db_password`, `aws_secret_access_key`, `apiKey`.
_SECRET_PARTS = {
    "token", "password", "passwd", "pwd", "secret", "credential", "credentials", "key", "apikey",
    "auth", "authorization", "cookie", "passphrase", "private",
}
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]+):(?P<pw>[^/@\s]+)@")
REDACTED = "<redacted>"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_PARAM_KEY = 250
_PARAM_KEY_BAD = re.compile(r"[^/\w.\- :]")


def is_secret_key(key: str) -> bool:
    """Whether a mapping key looks like it holds a secret: one of its parts (split at `_ - . /`
    and camelCase) is token, password, secret, key, auth, credential, ... (`max_new_tokens` and
    `tokenizer` are not secrets)."""
    parts = re.split(r"[_\-./ ]+|(?<=[a-z0-9])(?=[A-Z])", key)
    return any(p.lower() in _SECRET_PARTS for p in parts if p)


def redact_uri(text: str) -> str:
    """Replace the password of any `scheme://user:password@host` in `text`."""
    return _URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)


def _param_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        text = json.dumps(value, separators=(", ", ": "))
    else:
        text = str(value)
    text = redact_uri(text)
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - 14] + "...(truncated)"
    return text


def _flatten(prefix: str, value: Any, out: dict[str, str], secret: bool) -> None:
    if isinstance(value, dict) and value and not prefix.startswith("sweep.grid"):
        for k, v in value.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            _flatten(key, v, out, secret or is_secret_key(str(k)))
        return
    if prefix == "sweep.grid" and isinstance(value, dict) and value:
        for k, v in value.items():
            out[_param_key(f"sweep.grid.{k}")] = _param_value(v)
        return
    out[_param_key(prefix)] = REDACTED if secret else _param_value(value)


def _param_key(key: str) -> str:
    key = _PARAM_KEY_BAD.sub("_", key)
    if len(key) > MAX_PARAM_KEY:
        key = key[: MAX_PARAM_KEY - 9] + "~" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return key


def flatten_params(spec: JobSpec) -> dict[str, str]:
    """MLflow params: the spec flattened to dotted keys (`train.lr` -> "0.003"), lists and grid
    values as JSON, values cut to MLflow's 6000 characters. Values under keys that look secret
    (`is_secret_key`: HF_TOKEN, *_PASSWORD, *_SECRET*, *_KEY, ...) are replaced by `<redacted>`,
    and so are passwords inside URIs."""
    out: dict[str, str] = {}
    _flatten("", spec.model_dump(mode="json"), out, False)
    return out


def iter_secret_values(spec: JobSpec) -> Iterator[str]:
    """Values of the spec that `flatten_params` redacts (for tests and log scrubbing)."""
    def walk(value: Any, secret: bool) -> Iterator[str]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, secret or is_secret_key(str(k)))
        elif isinstance(value, list):
            for v in value:
                yield from walk(v, secret)
        elif secret and value not in (None, ""):
            yield str(value)

    yield from walk(spec.model_dump(mode="json"), False)


def spec_warnings(spec: JobSpec, address: str | None = None) -> list[str]:
    """Things that validate but are probably wrong (printed, never fatal)."""
    out: list[str] = []
    remote = address is not None and not address.startswith(("local", "127.0.0.1", "localhost"))
    if remote and is_local_path(spec.resources.storage_path):
        out.append(
            f"resources.storage_path {spec.resources.storage_path!r} is a local path but the job goes "
            f"to {address}: every node of a multi-node cluster must see it (shared filesystem or s3://...)"
        )
    uri = spec.tracking.uri or ""
    if remote and spec.tracking.enabled and (uri == "" or is_local_store(uri)):
        out.append(
            f"tracking.uri {uri or '(default local store)'!r} is local to the machine the job runs on; "
            "give a tracking server URI to see the runs from here"
        )
    if spec.model.dtype != "float32" and spec.train.lr < 1e-4:
        out.append(
            f"model.dtype {spec.model.dtype!r} with train.lr {spec.train.lr:g}: most updates round to zero "
            "in 16-bit weights; keep model.dtype float32 and use train.precision bf16"
        )
    if spec.stars.jsrr.enabled and spec.stars.jsrr.start_step >= (spec.train.max_steps or 1 << 62):
        out.append("stars.jsrr.start_step >= train.max_steps: JSRR never turns on")
    return out


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load, validate and resolve a YAML job spec; raises `stars.spec_loader.SpecError` listing
    every problem. (Defined in `stars.spec_loader`; re-exported here.)"""
    from stars.spec_loader import load_spec as _load

    return _load(path, overrides)
