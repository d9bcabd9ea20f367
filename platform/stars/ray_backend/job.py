"""The job driver: one MLflow run per job, one trial per sweep point (a child run), each trained by Ray
Train, every committed checkpoint scored by the job's evaluation actors.

The same code runs on a laptop (embedded local Ray, `starsctl submit`) and as the Ray Jobs entrypoint
on a cluster (`python -m stars.run`, see `stars.run`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stars.errors import UserError
from stars.spec import CheckpointModel, JobSpec, checkpoint_location_problem, resolve_spec, sweep_trials

if TYPE_CHECKING:
    from stars.ray_backend.sweep import TrialOutcome
    from stars.ray_backend.training import TrialResult


class UnrunnableSpecError(UserError):
    """A valid spec that cannot run where it was started: its model checkpoint is not there (refused
    before Ray starts), or its storage cannot be written (refused before any trial starts)."""


@dataclass
class JobResult:
    job_run_id: str | None
    tracking_uri: str | None
    outcomes: list[TrialOutcome] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def trials(self) -> list[TrialResult]:
        """Ray Train results of the trials that ran to the end in this submission."""
        return [o.result for o in self.outcomes if o.result is not None]

    @property
    def failed(self) -> list[TrialOutcome]:
        """Trials that diverged or raised (a trial stopped early by the scheduler did what was asked)."""
        return [o for o in self.outcomes if o.status == "failed"]


def run_job(spec: JobSpec, *, address: str | None = None, console=print) -> JobResult:
    """Run every trial of the job (one directly on Ray Train; a sweep's on Ray Tune), tracked in MLflow
    from this driver and rank 0 only. A trial that fails ends only itself: the result lists every
    trial's outcome, and `result.failed` is what the caller turns into exit code 1."""
    if isinstance(spec.model, CheckpointModel):  # before Ray starts: no cluster time spent
        problem = checkpoint_location_problem(spec.model.pretrained)
        if problem:
            raise UnrunnableSpecError(problem)
    # Ray, torch and MLflow load only now: a spec refused above costs neither cluster time nor imports.
    from stars.ray_backend.cluster import ensure_ray
    from stars.ray_backend.evaluation import EvaluationService
    from stars.ray_backend.ledger import storage_problem
    from stars.ray_backend.sweep import (
        TrialFailed,
        TrialOutcome,
        TrialRunner,
        explain_worker_deaths,
        finish_done_trial_runs,
        run_sweep,
    )
    from stars.tracking import Tracker

    start = time.perf_counter()
    spec = resolve_spec(spec)
    tracker = Tracker.from_spec(spec) if spec.tracking.enabled else None
    # resources.env_vars: in this process and in the job's runtime env, so every process of the job has them
    ensure_ray(address, job_name=spec.name, env_vars=spec.resources.env_vars, console=console)
    # After ensure_ray, which sets the spec's env_vars here (an S3 store's credentials may be among
    # them); before any MLflow run or trial exists.
    problem = storage_problem(spec.resources.storage_path)
    if problem:
        raise UnrunnableSpecError(problem)
    job_run = tracker.start_job(spec) if tracker else None
    if tracker:
        console(f"[stars] MLflow run {job_run} in experiment {spec.experiment or spec.name!r} at {spec.tracking.uri}")
    result = JobResult(job_run, spec.tracking.uri if tracker else None)
    # Evaluation actors live for the whole job, apart from the training workers, shared by its trials.
    evaluation = EvaluationService(spec).start() if EvaluationService.wanted(spec) else None
    runner = TrialRunner(job_run, evaluation)
    trials = sweep_trials(spec)
    try:
        if len(trials) == 1 and not trials[0].assignments:  # a plain job: no Tune in between
            try:
                outcome = runner.run(trials[0])
                console(f"[stars] final checkpoint {outcome.result.checkpoint_path}")
            except TrialFailed as exc:
                outcome = TrialOutcome(trials[0].key, "failed", str(exc))
            result.outcomes = [outcome]
        else:
            result.outcomes = run_sweep(spec, trials, runner, console=console)
        result.outcomes = explain_worker_deaths(result.outcomes, trials, tracker, job_run)
    except BaseException:
        if tracker:
            # Ctrl-C, or a stop: `ray.init` turns SIGTERM (`starsctl stop`) into SystemExit.
            stopped = isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit))
            status = "KILLED" if stopped else "FAILED"
            # the trials in flight (and their evaluations) too: their processes are gone with the driver
            tracker.close_open_descendants(job_run, status, console=console)
            # ... but not a trial that wrote its done marker just before: it finished
            finish_done_trial_runs(trials, tracker, console=console)
            tracker.close_run(job_run, status, console=console)
        raise
    finally:
        if evaluation:
            evaluation.stop()
    from stars.ray_backend.sweep_report import final_curves, final_tables, log_sweep_report

    curves = final_curves(spec, trials, result.outcomes)
    if tracker:
        if len(result.outcomes) > 1:
            log_sweep_report(tracker, job_run, spec, curves)  # read once, printed below too
        tracker.close_run(job_run, "FAILED" if result.failed else "FINISHED", console=console)
    result.wall_seconds = time.perf_counter() - start
    for table in final_tables(curves):  # the final depth curves, as `starsctl compare` shows them
        console(table)
    for line in outcome_lines(result, spec.name):
        console(line)
    return result


def outcome_lines(result: JobResult, name: str) -> list[str]:
    """The end-of-job summary: one line per trial that did not simply finish, and the counts."""
    counts: dict[str, int] = {}
    lines = []
    for o in result.outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
        if o.status in ("failed", "stopped"):
            lines.append(f"[stars]   {o.key}: {o.status}: {o.reason}")
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    head = f"[stars] job {name!r} done in {result.wall_seconds:.0f} s: {summary}"
    return [head, *lines]
