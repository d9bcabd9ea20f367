"""The `train` section: optimiser, LR schedule, batch sizes, length, precision, checkpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_core import InitErrorDetails

from stars.spec.base import Float, Int, Section, cross_error, raise_all

__all__ = ["MAX_STEPS", "TrainSpec"]

#: Most optimizer steps a job may ask for (also bounds every step-valued field).
MAX_STEPS = 10**9
#: Most sequences in one optimizer step.
MAX_BATCH = 2**20

_Beta = Annotated[Float, Field(ge=0, lt=1)]


class TrainSpec(Section):
    """Optimisation: AdamW, LR schedule, batch sizes, length, precision, checkpoints."""

    max_steps: Int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """Optimizer steps to train. Give exactly one of `max_steps` and `epochs`."""
    epochs: Int | None = Field(default=None, ge=1, le=10**6)
    """Passes over the training data (steps = epochs * ceil(len(data) / global_batch_size))."""
    global_batch_size: Int = Field(default=128, ge=1, le=MAX_BATCH)
    """Sequences per optimizer step over all workers; must be divisible by
    micro_batch_size * resources.num_workers (the rest is gradient accumulation)."""
    micro_batch_size: Int | None = Field(default=None, ge=1, le=MAX_BATCH)
    """Sequences per forward/backward on one worker; null = global_batch_size / num_workers
    (no accumulation)."""
    lr: Float = Field(default=3e-4, gt=0, le=10)
    """Peak learning rate."""
    betas: tuple[_Beta, _Beta] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: Float = Field(default=0.0, ge=0, le=10)
    """AdamW decoupled weight decay."""
    eps: Float = Field(default=1e-8, gt=0, le=1)
    """AdamW epsilon."""
    schedule: Literal["constant", "cosine", "wsd"] = "cosine"
    """LR schedule after warmup: `constant`; `cosine` decay to min_lr_ratio * lr; `wsd`
    (warmup-stable-decay) flat, then a linear decay over the last `decay_fraction` of training."""
    warmup_steps: Int = Field(default=0, ge=0, le=MAX_STEPS)
    """Linear warmup steps from 0 (give this or warmup_fraction)."""
    warmup_fraction: Float = Field(default=0.0, ge=0, lt=1)
    """Warmup as a fraction of the total steps (paper's wsd: 0.1)."""
    decay_fraction: Float = Field(default=0.1, gt=0, le=1)
    """`wsd` only: fraction of the total steps spent decaying."""
    min_lr_ratio: Float = Field(default=0.1, ge=0, le=1)
    """Final LR as a fraction of `lr` (`cosine`, `wsd`; paper's wsd: 0.001)."""
    grad_clip: Float | None = Field(default=1.0, gt=0, le=1e6)
    """Clip the global gradient norm to this value; null = no clipping."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`fp32`, or `bf16` autocast (weights stay in model.dtype). bf16 autocast also runs on CPU,
    so it does not require GPUs; on CPU it is usually slower than fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    checkpoint_every: Int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """Save (and report to Ray Train) a checkpoint every N optimizer steps; the final step is
    always saved; null = final only."""
    keep_checkpoints: Int | None = Field(default=None, ge=1, le=10**6)
    """Checkpoints kept in storage (oldest deleted first); null = all."""
    log_every: Int = Field(default=10, ge=1, le=MAX_STEPS)
    """Log training metrics every N optimizer steps."""

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        errors: list[InitErrorDetails] = []
        if (self.max_steps is None) == (self.epochs is None):
            which = "both are set" if self.max_steps is not None else "neither is set"
            errors.append(cross_error(("max_steps",), f"give exactly one of max_steps and epochs ({which})"))
        if self.warmup_steps and self.warmup_fraction:
            errors.append(cross_error(("warmup_fraction",), "give warmup_steps or warmup_fraction, not both"))
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            errors.append(
                cross_error(
                    ("warmup_steps",),
                    f"must be < max_steps={self.max_steps}, got {self.warmup_steps}",
                    self.warmup_steps,
                )
            )
        if self.schedule == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            errors.append(cross_error(("decay_fraction",), "warmup_fraction + decay_fraction must be <= 1"))
        raise_all("TrainSpec", errors)
        return self
