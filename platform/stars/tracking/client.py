"""MLflow run hierarchy of STARS jobs, through `MlflowClient` and explicit run ids only.

No fluent API (`mlflow.start_run`, active runs): every call names its run id, so the same code is
safe in the Ray driver, in Ray Tune trials, in evaluation actors and in DDP workers. The caller
decides who logs (rank 0 only); nothing here reads the rank.

Layout (one experiment per `spec.experiment`):

    job run            name = spec.name; params = flattened resolved spec; resolved spec artifact
    |-- trial run      one per sweep point (tag mlflow.parentRunId); without a sweep the job run
    |   |              is its own (only) trial: one run per training
    |   |  metrics     train/loss, train/ce, train/jsrr, train/depth, train/lr, train/tokens_per_s
    |   |              at step = optimizer step; eval summaries <task>/peak_acc, <task>/best_depth,
    |   |              <task>/acc_at_{4,8,16}, <task>/drop_at_{8,16} at step = training step
    |   `-- eval run   `eval@step=N` per evaluated checkpoint; metrics at step = depth:
    |                  <task>/acc, dyn/hidden_norm, dyn/step_size, dyn/dist_from_start, dyn/rho

(MLflow metric names may not contain `@`, hence `acc_at_4` rather than `acc@4`.)

Runs are found again by the tag `stars.run_key` (job: `<name>@<spec hash>`; trial:
`<job key>/<trial key>`; eval: `<trial key>/eval@step=N`), so a resubmitted or restarted job
reuses its runs instead of creating duplicates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stars.spec import (
    default_tracking_uri,
    is_local_path,
    is_local_store,
    resolved_yaml,
    spec_hash,
)
from stars.tracking.params import flatten_params

if TYPE_CHECKING:
    from stars.spec import JobSpec, Trial

__all__ = [
    "DYN_METRICS",
    "TAG_KIND",
    "TAG_PARENT",
    "TAG_RUN_KEY",
    "TAG_STEP",
    "TRAIN_METRICS",
    "Tracker",
    "eval_run_name",
    "git_info",
    "ray_job_id",
    "resolve_tracking_uri",
    "train_metric_names",
]

TRAIN_METRICS = ("train/loss", "train/ce", "train/jsrr", "train/depth", "train/lr", "train/tokens_per_s")
DYN_METRICS = ("dyn/hidden_norm", "dyn/step_size", "dyn/dist_from_start", "dyn/rho")

TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_KEY = "stars.run_key"
TAG_KIND = "stars.kind"  # job | trial | eval
TAG_SPEC_HASH = "stars.spec_hash"
TAG_GIT_SHA = "stars.git_sha"
TAG_GIT_DIRTY = "stars.git_dirty"
TAG_RAY_JOB_ID = "stars.ray_job_id"
TAG_TRIAL = "stars.trial"
TAG_STEP = "stars.step"
TAG_NAME = "stars.name"
TAG_NOTE = "mlflow.note.content"
TAG_SOURCE_COMMIT = "mlflow.source.git.commit"


# ------------------------------------------------------------------------------------- helpers
def resolve_tracking_uri(uri: str | None = None, cwd: str | Path | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the local store `sqlite:///<cwd>/mlflow.db`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(cwd)


def git_info(path: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(commit sha, dirty?) of the git checkout at `path` (default: the working directory, then
    this package's directory). $STARS_GIT_SHA wins when set (jobs shipped without .git)."""
    env = os.environ.get("STARS_GIT_SHA")
    if env:
        return env, None
    candidates = [Path(path)] if path is not None else [Path.cwd(), Path(__file__).resolve().parent]
    for where in candidates:
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
            )
            if sha.returncode != 0:
                continue
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=where,
                capture_output=True,
                text=True,
                timeout=10,
            )
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
            return sha.stdout.strip(), dirty
        except (OSError, subprocess.SubprocessError):
            continue
    return None, None


def ray_job_id() -> str | None:
    """The Ray job's submission id when running as a Ray job (entrypoint of `ray job submit`),
    else the Ray job id of an initialised Ray driver/worker, else None. Never imports ray."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            sub = json.loads(raw).get("metadata", {}).get("job_submission_id")
            if sub:
                return str(sub)
        except (ValueError, AttributeError):
            pass
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized():
                return str(ray.get_runtime_context().get_job_id())
        except Exception:  # noqa: BLE001 - best effort, never fail tracking over it
            return None
    return None


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters of it): how an MLflow client error is
    shown in one warning line."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def train_metric_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """Training metrics under their MLflow names: keys may come with or without the `train/` prefix
    (`loss` or `train/loss`)."""
    return {k if "/" in k else f"train/{k}": v for k, v in metrics.items()}


def eval_run_name(step: int) -> str:
    """Name of the nested run of the checkpoint at training step `step`."""
    return f"eval@step={int(step)}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _artifact_location(root: str | None, experiment: str) -> str | None:
    if root is None:
        return None
    if is_local_path(root) and not root.startswith("file://"):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        return (Path(root).expanduser().resolve() / safe).as_uri()
    return root.rstrip("/") + "/" + experiment


# ------------------------------------------------------------------------------------- tracker
class Tracker:
    """MLflow access for one tracking store; every method takes explicit ids.

    `Tracker.from_spec(spec)` uses the spec's (resolved) tracking URI. Create runs in one process
    (the driver or rank 0) and pass the run ids on; logging from several processes to the same
    run id is safe.
    """

    def __init__(self, uri: str | None = None, *, artifact_root: str | None = None):
        self.uri = resolve_tracking_uri(uri)
        self.artifact_root = artifact_root
        if artifact_root is None and is_local_store(self.uri):
            base = Path(self.uri[len("sqlite:///") :]).parent if self.uri.startswith("sqlite:///") else Path.cwd()
            self.artifact_root = str(base / "mlruns")
        self.client = MlflowClient(tracking_uri=self.uri)

    @classmethod
    def from_spec(cls, spec: JobSpec) -> Tracker:
        return cls(spec.tracking.uri, artifact_root=spec.tracking.artifact_location)

    # experiments and runs -----------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        """Id of the experiment `name`, created (with this tracker's artifact root) if missing."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_artifact_location(self.artifact_root, name))
        except MlflowException:
            exp = self.client.get_experiment_by_name(name)  # created concurrently
            if exp is None:
                raise
            return exp.experiment_id

    def find_run(self, experiment_id: str, run_key: str) -> str | None:
        """Id of the oldest active run tagged `stars.run_key = run_key`, or None."""
        key = run_key.replace("\\", "\\\\").replace("'", "\\'")
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_RUN_KEY}` = '{key}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        return runs[0].info.run_id if runs else None

    def get_or_create_run(
        self,
        experiment_id: str,
        run_key: str,
        run_name: str,
        *,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        reuse: bool = True,
    ) -> tuple[str, bool]:
        """(run id, created?) of the run with this key: the existing one (marked RUNNING again,
        tags refreshed) when `reuse`, else a new one."""
        all_tags = {TAG_RUN_KEY: run_key, **(tags or {})}
        if parent_run_id is not None:
            all_tags[TAG_PARENT] = parent_run_id
        if reuse:
            run_id = self.find_run(experiment_id, run_key)
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
                self.set_tags(run_id, all_tags)
                return run_id, False
        run = self.client.create_run(experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name)
        return run.info.run_id, True

    def start_job(
        self,
        spec: JobSpec,
        *,
        reuse: bool = True,
        git: tuple[str | None, bool | None] | None = None,
        ray_job: str | None = None,
        extra_tags: Mapping[str, str] | None = None,
    ) -> str:
        """The job's (parent) run: params = flattened spec, tags (spec hash, git sha, Ray job id,
        spec.tracking.tags), the resolved spec as `spec/resolved.yaml`. Returns its run id."""
        exp_id = self.experiment_id(spec.experiment or spec.name)
        h = spec_hash(spec)
        sha, dirty = git if git is not None else git_info()
        job_id = ray_job if ray_job is not None else ray_job_id()
        tags: dict[str, str] = {TAG_KIND: "job", TAG_SPEC_HASH: h, TAG_NAME: spec.name, **spec.tracking.tags}
        if sha:
            tags[TAG_GIT_SHA] = sha
            tags[TAG_SOURCE_COMMIT] = sha
        if dirty is not None:
            tags[TAG_GIT_DIRTY] = str(dirty).lower()
        if job_id:
            tags[TAG_RAY_JOB_ID] = job_id
        if spec.description:
            tags[TAG_NOTE] = spec.description
        if spec.sweep.enabled:
            tags["stars.num_trials"] = str(spec.sweep.num_trials)
        tags.update(extra_tags or {})
        run_id, _ = self.get_or_create_run(exp_id, f"{spec.name}@{h}", spec.name, tags=tags, reuse=reuse)
        self.log_params(run_id, flatten_params(spec))
        self.log_text(run_id, resolved_yaml(spec, redact=True), "spec/resolved.yaml")
        return run_id

    def start_trial(self, job_run_id: str, trial: Trial, *, reuse: bool = True) -> str:
        """The run a trial trains in. Without a sweep (`trial.assignments` empty) that is the job
        run itself; with one, a child run named `<name>/<trial key>` with the trial's own params,
        spec hash and resolved spec."""
        if not trial.assignments:
            self.set_tags(job_run_id, {TAG_TRIAL: trial.key})
            return job_run_id
        job = self.client.get_run(job_run_id)
        job_key = job.data.tags.get(TAG_RUN_KEY, job_run_id)
        inherited = {
            k: v
            for k, v in job.data.tags.items()
            if k in (TAG_GIT_SHA, TAG_GIT_DIRTY, TAG_RAY_JOB_ID, TAG_SOURCE_COMMIT, TAG_NAME)
        }
        tags = {
            **inherited,
            **trial.spec.tracking.tags,
            TAG_KIND: "trial",
            TAG_TRIAL: trial.key,
            TAG_SPEC_HASH: spec_hash(trial.spec),
            **{f"stars.sweep.{k}": _tag_value(v) for k, v in trial.assignments.items()},
        }
        run_id, _ = self.get_or_create_run(
            job.info.experiment_id,
            f"{job_key}/{trial.key}",
            f"{trial.spec.name}/{trial.key}",
            tags=tags,
            parent_run_id=job_run_id,
            reuse=reuse,
        )
        self.log_params(run_id, flatten_params(trial.spec))
        self.log_text(run_id, resolved_yaml(trial.spec, redact=True), "spec/resolved.yaml")
        return run_id

    def start_eval(self, trial_run_id: str, step: int, *, reuse: bool = True) -> str:
        """The nested run `eval@step=N` of the checkpoint at training step `step`."""
        trial = self.client.get_run(trial_run_id)
        trial_key = trial.data.tags.get(TAG_RUN_KEY, trial_run_id)
        name = eval_run_name(step)
        tags = {TAG_KIND: "eval", TAG_STEP: str(int(step))}
        for k in (TAG_SPEC_HASH, TAG_GIT_SHA, TAG_TRIAL, TAG_RAY_JOB_ID, TAG_NAME):
            if k in trial.data.tags:
                tags[k] = trial.data.tags[k]
        run_id, _ = self.get_or_create_run(
            trial.info.experiment_id, f"{trial_key}/{name}", name, tags=tags, parent_run_id=trial_run_id, reuse=reuse
        )
        return run_id

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED (or FAILED / KILLED)."""
        self.client.set_terminated(run_id, status=status)

    def close_run(self, run_id: str, status: str | None = "FINISHED", *, tags: Mapping[str, Any] | None = None,
                  console: Callable[[str], None] = print) -> bool:
        """Set `tags`, then end the run with `status` (None: leave it running), where a job's work is
        already done: MLflow being unreachable is then one warning, not a failed job. True when both
        calls got through; a resubmission of the job ends the run properly."""
        try:
            if tags:
                self.set_tags(run_id, tags)
            if status is not None:
                self.end(run_id, status)
            return True
        except Exception as exc:  # noqa: BLE001 - the client raises several types for "unreachable"
            console(f"[stars] WARNING: MLflow at {self.uri} unreachable: run {run_id} not marked "
                    f"{status or 'with its final tags'} ({error_line(exc)})")
            return False

    def finish(self, run_id: str, *, console: Callable[[str], None] = print) -> bool:
        """End `run_id` FINISHED unless it already is (a finished run keeps its end time), where its
        work is known done; MLflow unreachable is one warning. True when the run changed."""
        try:
            if self.client.get_run(run_id).info.status == "FINISHED":
                return False
            self.end(run_id, "FINISHED")
            return True
        except Exception as exc:  # noqa: BLE001 - the client raises several types for "unreachable"
            console(f"[stars] WARNING: MLflow at {self.uri} unreachable: run {run_id} not marked FINISHED "
                    f"({error_line(exc)})")
            return False

    def close_open_descendants(self, run_id: str, status: str, *, console: Callable[[str], None] = print) -> list[str]:
        """End with `status` every run under `run_id` (its trials, their checkpoints' eval runs) that is
        still RUNNING: what a job that stops early leaves behind, where nobody else will end them (the
        processes that would have are gone). A resubmission marks each RUNNING again as it resumes it
        (`get_or_create_run`). Returns the ids ended; MLflow unreachable is one warning."""
        ended: list[str] = []
        try:
            experiment_id = self.client.get_run(run_id).info.experiment_id  # children share their parent's
            parents = [run_id]
            while parents:
                for child in self.child_runs(parents.pop(), experiment_id=experiment_id):
                    parents.append(child.info.run_id)
                    if child.info.status == "RUNNING":
                        self.end(child.info.run_id, status)
                        ended.append(child.info.run_id)
        except Exception as exc:  # noqa: BLE001 - the client raises several types for "unreachable"
            console(f"[stars] WARNING: MLflow at {self.uri} unreachable: runs under {run_id} not marked {status} "
                    f"({error_line(exc)})")
        return ended

    # logging -------------------------------------------------------------------------------
    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int, *, timestamp_ms: int | None = None
    ) -> None:
        """Log metrics at `step` in one `log_batch` (MLflow splits it into batches its store
        accepts); None values are skipped."""
        ts = timestamp_ms if timestamp_ms is not None else _now_ms()
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None]
        self.client.log_batch(run_id, metrics=items)

    def log_train_step(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        """Training metrics at step = optimizer step, synchronously (training itself logs through
        `stars.tracking.outbox.MetricOutbox`)."""
        self.log_metrics(run_id, train_metric_names(metrics), step)

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Log params in one `log_batch` (MLflow splits it into batches of 100), skipping keys the
        run already has (params are immutable in MLflow; a reused run keeps its first values)."""
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        self.client.log_batch(run_id, params=new)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory (e.g. a depth-curve PNG) to the run's artifacts."""
        path = Path(local_path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of a metric, ordered by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def child_runs(self, run_id: str, kind: str | None = None, *, experiment_id: str | None = None) -> list[Any]:
        """Direct children of a run (optionally only those with `stars.kind = kind`); `experiment_id`,
        when the caller knows it, saves reading the run for it."""
        if experiment_id is None:
            experiment_id = self.client.get_run(run_id).info.experiment_id
        filt = f"tags.`{TAG_PARENT}` = '{run_id}'"
        if kind:
            filt += f" and tags.`{TAG_KIND}` = '{kind}'"
        return list(self.client.search_runs([experiment_id], filter_string=filt, max_results=10_000))


def _tag_value(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text[:5000]
