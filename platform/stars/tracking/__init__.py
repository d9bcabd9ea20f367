"""MLflow tracking of STARS jobs: the run hierarchy (`client`), the writes of evaluation results
(`evaluation`) and training's buffered metric journal (`outbox`), through `MlflowClient` and explicit
run ids.

See `stars.tracking.client` for the layout of runs and metrics (also docs/architecture.md).
"""

from stars.tracking.client import (
    DYN_METRICS,
    TAG_KIND,
    TAG_PARENT,
    TAG_RUN_KEY,
    TAG_STEP,
    TAG_TRIAL,
    TRAIN_METRICS,
    Tracker,
    eval_run_name,
    git_info,
    ray_job_id,
    resolve_tracking_uri,
    train_metric_names,
)
from stars.tracking.evaluation import log_checkpoint_run, log_task_eval
from stars.tracking.outbox import JournalStatus, MetricOutbox, find_journals, journal_status, send_journal
from stars.tracking.params import (
    MAX_PARAM_KEY,
    MAX_PARAM_VALUE,
    flatten_params,
    iter_secret_values,
    param_key,
)

__all__ = [
    "DYN_METRICS",
    "MAX_PARAM_KEY",
    "JournalStatus",
    "MetricOutbox",
    "MAX_PARAM_VALUE",
    "TAG_KIND",
    "TAG_PARENT",
    "TAG_RUN_KEY",
    "TAG_STEP",
    "TAG_TRIAL",
    "TRAIN_METRICS",
    "Tracker",
    "eval_run_name",
    "find_journals",
    "flatten_params",
    "git_info",
    "iter_secret_values",
    "journal_status",
    "log_checkpoint_run",
    "log_task_eval",
    "param_key",
    "ray_job_id",
    "resolve_tracking_uri",
    "send_journal",
    "train_metric_names",
]
