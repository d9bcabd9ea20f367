"""The job driver: one MLflow run per job, one trial per sweep point (a child run), each trained by Ray
Train, every committed checkpoint scored by the job's evaluation actors.

The same code runs on a laptop (embedded local Ray, `starsctl submit`) and as the Ray Jobs entrypoint
on a cluster (`python -m stars.run`, see `stars.run`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stars.errors import UserError
from stars.spec import UNSUPPORTED_SOURCES, JobSpec, resolve_spec, sweep_trials

if TYPE_CHECKING:
    from stars.ray_backend.training import TrialResult


class UnsupportedSpecError(UserError):
    """A spec that validates but cannot run yet; refused before Ray starts (no cluster time spent)."""


@dataclass
class JobResult:
    job_run_id: str | None
    tracking_uri: str | None
    trials: list[TrialResult] = field(default_factory=list)
    wall_seconds: float = 0.0


def run_job(spec: JobSpec, *, address: str | None = None, console=print) -> JobResult:
    """Run every trial of the job on Ray Train, tracked in MLflow (rank 0 / this driver only)."""
    if spec.model.source in UNSUPPORTED_SOURCES:  # before Ray starts: no cluster time spent
        raise UnsupportedSpecError(UNSUPPORTED_SOURCES[spec.model.source])
    # Ray, torch and MLflow load only now: a spec refused above costs neither cluster time nor imports.
    from stars.ray_backend.cluster import ensure_ray
    from stars.ray_backend.evaluation import EvaluationService
    from stars.ray_backend.training import run_name_for, run_trial
    from stars.tracking import Tracker

    start = time.perf_counter()
    spec = resolve_spec(spec)
    tracker = Tracker.from_spec(spec) if spec.tracking.enabled else None
    ensure_ray(address)
    job_run = tracker.start_job(spec) if tracker else None
    if tracker:
        console(f"[stars] MLflow run {job_run} in experiment {spec.experiment or spec.name!r} at {spec.tracking.uri}")
    result = JobResult(job_run, spec.tracking.uri if tracker else None)
    # Evaluation actors live for the whole job, apart from the training workers.
    evaluation = EvaluationService(spec).start() if EvaluationService.wanted(spec) else None
    try:
        trials = sweep_trials(spec)
        for trial in trials:
            if len(trials) > 1:
                console(f"[stars] trial {trial.index + 1}/{len(trials)}: {trial.key}")
            trial_run = tracker.start_trial(job_run, trial) if tracker else None
            trial_key = trial.key if trial.assignments else None
            run_dir = os.path.join(trial.spec.resources.storage_path, run_name_for(trial.spec, trial_key))
            validation = evaluation.validation_config(trial.spec, trial_run, run_dir) if evaluation else None
            outcome = run_trial(trial.spec, run_id=trial_run, trial_key=trial_key, validation_config=validation)
            if evaluation:  # fit() waited for the validations; score whatever is still missing
                evaluation.finish_trial(trial.spec, trial_run, outcome.storage_dir, outcome.checkpoint_path)
            result.trials.append(outcome)
            if tracker:
                tracker.set_tags(trial_run, {"stars.checkpoint": outcome.checkpoint_path or "",
                                             "stars.ray_run": outcome.run_name})
                if trial_run != job_run:
                    tracker.end(trial_run)
            console(f"[stars] {trial.key}: final checkpoint {outcome.checkpoint_path}")
    except BaseException:
        if tracker:
            tracker.end(job_run, "FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    finally:
        if evaluation:
            evaluation.stop()
    if tracker:
        tracker.end(job_run)
    result.wall_seconds = time.perf_counter() - start
    console(f"[stars] job {spec.name!r} done in {result.wall_seconds:.0f} s")
    return result
