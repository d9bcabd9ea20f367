"""Live metrics of a running job, for the Ray dashboard: `ray.util.metrics` gauges and counters.

Ray's metrics agent on each node exports them in Prometheus format, named with a `ray_` prefix (a counter
also with a `_total` suffix: `ray_stars_eval_checkpoints_scored_total`) and labelled with our tags plus
Ray's own (`WorkerId`, `NodeAddress`, `SessionName`). The dashboard's Metrics page charts them once a
Prometheus scrapes the nodes (README.md, "Live metrics").

- Training, from rank 0 of each trial (`TrainMetrics`, the `TrainHooks.publish_metrics` hook of
  `stars.train`): loss, tokens/s, the sampled loop depth and the optimizer step of each logged step.
- Evaluation, from the job's Evaluator actors (`EvalMetrics`): checkpoints scored (one count per
  checkpoint and task) and the seconds the last unit took, per trial, actor and task; the trial's
  backlog (committed checkpoints not fully scored).

Tags: `job` (the spec's name), `trial` (the trial's Ray Train run name, `run_name_for`), and for
evaluation `actor` (the Evaluator's name) and `task`. A gauge is one series per process (Ray adds
its `WorkerId`), so every gauge here is set from one long-lived process per tag set: rank 0 for a
trial's training, the trial's first evaluator for its backlog (`stars.ray_backend.evaluation`).
Ray 2.60 exports a gauge when it is set and drops it two export intervals (20 s) later, so this
process sets its gauges again every `REFRESH_S` (`HeldGauges`) for as long as it lives: a loss stays
on the chart through a long step, a backlog between checkpoints.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge

__all__ = ["EVAL_METRICS", "TRAIN_METRICS", "EvalMetrics", "TrainMetrics"]

TRAIN_TAGS = ("job", "trial")
UNIT_TAGS = ("job", "trial", "actor", "task")

#: `stars.train`'s logged metric -> (gauge name, description).
TRAIN_GAUGES = {
    "train/loss": ("stars_train_loss", "STARS loss of the last logged optimizer step (rank 0)"),
    "train/tokens_per_s": ("stars_train_tokens_per_s", "Training throughput over the last log window, all workers"),
    "train/depth": ("stars_train_depth", "Loop depth sampled for the last logged optimizer step"),
}
STEP_GAUGE = ("stars_train_step", "Optimizer steps done")
SCORED_COUNTER = ("stars_eval_checkpoints_scored", "Checkpoints scored, one count per checkpoint and task")
SECONDS_GAUGE = ("stars_eval_seconds_per_unit", "Seconds the last (checkpoint, task) unit took to score")
BACKLOG_GAUGE = ("stars_eval_backlog", "Committed checkpoints of the trial not fully scored yet")

#: The names as published (Ray's export adds the `ray_` prefix and a counter's `_total`).
TRAIN_METRICS = tuple(name for name, _ in (*TRAIN_GAUGES.values(), STEP_GAUGE))
EVAL_METRICS = tuple(name for name, _ in (SCORED_COUNTER, SECONDS_GAUGE, BACKLOG_GAUGE))
REFRESH_S = 5.0  # half of Ray's default export interval (`metrics_report_interval_ms`, 10 s)


class HeldGauges:
    """The last value of every gauge (and tag set) this process set, set again every `REFRESH_S` by a
    daemon thread started with the first one, so Ray keeps exporting it (module docstring)."""

    def __init__(self) -> None:
        self._values: dict[tuple[int, frozenset[tuple[str, str]]], tuple[Gauge, dict[str, str], float]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def set(self, gauge: Gauge, value: float, tags: dict[str, str] | None = None) -> None:
        tags = tags or {}
        gauge.set(value, tags=tags)
        with self._lock:
            self._values[(id(gauge), frozenset(tags.items()))] = (gauge, tags, value)
            if self._thread is None:
                self._thread = threading.Thread(target=self._refresh, name="stars-metrics", daemon=True)
                self._thread.start()

    def _refresh(self) -> None:
        while True:
            time.sleep(REFRESH_S)
            with self._lock:
                held = list(self._values.values())
            for gauge, tags, value in held:
                gauge.set(value, tags=tags)


_HELD = HeldGauges()  # one per process: its thread refreshes the gauges of every instance below


class TrainMetrics:
    """A trial's training metrics, set by its rank 0 at every logged step."""

    def __init__(self, job: str, trial: str) -> None:
        tags = {"job": job, "trial": trial}
        self.gauges = {key: Gauge(name, description, tag_keys=TRAIN_TAGS).set_default_tags(tags)
                       for key, (name, description) in TRAIN_GAUGES.items()}
        self.step = Gauge(*STEP_GAUGE, tag_keys=TRAIN_TAGS).set_default_tags(tags)

    def publish(self, metrics: Mapping[str, float], step: int) -> None:
        """`stars.train`'s metrics of optimizer step `step` (the `publish_metrics` hook)."""
        for key, gauge in self.gauges.items():
            if key in metrics:
                _HELD.set(gauge, float(metrics[key]))
        _HELD.set(self.step, step)


class EvalMetrics:
    """One Evaluator actor's metrics: what it scored, and the backlog of the trials it reports for."""

    def __init__(self, job: str, actor: str) -> None:
        unit_tags = {"job": job, "actor": actor}
        self.scored = Counter(*SCORED_COUNTER, tag_keys=UNIT_TAGS).set_default_tags(unit_tags)
        self.seconds = Gauge(*SECONDS_GAUGE, tag_keys=UNIT_TAGS).set_default_tags(unit_tags)
        self.backlog = Gauge(*BACKLOG_GAUGE, tag_keys=TRAIN_TAGS).set_default_tags({"job": job})

    def unit_scored(self, trial: str, task: str, seconds: float) -> None:
        tags = {"trial": trial, "task": task}
        self.scored.inc(1, tags=tags)
        _HELD.set(self.seconds, seconds, tags)

    def set_backlog(self, trial: str, waiting: int) -> None:
        _HELD.set(self.backlog, waiting, {"trial": trial})
