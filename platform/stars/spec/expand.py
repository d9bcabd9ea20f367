"""Sweep expansion: a job spec's grid as trials, each a complete job spec of its own.

The grid's rules (paths exist, values validate) are checked when the JobSpec is validated
(`stars.spec.job`); expansion only builds the points, in the grid's key order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from stars.spec.job import JobSpec
from stars.spec.paths import safe_path_component
from stars.spec.schema import set_path

__all__ = ["Trial", "sweep_trials"]

#: Longest text of one value in a trial key before it is shortened (with a hash of the whole).
_MAX_VALUE_TEXT = 40


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
        """Deterministic, readable id, also the trial's directory name: `t003-type=rmsnorm,position=pre`
        (`t000` without a sweep). Always one safe path component (`safe_path_component`): a value
        such as `../../x` cannot move the trial's directory out of the job's."""
        if not self.assignments:
            return f"t{self.index:03d}"
        lasts = [p.rsplit(".", 1)[-1] for p in self.assignments]
        names = [p if lasts.count(p.rsplit(".", 1)[-1]) > 1 else p.rsplit(".", 1)[-1] for p in self.assignments]
        parts = [f"{n}={_short(v)}" for n, v in zip(names, self.assignments.values(), strict=True)]
        return safe_path_component(f"t{self.index:03d}-" + ",".join(parts))


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    else:
        text = str(value)
    if len(text) <= _MAX_VALUE_TEXT:
        return text
    return text[: _MAX_VALUE_TEXT - 8] + "-" + hashlib.sha256(text.encode()).hexdigest()[:7]


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
            set_path(data, k.split("."), v)
        trials.append(Trial(i, dict(zip(keys, combo, strict=True)), JobSpec.model_validate(data)))
    return trials
