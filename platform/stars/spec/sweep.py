"""The `sweep` section: a grid over dotted spec paths (one Ray Tune trial per point).

The section holds the grid; the rules that every path exists and every value validates with the rest
of the spec are JobSpec's (`stars.spec.job`), and the expansion into trials is `stars.spec.expand`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from stars.spec.base import Int, Section

__all__ = ["SweepSpec"]


class SweepSpec(Section):
    """A grid sweep: one Ray Tune trial (and one MLflow child run) per point of the grid."""

    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    """Dotted spec path -> values, e.g. `{model.norm.type: [layernorm, rmsnorm]}`. Every path must
    exist in the spec and every value must be valid there; the trials are the cross product."""
    max_concurrent_trials: Int | None = Field(default=None, ge=1, le=10_000)
    """Trials running at once; null = as many as the cluster's resources allow."""

    @property
    def num_trials(self) -> int:
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return n
