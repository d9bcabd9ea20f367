"""The `stars` section: the loop samplers (THE samplers training uses, not a description of them)
and JSRR (docs/science.md, sections 3 and 4).

A sampler is a pure function of `(seed, step)`: `depth_at(step, seed)` seeds NumPy's generator with
`[seed, step]`, so every DDP rank draws the same depth in a step without communicating and a resumed
run continues the same depth sequence (the method is not called `depth` because `fixed` has a
`depth` field). `bind(seed)` gives the `step -> depth` callable the training
loop uses (`stars.objective.LoopSampler`).

The defaults are the spec's: lognormal mu 1.7, sigma 0.4 on [1, 16] (the paper's); Huginn's
poisson_lognormal with mean 6, sigma 0.5, max 32 and full backprop (`backprop_depth` null: truncated
backprop is opt-in, set it to e.g. 8 for Huginn's recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, Union

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from stars.spec.base import Float, Int, Section
from stars.spec.depths import MAX_DEPTH

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CeLoss",
    "FixedLoops",
    "JSRRSpec",
    "JsrrMode",
    "LognormalLoops",
    "LoopSampling",
    "PoissonLognormalLoops",
    "SeededSampler",
    "StarsSpec",
    "UniformLoops",
]

JsrrMode = Literal["vjp", "jvp", "fd"]
CeLoss = Literal["last_step", "gate_weighted"]


def _rng(seed: int, step: int) -> np.random.Generator:
    import numpy as np  # only when sampling: validating a spec needs no numpy

    return np.random.default_rng([seed, step])


class _Sampler(Section):
    """What every loop sampler offers."""

    def depth_at(self, step: int, seed: int) -> int:
        """The loop depth of optimizer step `step` (0-based) of a job seeded with `seed`."""
        raise NotImplementedError

    def bind(self, seed: int) -> SeededSampler:
        """This sampler with the job's seed fixed: `sampler(step) -> depth`."""
        return SeededSampler(self, seed)


class _FullBackprop:
    @property
    def backprop_depth(self) -> int | None:
        """Gradients flow through every loop step (no truncation)."""
        return None


class _MinMax(_Sampler):
    @model_validator(mode="after")
    def _check_range(self) -> _MinMax:
        lo, hi = self.min, self.max  # type: ignore[attr-defined]
        if lo > hi:
            raise PydanticCustomError("stars_cross", "min ({lo}) must be <= max ({hi})", {"lo": lo, "hi": hi})
        return self

    def _clip(self, t: int) -> int:
        return int(min(max(t, self.min), self.max))  # type: ignore[attr-defined]


class FixedLoops(_FullBackprop, _Sampler):
    """Always the same depth (the SFT baseline)."""

    kind: Literal["fixed"] = "fixed"
    """Sampler selector."""
    depth: Int = Field(default=4, ge=1, le=MAX_DEPTH)
    """The depth of every training step."""

    def depth_at(self, step: int, seed: int) -> int:
        return self.depth


class LognormalLoops(_FullBackprop, _MinMax):
    """`t = clip(round(lognormal(mu, sigma)), min, max)` (STARS; paper: mu 1.7, sigma 0.4, [1, 16],
    mean ~5.9, median 5)."""

    kind: Literal["lognormal"] = "lognormal"
    """Sampler selector."""
    mu: Float = Field(default=1.7, ge=-10, le=10)
    """Mean of the underlying normal."""
    sigma: Float = Field(default=0.4, gt=0, le=5)
    """Standard deviation of the underlying normal."""
    min: Int = Field(default=1, ge=1, le=MAX_DEPTH)
    """Smallest depth."""
    max: Int = Field(default=16, ge=1, le=MAX_DEPTH)
    """Largest depth."""

    def depth_at(self, step: int, seed: int) -> int:
        return self._clip(round(_rng(seed, step).lognormal(self.mu, self.sigma)))


class PoissonLognormalLoops(_MinMax):
    """Huginn's sampler: `r = Poisson(exp(N(log(mean) - sigma^2/2, sigma))) + 1`, clipped to
    [min, max], optionally with gradients only through the last `backprop_depth` steps."""

    kind: Literal["poisson_lognormal"] = "poisson_lognormal"
    """Sampler selector."""
    mean: Float = Field(default=6.0, gt=0, le=MAX_DEPTH)
    """Mean depth (before the +1 and clipping)."""
    sigma: Float = Field(default=0.5, gt=0, le=5)
    """Standard deviation of the log-normal rate."""
    backprop_depth: Int | None = Field(default=None, ge=1, le=MAX_DEPTH)
    """Truncated backprop: gradients flow only through the last k loop steps; null = all (Huginn
    used 8)."""
    min: Int = Field(default=1, ge=1, le=MAX_DEPTH)
    """Smallest depth."""
    max: Int = Field(default=32, ge=1, le=MAX_DEPTH)
    """Largest depth."""

    def depth_at(self, step: int, seed: int) -> int:
        rng = _rng(seed, step)
        rate = math.exp(rng.normal(math.log(self.mean) - self.sigma**2 / 2, self.sigma))
        return self._clip(rng.poisson(rate) + 1)


class UniformLoops(_FullBackprop, _MinMax):
    """Depth uniform on the integers [min, max]."""

    kind: Literal["uniform"] = "uniform"
    """Sampler selector."""
    min: Int = Field(default=1, ge=1, le=MAX_DEPTH)
    """Smallest depth."""
    max: Int = Field(default=16, ge=1, le=MAX_DEPTH)
    """Largest depth."""

    def depth_at(self, step: int, seed: int) -> int:
        return int(_rng(seed, step).integers(self.min, self.max + 1))


LoopSampling = Annotated[
    Union[FixedLoops, LognormalLoops, PoissonLognormalLoops, UniformLoops],  # noqa: UP007
    Field(discriminator="kind"),
]
"""A loop sampler, selected by `kind`."""


@dataclass(frozen=True)
class SeededSampler:
    """A loop sampler with the job's seed fixed: what the training loop calls once per step
    (`stars.objective.LoopSampler`)."""

    sampling: FixedLoops | LognormalLoops | PoissonLognormalLoops | UniformLoops
    seed: int

    def __call__(self, step: int) -> int:
        return self.sampling.depth_at(step, self.seed)

    @property
    def backprop_depth(self) -> int | None:
        return self.sampling.backprop_depth


class JSRRSpec(Section):
    """Jacobian Spectral Radius Regularization (docs/science.md, section 4):
    loss = (1 - weight) * CE + weight * ||J v||^2 at the last loop state."""

    weight: Float = Field(default=0.1, ge=0, lt=1)
    """lambda in [0, 1); 0 disables JSRR."""
    mode: JsrrMode = "vjp"
    """`vjp`: u = J^T v by double backward (the research code's); `jvp`: u = J v by forward mode;
    `fd`: J v by a central difference of two plain block applications (~25% cheaper than `vjp` on
    CPU, relative error ~1e-5 in float32; needs model.dtype float32; autocast is off inside it)."""
    power_iters: Int = Field(default=1, ge=1, le=100)
    """Power-iteration steps for the estimate (1 = the paper's)."""
    start_step: Int = Field(default=0, ge=0, le=10**9)
    """First optimizer step with the penalty (the addition recipe turns it on after warmup)."""
    batch_fraction: Float = Field(default=1.0, gt=0, le=1)
    """Fraction of the micro-batch's sequences the penalty is computed on (cost vs noise)."""

    @property
    def enabled(self) -> bool:
        return self.weight > 0


class StarsSpec(Section):
    """The STARS training recipe: random loop depth per step plus JSRR."""

    loop_sampling: LoopSampling = Field(default_factory=LognormalLoops)
    """Depth sampler, selected by `kind`: `fixed`, `lognormal`, `poisson_lognormal`, `uniform`.
    Every DDP rank uses the same depth in a step."""
    jsrr: JSRRSpec = Field(default_factory=JSRRSpec)
    """Jacobian spectral radius regularization."""
    ce_loss: CeLoss = "last_step"
    """Cross-entropy term: `last_step` (STARS: the logits after the sampled depth) or `gate_weighted`
    (Ouro's own objective: every step's CE weighted by the exit gate's probabilities; needs a model
    with an exit gate, e.g. an Ouro checkpoint). With `last_step` the gate is frozen."""
