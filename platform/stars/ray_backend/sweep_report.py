"""The sweep's results on its parent MLflow run: every trial's final depth curve in one table.

Read from the evaluation ledger on run storage (`stars.ray_backend.ledger`), which holds exactly what
MLflow holds for each scored checkpoint, at each trial's final checkpoint (`stars_trial_done.json`):

- `sweep/depth_curves.csv`: one row per (trial, task): status, accuracy at every depth, peak, best
  depth, drop@8, drop@16;
- `sweep/<task>_depth_curves.png`: the trials' final curves overlaid;
- metrics `trials/t003/<task>/peak_acc`, `.../best_depth`, `.../drop_at_8`, `.../drop_at_16` on the
  job run (MLflow metric names allow no `=` or `,`, so trials are named by index; the CSV maps
  indices to keys).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from stars.checkpoint import step_of
from stars.evaluation import plot_depth_curves
from stars.ray_backend.ledger import EvalLedger, storage_filesystem
from stars.ray_backend.sweep import TRIAL_DONE, TrialOutcome
from stars.spec import JobSpec, Trial
from stars.tracking import Tracker

SUMMARY_COLUMNS = ("peak_acc", "best_depth", "drop_at_8", "drop_at_16")


@dataclass(frozen=True)
class FinalCurve:
    trial: Trial
    status: str
    task: str
    step: int | None
    acc: dict[int, float]
    summary: dict[str, float]


def final_curves(spec: JobSpec, trials: Sequence[Trial], outcomes: Sequence[TrialOutcome]) -> list[FinalCurve]:
    """Each trial's depth curves at its final checkpoint (empty for a trial that did not finish)."""
    out = []
    for trial, outcome in zip(trials, outcomes, strict=True):
        step = _final_step(outcome.run_dir) if outcome.status in ("finished", "skipped") else None
        ledger = EvalLedger(outcome.run_dir) if step is not None else None
        for task in spec.eval.tasks or []:
            record = ledger.done(step, task) if ledger else None
            acc = {int(d): float(a) for d, a in (record or {}).get("acc", {}).items()}
            out.append(FinalCurve(trial, outcome.status, task, step, acc, dict((record or {}).get("summary", {}))))
    return out


def _final_step(run_dir: str | None) -> int | None:
    if run_dir is None:
        return None
    fs, root = storage_filesystem(run_dir)
    path = f"{root}/{TRIAL_DONE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        checkpoint = json.loads(f.read().decode()).get("checkpoint")
    return step_of(checkpoint) if checkpoint else None


def depth_table_rows(curves: Sequence[FinalCurve]) -> list[dict[str, object]]:
    depths = sorted({d for c in curves for d in c.acc})
    rows = []
    for c in curves:
        row: dict[str, object] = {"trial": c.trial.key, "status": c.status, "task": c.task, "step": c.step}
        row.update({str(d): c.acc.get(d) for d in depths})
        row.update({k: c.summary.get(f"{c.task}/{k}") for k in SUMMARY_COLUMNS})
        rows.append(row)
    return rows


def _csv(rows: Sequence[dict[str, object]]) -> str:
    """RFC 4180 CSV: trial keys hold commas (`t003-type=rmsnorm,weight=0.1`), so cells are quoted."""
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def final_tables(curves: Sequence[FinalCurve]) -> list[str]:
    """The trials' final depth curves as `starsctl compare` prints them, one table per task: what the
    job prints when it ends."""
    from stars.compare import Comparison, DepthCurve, format_table

    tables = []
    for task in dict.fromkeys(c.task for c in curves):
        rows = [
            DepthCurve(f"{c.trial.key if c.trial.assignments else c.trial.spec.name}@{c.step}", "", None, c.step,
                       c.acc, c.summary)
            for c in curves if c.task == task and c.acc
        ]
        if rows:
            depths = sorted({d for r in rows for d in r.acc})
            tables.append(format_table(Comparison(task, rows, depths, skipped=[])))
    return tables


def log_sweep_report(tracker: Tracker, job_run_id: str, spec: JobSpec, curves: Sequence[FinalCurve]) -> None:
    """Write the sweep's table, overlay plots and per-trial summary metrics (`final_curves`) onto the
    job run."""
    if not curves:
        return
    tracker.log_text(job_run_id, _csv(depth_table_rows(curves)), "sweep/depth_curves.csv")
    metrics = {
        f"trials/t{c.trial.index:03d}/{c.task}/{k}": c.summary[f"{c.task}/{k}"]
        for c in curves for k in SUMMARY_COLUMNS if f"{c.task}/{k}" in c.summary
    }
    if metrics:
        tracker.log_metrics(job_run_id, metrics, 0)
    with tempfile.TemporaryDirectory(prefix="stars-sweep-") as tmp:
        for task in dict.fromkeys(c.task for c in curves):
            lines = {c.trial.key: c.acc for c in curves if c.task == task and c.acc}
            if lines:
                png = plot_depth_curves(lines, Path(tmp) / f"{task}_depth_curves.png",
                                        title=f"{spec.name}: {task}, final checkpoint of each trial")
                tracker.log_artifact(job_run_id, png, "sweep")
