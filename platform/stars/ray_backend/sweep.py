"""Running a job's trials: one trial directly on Ray Train, a sweep's trials on Ray Tune.

A sweep is a `ray.tune.Tuner` over a function trainable: each Tune trial runs `TrialRunner.run`, which
drives that trial's own `TorchTrainer` (Ray's documented Train-inside-Tune pattern for Train V2) with
`TuneReportCallback`, so whatever the workers report reaches Tune (and its scheduler). The trials are
the spec's own expansion (`stars.spec.sweep_trials`): every trial was validated as a full spec before
anything started, so Tune gets only the trial index to run, never a search space of its own.

- Concurrency: `sweep.max_concurrent_trials`, by default as many trials as the cluster's CPUs (GPUs)
  hold once the job's evaluators have theirs (`default_concurrency`).
- Evaluation: the job's Evaluator pool is shared by all trials. Each trial starts its checkpoints'
  tasks at actor `trial index % eval.workers`, so with `eval.workers >= ` the concurrency, concurrent
  trials score on different actors; with fewer, their checkpoints queue (a warning says so).
- Failure isolation: a trial whose loss stops being finite ends with "diverged at step N"; any other
  exception ends that trial only. Its MLflow run ends FAILED with the reason in the tag
  `stars.failure`; the other trials go on (Tune's `fail_fast` is off).
- Early stopping (`sweep.early_stop`): Tune's ASHA scheduler on a metric the trials report. Workers
  report at every checkpoint: `step`, `train/loss`, `train/depth`, and the eval summaries of the
  latest scored checkpoint (`<task>/peak_acc`, `<task>/acc_at_16`, ...), which trail by one
  checkpoint since scoring runs beside training. A stopped trial's MLflow run ends KILLED with
  `stars.failure` "stopped early by ASHA ...".
- Resume: a trial that finished writes `stars_trial_done.json` into its run directory; submitting the
  job again runs only trials without it, each from its last checkpoint (same run directory, same MLflow
  run through its `stars.run_key`). The done marker decides: a trial that wrote it finished, whatever
  Tune says, and its MLflow run ends FINISHED even when Ctrl-C landed between the marker and the
  run's end (`finish_done_trial_runs`). Ctrl-C interrupts the job (Tune's own SIGINT handling, which would stop the trials and
  return as if they had ended, is off); the job run ends KILLED and unfinished trials resume later.
- A training worker that died with no restart left: the driver adds which checkpoint a resubmission
  resumes from to the trial's reason (`explain_worker_deaths`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import pyarrow.fs as pafs
import ray

from stars.checkpoint import CheckpointWriteError
from stars.ray_backend.evaluation import EvaluationService
from stars.ray_backend.ledger import committed_checkpoints, storage_filesystem
from stars.ray_backend.training import TrialResult, run_dir_for, run_name_for, run_trial
from stars.spec import JobSpec, Trial
from stars.tracking import TAG_TRIAL, Tracker

TRIAL_DONE = "stars_trial_done.json"
TAG_FAILURE = "stars.failure"
NOT_STARTED = "not started: Ray Tune ended before it (submit the job again to run it)"

Status = Literal["finished", "failed", "stopped", "skipped"]


class TrialFailed(RuntimeError):
    """A trial that ended without finishing; its message is the reason shown to the user."""


@dataclass(frozen=True)
class TrialOutcome:
    key: str
    status: Status
    """finished; failed (diverged or raised); stopped (early stopping); skipped (finished by an
    earlier submission of the same job)."""
    reason: str | None = None
    run_id: str | None = None
    run_dir: str | None = None
    result: TrialResult | None = None
    seconds: float = 0.0


def _dir_key(trial: Trial) -> str | None:
    """The key in a trial's run name: none for the single trial of a job without a sweep."""
    return trial.key if trial.assignments else None


def trial_run_dir(trial: Trial) -> str:
    """The trial's Ray Train run directory under its storage path."""
    return run_dir_for(trial.spec, _dir_key(trial))


def is_done(trial: Trial) -> bool:
    fs, root = storage_filesystem(trial_run_dir(trial))
    return fs.get_file_info(f"{root}/{TRIAL_DONE}").type == pafs.FileType.File


def finish_done_trial_runs(trials: Iterable[Trial], tracker: Tracker, *,
                           console: Callable[[str], None] = print) -> list[str]:
    """End FINISHED the MLflow run of every sweep trial that wrote its done marker but whose run is
    not FINISHED. The marker decides: a trial writes it and then ends its run, and an interrupt that
    lands in between has the driver end that run KILLED (`Tracker.close_open_descendants`) although
    the trial finished and a resubmission skips it. The job driver calls this after an interrupt and
    when a resubmission skips finished trials. Returns the ids it ended."""
    ended: list[str] = []
    for trial in trials:
        if not trial.assignments or not is_done(trial):  # a plain job's trial runs in the job run itself
            continue
        fs, root = storage_filesystem(trial_run_dir(trial))
        try:
            with fs.open_input_stream(f"{root}/{TRIAL_DONE}") as f:
                run_id = json.loads(f.read() or b"{}").get("run_id")
        except OSError as exc:  # storage unreachable: say so, and leave the runs as they are
            console(f"[stars] WARNING: cannot read {trial_run_dir(trial)}/{TRIAL_DONE}: {exc}")
            return ended
        if run_id and tracker.finish(run_id, console=console):
            ended.append(run_id)
    return ended


def _mark_done(run_dir: str, record: dict[str, Any]) -> None:
    fs, root = storage_filesystem(run_dir)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{TRIAL_DONE}") as f:
        f.write(json.dumps(record, indent=1).encode())


def _console(line: str) -> None:
    print(line, file=sys.__stdout__, flush=True)


@dataclass(frozen=True)
class TrialRunner:
    """Everything one trial needs; picklable, because Tune ships it to each trial's actor."""

    job_run_id: str | None
    evaluation: EvaluationService | None

    def run(self, trial: Trial, callbacks: Sequence[Any] = ()) -> TrialOutcome:
        """Train and score one trial. Raises `TrialFailed` (after ending its MLflow run FAILED with
        the reason) when it diverged or raised."""
        spec, start = trial.spec, time.perf_counter()
        tracker = Tracker.from_spec(spec) if self.job_run_id else None
        run_id = tracker.start_trial(self.job_run_id, trial) if tracker else None
        run_dir = trial_run_dir(trial)
        ev = self.evaluation
        try:
            validation = ev.validation_config(spec, run_id, run_dir, trial.index) if ev else None
            result = run_trial(spec, run_id=run_id, trial_key=_dir_key(trial), validation_config=validation,
                               callbacks=callbacks)
            if ev:  # fit() waited for the validations; score whatever is still missing
                ev.finish_trial(spec, run_id, result.storage_dir, result.checkpoint_path, trial.index)
        except Exception as exc:  # noqa: BLE001 - every failure ends this trial only, with its reason
            reason = failure_reason(exc)
            if tracker and run_id:
                tracker.close_run(run_id, "FAILED" if run_id != self.job_run_id else None,
                                  tags={TAG_FAILURE: reason}, console=_console)
            raise TrialFailed(reason) from exc
        _mark_done(run_dir, {"trial": trial.key, "checkpoint": result.checkpoint_path, "run_id": run_id,
                             "finished": time.time()})
        if tracker and run_id:  # training is done and its metrics are on disk: MLflow may be gone by now
            tracker.close_run(run_id, "FINISHED" if run_id != self.job_run_id else None, console=_console,
                              tags={"stars.checkpoint": result.checkpoint_path or "", "stars.ray_run": result.run_name})
        return TrialOutcome(trial.key, "finished", None, run_id, run_dir, result, time.perf_counter() - start)


_DIVERGED = re.compile(r"diverged at step \d+: loss \S+")


def failure_reason(exc: BaseException) -> str:
    """The line that says what went wrong, from our own error or the innermost cause Ray wrapped (a
    worker's exception reaches the driver as text inside `WorkerGroupError`/`RayTaskError`)."""
    diverged = _DIVERGED.search(str(exc))
    if diverged:  # stars.train.TrainingDiverged, raised on a worker
        return diverged.group(0)
    for failure in (getattr(exc, "worker_failures", None) or {}).values():  # Ray Train: each failed rank's own exception
        if isinstance(failure, CheckpointWriteError):  # already one line: what, where, why
            return str(failure)
    if _worker_died(exc):
        return WORKER_DIED
    while True:
        if isinstance(exc, TrialFailed):
            return str(exc)
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None or inner is exc:
            break
        exc = inner
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if ":" in ln and not ln.startswith(("File ", "["))), None)
    return f"{type(exc).__name__}: {last or (lines[0] if lines else '')}"[:500]


#: A trial's reason when Ray Train gave up on a worker whose process died (SIGKILL, the OOM killer, a
#: segfault) rather than one whose code raised; Ray says so in a paragraph of its own.
WORKER_DIED = "a training worker died (its process ended without an error of its own: killed, out of memory, or crashed)"
_ACTOR_DIED = "The actor is dead because its worker process has died"


def _worker_died(exc: BaseException) -> bool:
    failures = list((getattr(exc, "worker_failures", None) or {}).values()) or [exc]
    return any(isinstance(f, ray.exceptions.ActorDiedError) or _ACTOR_DIED in str(f) for f in failures)


def explain_worker_deaths(outcomes: Sequence[TrialOutcome], trials: Sequence[Trial], tracker: Tracker | None,
                          job_run_id: str | None) -> list[TrialOutcome]:
    """Once the trials have ended, in the driver: a trial whose worker died with no restart left also
    says what happens next (`resources.max_failures` is used up; which committed checkpoint a
    resubmission resumes from), in its reason and its `stars.failure` tag.

    Here rather than in the trial's own failure path: that path also runs while an interrupted driver
    shuts down its trials, and is kept to what the exception alone says."""
    by_key = {t.key: t for t in trials}
    explained = []
    for outcome in outcomes:
        if outcome.status == "failed" and outcome.reason == WORKER_DIED:
            trial = by_key[outcome.key]
            outcome = replace(outcome, reason=f"{WORKER_DIED}; {restarts_used_up(trial.spec, trial_run_dir(trial))}")
            run_id = outcome.run_id or _trial_run_id(tracker, job_run_id, trial)
            if tracker and run_id:
                tracker.set_tags(run_id, {TAG_FAILURE: outcome.reason})
        explained.append(outcome)
    return explained


def _trial_run_id(tracker: Tracker | None, job_run_id: str | None, trial: Trial) -> str | None:
    if not (tracker and job_run_id):
        return None
    if not trial.assignments:  # no sweep: the job run is the trial's run
        return job_run_id
    runs = [r for r in tracker.child_runs(job_run_id, "trial") if r.data.tags.get(TAG_TRIAL) == trial.key]
    return runs[0].info.run_id if runs else None


def restarts_used_up(spec: JobSpec, run_dir: str) -> str:
    """What a trial that Ray Train stopped restarting leaves: where a resubmission resumes."""
    committed = committed_checkpoints(run_dir)
    resume = (f"submitting the job again resumes from its last committed checkpoint, {committed[-1]}" if committed
              else "no checkpoint was committed, so submitting the job again starts from the beginning")
    return f"no restart left (resources.max_failures: {spec.resources.max_failures}); {resume}"


def default_concurrency(spec: JobSpec, n_trials: int) -> int:
    """Trials at once when the spec does not say: as many as the cluster's CPUs (and GPUs) hold for
    each trial's training workers once the job's evaluators have theirs; at least 1."""
    total = ray.cluster_resources()
    res, ev = spec.resources, spec.eval
    evaluators = ev.workers if ev.tasks else 0
    fits = []
    for kind, per_trial, eval_need in (
        ("CPU", res.num_workers * res.cpus_per_worker, evaluators * ev.resources.cpus),
        ("GPU", res.num_workers * (res.gpus_per_worker or 0.0), evaluators * ev.resources.gpus),
    ):
        if per_trial > 0:
            fits.append(math.floor((total.get(kind, 0.0) - eval_need + 1e-9) / per_trial))
    return max(1, min([n_trials, *fits]))


def _reports(spec: JobSpec) -> int:
    """How many times a trial's workers report: at every checkpoint and at the final step."""
    if spec.train.max_steps is None:
        return 10_000  # epochs: the step count depends on the data; no practical horizon
    return math.ceil(spec.train.max_steps / (spec.train.checkpoint_every or spec.train.max_steps))


def classify_results(results: Iterable[Any], todo: Sequence[Trial], reason_stopped: str) -> dict[int, TrialOutcome]:
    """Each of `todo`'s trials as Tune's `results` left it: finished, failed or stopped.

    A result names its trial by the index in its config. A trial Tune never started (an interrupted
    sweep hands back its result with no config: Ray 2.60), or with no result at all, counts as failed
    (the job did not do it, so it exits 1) with a reason that says so; it has no MLflow run, and a
    resubmission runs it."""
    by_index = {t.index: t for t in todo}
    outcomes: dict[int, TrialOutcome] = {}
    for result in results:
        trial = by_index.get((result.config or {}).get("trial"))
        if trial is None:
            continue  # never started: counted below
        # The done marker first: a trial that wrote it finished, even when Tune stopped its trainable
        # before it returned (Ctrl-C then makes Tune's fit() return, with that trial unfinished).
        run_dir = trial_run_dir(trial)
        if (result.metrics or {}).get("stars/finished") or is_done(trial):
            outcomes[trial.index] = TrialOutcome(trial.key, "finished", run_dir=run_dir)
        elif result.error is not None:
            outcomes[trial.index] = TrialOutcome(trial.key, "failed", failure_reason(result.error), run_dir=run_dir)
        else:
            outcomes[trial.index] = TrialOutcome(trial.key, "stopped", reason_stopped, run_dir=run_dir)
    for trial in todo:
        if trial.index not in outcomes:
            outcomes[trial.index] = TrialOutcome(trial.key, "failed", NOT_STARTED, run_dir=trial_run_dir(trial))
    return outcomes


def run_sweep(
    spec: JobSpec,
    trials: Sequence[Trial],
    runner: TrialRunner,
    *,
    console: Callable[[str], None] = print,
) -> list[TrialOutcome]:
    """Run `trials` (a sweep's, already expanded and validated) on Ray Tune; one outcome per trial
    in trial order. Trials finished by an earlier submission are skipped."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    outcomes: dict[int, TrialOutcome] = {}
    for t in trials:
        if is_done(t):
            outcomes[t.index] = TrialOutcome(t.key, "skipped", "finished by an earlier submission",
                                             run_dir=trial_run_dir(t))
    todo = [t for t in trials if t.index not in outcomes]
    tracker = Tracker.from_spec(spec) if runner.job_run_id else None
    if outcomes:
        if tracker:  # an interrupt may have ended a finished trial's run KILLED
            finish_done_trial_runs(trials, tracker, console=console)
        console(f"[stars] {len(outcomes)} of {len(trials)} trials finished earlier; running the other {len(todo)}")
    if not todo:
        return [outcomes[t.index] for t in trials]
    by_index = {t.index: t for t in todo}
    concurrency = spec.sweep.max_concurrent_trials or default_concurrency(spec, len(todo))
    if spec.eval.tasks and spec.eval.workers < concurrency:
        console(f"[stars] note: {concurrency} trials at once share {spec.eval.workers} evaluator(s); their "
                "checkpoints queue for scoring (raise eval.workers to score them side by side)")
    console(f"[stars] sweep: {len(todo)} trials on Ray Tune, up to {concurrency} at once")

    def trainable(config: dict[str, Any]) -> dict[str, Any]:
        trial = by_index[config["trial"]]
        _console(f"[stars] trial {trial.key} started")
        outcome = runner.run(trial, callbacks=[TuneReportCallback()])
        _console(f"[stars] trial {trial.key} finished in {outcome.seconds:.0f} s")
        # The final result repeats the last report's metrics: Tune checks that every result carries
        # the scheduler's metric.
        last = outcome.result.metrics if outcome.result is not None else {}
        numeric = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {**numeric, "stars/finished": 1}

    stop = spec.sweep.early_stop
    scheduler = None
    if stop is not None:
        # One Tune iteration per report. ASHA's horizon lies one report past the longest trial's last:
        # at max_t ASHA stops a trial itself, which would kill the trainable while its trial is still
        # finishing (final scoring, done marker) and leave the next trial waiting for resources.
        scheduler = tune.schedulers.ASHAScheduler(
            metric=stop.metric, mode=stop.mode, grace_period=stop.grace_period,
            reduction_factor=stop.reduction_factor, time_attr="training_iteration",
            max_t=max(stop.grace_period, *(_reports(t.spec) for t in todo)) + 1,
        )
    first = todo[0].spec
    # Ctrl-C is an interrupt of the whole job, not a stop of its trials: without this Tune catches the
    # first SIGINT, stops the trials and returns from fit() as if they had ended, and the job would
    # record them as stopped. A KeyboardInterrupt instead ends the job run KILLED (stars.ray_backend.job)
    # and leaves every unfinished trial to resume from its checkpoint on the next submission.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    tuner = tune.Tuner(
        # The trainable only drives its TorchTrainer, whose workers hold the real resources, so it asks
        # for no CPU at all. Tune refuses an empty request, hence one byte of memory. A token CPU share
        # (0.001) is not harmless: two trials then leave 1.998 of 2 CPUs and the second trial's
        # 1-CPU worker waits for the first to finish, so trials that should fit side by side run in turn.
        tune.with_resources(trainable, {"cpu": 0, "memory": 1}),
        param_space={"trial": tune.grid_search([t.index for t in todo])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency, scheduler=scheduler,
            # A fresh trainable process per trial. Reuse saves ~1 s of imports, but Tune can reuse a
            # function trainable only when its thread ends within 2 s of the result; a trial's
            # TorchTrainer teardown often takes longer, the reset fails, and Ray 2.60's Tune then
            # left the next trial pending forever (seen with max_concurrent_trials 1 and ASHA).
            reuse_actors=False,
            trial_name_creator=lambda tr: by_index[tr.config["trial"]].key,
            trial_dirname_creator=lambda tr: by_index[tr.config["trial"]].key,
        ),
        run_config=tune.RunConfig(
            name=f"{run_name_for(first)}-tune", storage_path=first.resources.storage_path, verbose=0,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    grid = tuner.fit()
    reason_stopped = f"stopped early by ASHA on {stop.metric}" if stop else "stopped by Ray Tune"
    for index, outcome in classify_results(grid, todo, reason_stopped).items():
        outcomes[index] = outcome
        if outcome.status == "stopped" and tracker:
            run_id = tracker.start_trial(runner.job_run_id, by_index[index])
            tracker.set_tags(run_id, {TAG_FAILURE: outcome.reason})
            tracker.end(run_id, "KILLED")
    return [outcomes[t.index] for t in trials]
