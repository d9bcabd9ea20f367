"""Depth-curve evaluation of checkpoints: scoring, the summary, reports. No Ray, no MLflow.

- `scoring`: every task of a checkpoint at every depth, with the loop's dynamics (`evaluate_checkpoint`);
- `summary`: peak / best depth / acc@d / drop@d of one curve, the one definition (`summary_metrics`);
- `reports`: the depth table as CSV, PNG plots, the text table of `starsctl eval`.

Importing the package loads neither torch nor matplotlib (each is imported where it is used), so
`starsctl compare` and the Ray driver can use the summary and plots cheaply. MLflow writes of these
results are `stars.tracking.evaluation`; Ray's evaluation actors are `stars.ray_backend.evaluation`.
"""

from stars.evaluation.reports import (
    depth_table_csv,
    format_task_table,
    plot_depth_curves,
    task_table_csv,
    write_task_artifacts,
)
from stars.evaluation.scoring import (
    DYN_KEYS,
    CheckpointEval,
    EvalInputError,
    TaskEval,
    evaluate_checkpoint,
    evaluate_task,
    generate_depths,
    generative,
    rho_by_depth,
    teacher_forced,
)
from stars.evaluation.summary import DROP_DEPTHS, SUMMARY_DEPTHS, summary_metrics

__all__ = [
    "DROP_DEPTHS",
    "DYN_KEYS",
    "SUMMARY_DEPTHS",
    "CheckpointEval",
    "EvalInputError",
    "TaskEval",
    "depth_table_csv",
    "evaluate_checkpoint",
    "evaluate_task",
    "format_task_table",
    "generate_depths",
    "generative",
    "plot_depth_curves",
    "rho_by_depth",
    "summary_metrics",
    "task_table_csv",
    "teacher_forced",
    "write_task_artifacts",
]
