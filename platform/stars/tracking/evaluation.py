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

from stars.tracking.client import Tracker


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
