"""One training run (a trial) on Ray Train: `TorchTrainer` around `stars.train.train_loop`.

The run name is deterministic (`<job name>-<spec hash>` or the trial key), so starting the same job
again resumes from its latest committed checkpoint (Ray Train V2 restores a run by name+storage),
and `FailureConfig(max_failures)` restarts failed workers from the last checkpoint within a run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from stars.checkpoint import checkpoint_write_error, step_dir_name
from stars.ray_backend.ledger import EvalLedger
from stars.ray_backend.metrics import TrainMetrics
from stars.spec import JobSpec, is_local_path, spec_hash

#: Ray Train keeps each run's name, status and workers in its state actor, which the dashboard's Train
#: API (`/api/train/v2/runs/v1`) serves, only when this is "1" in the process that calls `fit()`.
TRAIN_STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"


@dataclass(frozen=True, repr=False)
class WorkerConfig:
    """What the driver hands every Ray Train worker of a trial (pickled into `train_loop_config`)."""

    spec: dict[str, Any]
    """The trial's resolved spec as JSON data (validated again on the worker)."""
    run_id: str | None
    """MLflow run the trial logs into (rank 0 only); None without tracking."""
    tracking_uri: str | None
    artifact_root: str | None
    validate: bool
    """Report checkpoints with `validation=True` (the job scores every checkpoint)."""
    run_dir: str | None = None
    """The run's directory on storage: rank 0 adds the latest scored checkpoint's eval summaries
    (`EvalLedger.latest_summary`) to each report, so Tune's schedulers can act on them."""

    def __repr__(self) -> str:
        # Ray Train's state shows the train_loop_config by its repr: the run, not the spec's values
        # (its env_vars may hold secrets).
        return f"WorkerConfig(run_dir={self.run_dir!r}, validate={self.validate})"


@dataclass
class TrialResult:
    run_name: str
    storage_dir: str
    checkpoint_path: str | None
    metrics: dict[str, Any]


def run_name_for(spec: JobSpec, trial_key: str | None = None) -> str:
    """The Ray Train run name, which is also the run's directory under `resources.storage_path`:
    `<job name>[-<trial key>]-<spec hash>`. The hash covers exactly the fields that change what
    training computes (`stars.spec.spec_hash`), so a changed recipe starts fresh while a changed eval
    or logging setting resumes. Job names are slugs and trial keys are sanitised path components
    (`stars.spec.safe_path_component`), so the directory never leaves storage_path."""
    parts = [spec.name, trial_key, spec_hash(spec)[:10]]
    return "-".join(p for p in parts if p)


def run_dir_for(spec: JobSpec, trial_key: str | None = None) -> str:
    """The run's directory: `<resources.storage_path>/<run_name_for(...)>` (local path or URI)."""
    return os.path.join(spec.resources.storage_path, run_name_for(spec, trial_key))


def journal_dir(run_dir: str | None, run_id: str) -> str:
    """Where rank 0's metric journal lives (`stars.tracking.outbox`): next to the checkpoints,
    `<run dir>/tracking/`, when storage is a local or shared filesystem path; with storage at a URI
    (`s3://...`), on the worker's own disk under `~/.cache/stars/tracking/<run>/`."""
    if run_dir and is_local_path(run_dir):
        return os.path.join(run_dir, "tracking")
    name = os.path.basename((run_dir or run_id).rstrip("/"))
    return os.path.join(os.path.expanduser("~/.cache/stars/tracking"), name)


def scaling_config(spec: JobSpec) -> ScalingConfig:
    res = spec.resources
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker, **res.resources_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker if res.gpus_per_worker is not None else 1.0
    return ScalingConfig(
        num_workers=res.num_workers,
        use_gpu=res.use_gpu,
        accelerator_type=res.accelerator_type,
        resources_per_worker=per_worker,
        placement_strategy=res.placement_strategy,
    )


def train_worker(train_loop_config: dict[str, WorkerConfig]) -> None:
    """Runs on every Ray Train worker."""
    # Imported here, not at the top: Ray Train's controller and Tune's trainable unpickle this
    # function, which imports this module in their processes, and only the workers need the model
    # stack (torch models and transformers: ~2 s of CPU per process on a 2-core machine; MLflow,
    # another ~1 s, only on the rank that logs, below).
    from stars.train import TrainHooks, WorkerContext, train_loop

    config = train_loop_config["worker"]
    spec = JobSpec.model_validate(config.spec)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    worker = WorkerContext(rank=rank, world_size=world, device=ray.train.torch.get_device())

    console = lambda line: print(line, file=sys.__stdout__, flush=True)  # noqa: E731
    outbox = None
    if rank == 0 and config.run_id:
        from stars.tracking import MetricOutbox, Tracker, train_metric_names

        tracker = Tracker(config.tracking_uri, artifact_root=config.artifact_root)
        outbox = MetricOutbox(tracker, config.run_id, journal_dir(config.run_dir, config.run_id), console=console)

    def last_logged() -> int:
        """Steps up to here are in the journal (sent or on their way) or, from an attempt on another
        node, in MLflow: a restarted worker logs only later ones."""
        if outbox is None:
            return 0
        try:
            history = outbox.tracker.metric_history(outbox.run_id, "train/loss")
        except Exception:  # noqa: BLE001 - MLflow down: the journal alone decides
            history = []
        return max([outbox.last_step(), *(s for s, _ in history)])

    eval_tasks = list(spec.eval.tasks or []) if config.validate and config.run_dir and rank == 0 else []
    live = TrainMetrics(spec.name, ctx.get_experiment_name()) if rank == 0 else None

    def report(metrics: dict[str, float], ckpt_dir: str | None) -> None:
        name = step_dir_name(metrics["step"])
        if eval_tasks:  # scored beside training: these trail the checkpoint being reported by one or more
            metrics = {**EvalLedger(config.run_dir).latest_summary(eval_tasks), **metrics}
        checkpoint = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        try:
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                             validation=config.validate and checkpoint is not None)
        except OSError as exc:  # copying it to storage failed (after Ray's retries): never committed
            if checkpoint is None:
                raise
            raise checkpoint_write_error(exc, name, config.run_dir or spec.resources.storage_path) from exc
        if ckpt_dir:  # now persisted in storage; the local copy is no longer needed
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    # Truncated backprop leaves the early steps' graph out; the exit gate is frozen unless the loss
    # uses it (`stars.train`), so it never needs this.
    unused = spec.stars.loop_sampling.kind == "poisson_lognormal"
    hooks = TrainHooks(
        prepare_model=lambda m: ray.train.torch.prepare_model(
            m, parallel_strategy_kwargs={"find_unused_parameters": unused}
        ),
        report=report,
        log_metrics=(lambda metrics, step: outbox.log(train_metric_names(metrics), step)) if outbox else None,
        publish_metrics=live.publish if live else None,
        last_logged_step=last_logged,
        # Ray Train V2 tees print() when a library wrapped sys.stdout (twice the lines); the raw stream
        # reaches the driver once.
        console=console,
    )
    scratch = tempfile.mkdtemp(prefix="stars-ckpt-")
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            train_loop(spec, worker, hooks, checkpoint_root=scratch)
        else:
            with checkpoint.as_directory() as resume_dir:
                train_loop(spec, worker, hooks, resume_dir=resume_dir, checkpoint_root=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if outbox is not None:
            outbox.close(spec.tracking.flush_timeout_s)


def run_trial(
    spec: JobSpec,
    *,
    run_id: str | None = None,
    trial_key: str | None = None,
    validation_config: Any = None,
    callbacks: Sequence[Any] = (),
) -> TrialResult:
    """Train one spec on Ray Train and wait for it. The spec must be resolved (absolute paths).
    `callbacks`: Ray Train callbacks (a sweep passes Tune's `TuneReportCallback`)."""
    name = run_name_for(spec, trial_key)
    os.environ.setdefault(TRAIN_STATE_TRACKING, "1")  # the run by name in Ray's state; "0" turns it off
    config = WorkerConfig(
        spec=spec.model_dump(mode="json"),
        run_id=run_id,
        tracking_uri=spec.tracking.uri,
        artifact_root=spec.tracking.artifact_location,
        validate=validation_config is not None,
        run_dir=run_dir_for(spec, trial_key),
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"worker": config},
        scaling_config=scaling_config(spec),
        torch_config=TorchConfig(backend="nccl" if spec.resources.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=spec.resources.storage_path,
            failure_config=FailureConfig(max_failures=spec.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            worker_runtime_env={"env_vars": dict(spec.resources.env_vars)} if spec.resources.env_vars else None,
            callbacks=list(callbacks) or None,
        ),
        validation_config=validation_config,
    )
    result = trainer.fit()
    ckpt = result.checkpoint
    return TrialResult(
        run_name=name,
        storage_dir=config.run_dir,
        checkpoint_path=ckpt.path if ckpt is not None else None,
        metrics=dict(result.metrics or {}),
    )
