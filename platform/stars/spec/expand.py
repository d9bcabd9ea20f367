"""Sweep expansion: a job spec's sweep as trials, each a complete job spec of its own.

The sweep's rules (paths exist, values and every trial validate) are checked when the JobSpec is
validated (`stars.spec.job`); the trials and their order are `stars.spec.sweep.sweep_points`
(variants x grid x sample draws x seeds, variant outermost, seed innermost). This module makes them
`Trial`s: what the job driver runs, one Ray Tune trial and one MLflow child run each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stars.spec.job import JobSpec, trial_base
from stars.spec.sweep import sweep_points, trial_key

__all__ = ["Trial", "sweep_trials"]


@dataclass(frozen=True)
class Trial:
    """One trial of a sweep (or the only trial of a job without a sweep)."""

    index: int
    """0-based position in the sweep's product (variants x grid x sample draws x seeds)."""
    assignments: dict[str, Any]
    """What distinguishes this trial, flat and readable: `variant` (its name), grid and sampled paths
    -> values (sampled floats rounded to 4 significant digits, the values trained with), `seed`;
    e.g. `{"variant": "stars", "model.norm.type": "rmsnorm", "stars.jsrr.weight": 0.0312, "seed": 1}`.
    Absent dimensions, and paths the trial's variant pins, are left out; {} without a sweep."""
    spec: JobSpec
    """The job spec with the trial's variant and values applied and an empty sweep (the job's own spec
    without a sweep)."""

    @property
    def key(self) -> str:
        """Deterministic, readable id, also the trial's directory name: `t003-v=stars,type=rmsnorm,seed=1`
        (`t000` without a sweep); one safe path component (`stars.spec.sweep.trial_key`)."""
        return trial_key(self.index, self.assignments)


def sweep_trials(spec: JobSpec) -> list[Trial]:
    """The trials of the spec's sweep, in order. Without sweep dimensions (no variants, grid, sample
    or seeds), one trial `t000` holding the spec itself, with empty assignments."""
    if not spec.sweep.enabled:
        return [Trial(0, {}, spec)]
    base = trial_base(spec)
    return [
        Trial(point.index, point.assignments, JobSpec.model_validate(point.data))
        for point in sweep_points(spec.sweep, base, JobSpec)
    ]
