"""MLflow writes of one evaluated (checkpoint, task): plain curves and numbers in, nothing scored here.

Where things go (docs/interfaces.md): the checkpoint's eval run `eval@step=N` holds the depth curves
at step = depth and the report files; the trial run holds the task's summary at step = training step.
The caller (`stars.ray_backend.evaluation`) turns a `stars.evaluation.TaskEval` into these arguments;
this module does not import the evaluation package, which sits above tracking in the layering.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from mlflow.entities import Metric

from stars.tracking.client import TAG_KIND, TAG_NAME, Tracker


def log_task_eval(
    tracker: Tracker,
    eval_run_id: str,
    trial_run_id: str | None,
    *,
    step: int,
    curves: Mapping[str, Mapping[int, float]],
    summary: Mapping[str, float],
    files: Iterable[str | Path] = (),
    artifact_dir: str | None = None,
) -> None:
    """Log one task of the checkpoint at training step `step`:
    - `curves` (metric name -> {depth: value}, e.g. `addition/acc`, `dyn/rho`) on the eval run, at
      step = depth, in one `log_batch` (MLflow splits it into batches its store accepts);
    - `files` (depth table, plot) as artifacts of the eval run under `artifact_dir`;
    - `summary` on the trial run at step = `step`, when there is a trial run.

    Idempotent: a curve the eval run already has, or a summary the trial run already holds at this
    step, is not logged again (a unit retried after its evaluator died between logging and marking
    it done must not leave two points per depth)."""
    ts = int(time.time() * 1000)
    have = set(tracker.client.get_run(eval_run_id).data.metrics)
    points = [
        Metric(name, float(v), ts, int(d))
        for name, curve in curves.items()
        if name not in have
        for d, v in sorted(curve.items())
    ]
    tracker.client.log_batch(eval_run_id, metrics=points)
    for f in files:
        tracker.log_artifact(eval_run_id, f, artifact_dir)
    if trial_run_id and summary:
        first = next(iter(summary))
        if int(step) not in {s for s, _ in tracker.metric_history(trial_run_id, first)}:
            tracker.log_metrics(trial_run_id, summary, int(step))


def log_checkpoint_run(
    tracker: Tracker,
    experiment: str,
    run_name: str,
    *,
    step: int,
    checkpoint: str,
    tasks: Mapping[str, tuple[Mapping[str, Mapping[int, float]], Mapping[str, float]]],
) -> tuple[str, str]:
    """A checkpoint scored outside a job (`starsctl eval --experiment`), filed like a job's so that
    `starsctl compare` reads it: a run `run_name` (tag `stars.kind = checkpoint`) with one nested eval
    run `eval@step=<step>`. `tasks` maps each task to its (curves, summary) as `log_task_eval` takes
    them. This is how the base model gets its row in the paper's main table: it is never trained, so
    no job scores it. The same name again reuses the run (curves it holds are not logged twice).
    Returns (run id, eval run id)."""
    experiment_id = tracker.experiment_id(experiment)
    run_id, _ = tracker.get_or_create_run(experiment_id, f"checkpoint:{run_name}", run_name,
                                          tags={TAG_KIND: "checkpoint", TAG_NAME: run_name,
                                                "stars.checkpoint": checkpoint})
    eval_run = tracker.start_eval(run_id, step)
    for curves, summary in tasks.values():
        log_task_eval(tracker, eval_run, run_id, step=step, curves=curves, summary=summary)
    tracker.end(eval_run)
    tracker.end(run_id)
    return run_id, eval_run
