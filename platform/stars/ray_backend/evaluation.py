"""Evaluation on Ray: named `Evaluator` actors score every committed checkpoint while training runs.

How a checkpoint reaches the evaluators: Ray Train V2's checkpoint validation hook.
`train_worker` reports every checkpoint with `validation=True`; the trainer's `ValidationConfig`
runs `validate_checkpoint` (a zero-CPU dispatcher task) on each committed checkpoint, which fans the
checkpoint's tasks out over the job's `Evaluator` actors and returns when all are scored. We use
this hook rather than a queue of our own because Ray 2.60's checkpoint manager then guarantees the
two properties that matter (see `ray/train/v2/_internal/execution/checkpoint/`):

- pruning (`CheckpointConfig(num_to_keep)`) never deletes a checkpoint whose validation is pending;
  the pending list is part of the run's `checkpoint_manager_snapshot.json`, so a restarted run
  re-queues the checkpoints it had not finished validating;
- `trainer.fit()` returns only after every pending validation finished (`before_controller_shutdown`).

Ray runs one validation at a time (MAX_IN_FLIGHT_VALIDATIONS = 1), so `eval.workers` actors
parallelise over the tasks of a checkpoint, not over checkpoints.

Fault tolerance: actors restart without limit (`max_restarts=-1`) and Ray retries the call that was
running when one died (`max_task_retries`); the dispatcher retries a few more times itself. Every
(checkpoint, task) that is done has `<run dir>/eval/step_N/<task>.done.json` (`EvalLedger` in
`stars.ray_backend.ledger`), written after MLflow holds its results, so a retried or restarted
evaluation scores only what is missing and never logs a depth curve twice. After `fit()` the driver
sweeps the run's committed checkpoints once more (`EvaluationService.finish_trial`) and scores
anything still missing (the final checkpoint when `eval.every_checkpoint` is false; a validation
that failed).

What crosses into the dispatcher task and the actors is typed: an `EvalContext` per trial (the
validation function's keyword arguments, in their JSON form as Ray Train asks) and an `EvalUnit` per
(checkpoint, task); Ray pickles both.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.train import Checkpoint, ValidationConfig, ValidationTaskConfig

from stars.checkpoint import LoadedCheckpoint, load_checkpoint, step_of
from stars.evaluation import DROP_DEPTHS, evaluate_task, write_task_artifacts
from stars.ray_backend.ledger import EvalLedger, committed_checkpoints
from stars.spec import EvalSpec, JobSpec

if TYPE_CHECKING:
    from stars.tracking import Tracker

ACTOR_PREFIX = "stars-eval"
ACTOR_TASK_RETRIES = 2  # Ray re-runs the call that was running when its actor died
DISPATCH_ATTEMPTS = 3  # and the dispatcher tries a unit this many times on top of that


def actor_names(job_name: str, workers: int) -> list[str]:
    """Names of the job's evaluation actors: `stars-eval-<job name>-<i>`."""
    return [f"{ACTOR_PREFIX}-{job_name}-{i}" for i in range(workers)]


def _console(line: str) -> None:
    print(line, file=sys.__stdout__, flush=True)


def _scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="stars-eval-")


@dataclass(frozen=True)
class EvalContext:
    """How one trial's checkpoints are evaluated: what the dispatcher (`score_checkpoint`) needs."""

    run_dir: str  # the Ray Train run directory (local path or storage URI)
    eval: EvalSpec  # the trial's (resolved) `eval` section
    actors: tuple[str, ...]  # names of the job's Evaluator actors
    namespace: str | None  # their Ray namespace
    trial_run_id: str | None = None  # MLflow trial run; None: nothing is logged to MLflow
    tracking_uri: str | None = None
    artifact_root: str | None = None
    benchmark_paths: Mapping[str, str] = field(default_factory=dict)  # math benchmark -> local copy
    actor_offset: int = 0
    """Task j of a checkpoint goes to actor (actor_offset + j) % len(actors). A sweep gives each trial
    its own offset (its index), so concurrent trials start on different evaluators instead of all
    queueing on the first one."""

    def to_json(self) -> dict[str, Any]:
        """The JSON form Ray Train's `ValidationTaskConfig.fn_kwargs` asks for."""
        return {
            "run_dir": self.run_dir, "eval": self.eval.model_dump(mode="json"), "actors": list(self.actors),
            "namespace": self.namespace, "trial_run_id": self.trial_run_id, "tracking_uri": self.tracking_uri,
            "artifact_root": self.artifact_root, "benchmark_paths": dict(self.benchmark_paths),
            "actor_offset": self.actor_offset,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalContext:
        return cls(**{**data, "eval": EvalSpec.model_validate(data["eval"]), "actors": tuple(data["actors"])})

    def tracker(self) -> Tracker:
        from stars.tracking import Tracker

        return Tracker(self.tracking_uri, artifact_root=self.artifact_root)


@dataclass(frozen=True)
class EvalUnit:
    """One task of one checkpoint, as an Evaluator scores it."""

    context: EvalContext
    step: int
    task: str
    primary: bool  # the first task of `eval.tasks`: the loop's dynamics and rho are measured on it
    eval_run_id: str | None  # the checkpoint's `eval@step=N` MLflow run (None: no MLflow)


@ray.remote
class Evaluator:
    """Scores (checkpoint, task) units. Keeps the last checkpoint loaded, so the tasks of one
    checkpoint sent to the same actor load it once. Stateless otherwise: after a restart it simply
    loads again."""

    def __init__(self, name: str, threads: int) -> None:
        import torch

        import stars.model  # noqa: F401 - import now, while training starts, not at the first checkpoint
        import stars.tracking  # noqa: F401

        torch.set_num_threads(max(1, threads))
        self.name = name
        self._key: str | None = None
        self._loaded: LoadedCheckpoint | None = None
        self._download: str | None = None

    def pid(self) -> int:
        return os.getpid()

    def _load(self, checkpoint: Checkpoint) -> LoadedCheckpoint:
        import pyarrow.fs as pafs

        key = f"{checkpoint.filesystem.type_name}:{checkpoint.path}"
        if self._key != key or self._loaded is None:
            self._loaded = None
            if self._download is not None:  # the previous remote checkpoint's local copy
                shutil.rmtree(self._download, ignore_errors=True)
                self._download = None
            if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
                local = checkpoint.path
            else:  # remote storage: download once into a per-actor directory
                self._download = _scratch_dir()
                local = os.path.join(self._download, os.path.basename(checkpoint.path))
                checkpoint.to_directory(local)
            self._loaded = load_checkpoint(local)
            self._loaded.step = step_of(checkpoint.path)
            self._key = key
        return self._loaded

    def score(self, checkpoint: Checkpoint, unit: EvalUnit) -> dict[str, Any]:
        """Score one task of one checkpoint, log it to MLflow, mark it done; return the done record."""
        ctx, step, task = unit.context, unit.step, unit.task
        ledger = EvalLedger(ctx.run_dir)
        record = ledger.done(step, task)
        if record is not None:  # a retried call whose first attempt got as far as the marker
            return record
        started = time.time()
        ledger.mark_running(step, task, {"pid": os.getpid(), "host": socket.gethostname(),
                                         "actor": self.name, "started": started})
        ev = ctx.eval
        loaded = self._load(checkpoint)
        result = evaluate_task(
            loaded, task, ev.depths, rho_depths=ev.rho_depths if unit.primary else (),
            rho_iters=ev.rho_iters, limit=ev.limit, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
            benchmark_path=ctx.benchmark_paths.get(task), console=_console,
        )
        scratch = _scratch_dir()
        try:
            files = write_task_artifacts(result, scratch, step)
            if unit.eval_run_id:
                from stars.tracking import log_task_eval

                log_task_eval(ctx.tracker(), unit.eval_run_id, ctx.trial_run_id, step=step,
                              curves=result.curves(with_dynamics=unit.primary), summary=result.summary,
                              files=files, artifact_dir=task)
            ledger.put_files(step, files)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        record = {**result.to_json(), "step": step, "checkpoint": checkpoint.path,
                  "eval_run_id": unit.eval_run_id, "trial_run_id": ctx.trial_run_id,
                  "actor": self.name, "pid": os.getpid(), "started": started, "finished": time.time()}
        ledger.mark_done(step, task, record)
        return record


def _actor(name: str, namespace: str | None) -> Any:
    return ray.get_actor(name, namespace=namespace)


def score_checkpoint(checkpoint: Checkpoint, ctx: EvalContext) -> dict[str, float]:
    """Score every task of `checkpoint` that the ledger does not list as done, spread over the
    job's Evaluator actors; open/close the checkpoint's `eval@step=N` MLflow run. Returns the
    summary metrics of all its tasks. Raises when a unit still fails after its retries."""
    tasks = list(ctx.eval.tasks or [])
    step = step_of(checkpoint.path)
    if step is None:
        raise ValueError(f"checkpoint {checkpoint.path!r} is not a step_NNNNNNN directory")
    ledger = EvalLedger(ctx.run_dir)
    todo = ledger.missing(step, tasks)
    tracker, eval_run = None, None
    if todo and ctx.trial_run_id:
        tracker = ctx.tracker()
        eval_run = tracker.start_eval(ctx.trial_run_id, step)
        tracker.set_tags(eval_run, {"stars.checkpoint": checkpoint.path, "stars.eval.tasks": ",".join(tasks)})
    units = {task: EvalUnit(ctx, step, task, primary=task == tasks[0], eval_run_id=eval_run) for task in todo}
    actor_of = {task: ctx.actors[(ctx.actor_offset + j) % len(ctx.actors)] for j, task in enumerate(todo)}
    refs = {t: _actor(actor_of[t], ctx.namespace).score.remote(checkpoint, u) for t, u in units.items()}
    failures = []
    for task, unit in units.items():
        for attempt in range(1, DISPATCH_ATTEMPTS + 1):
            try:
                ray.get(refs[task])
                break
            except ray.exceptions.RayActorError as exc:  # died (and Ray's own retries ran out)
                if attempt == DISPATCH_ATTEMPTS:
                    failures.append(f"{task}: evaluator died {attempt} times ({type(exc).__name__})")
                    break
                time.sleep(1.0)
                refs[task] = _actor(actor_of[task], ctx.namespace).score.remote(checkpoint, unit)
            except ray.exceptions.RayTaskError as exc:
                failures.append(f"{task}: {exc.cause!r}" if getattr(exc, "cause", None) else f"{task}: {exc}")
                break
    if tracker is not None and eval_run is not None:
        tracker.end(eval_run, "FAILED" if failures else "FINISHED")
    if failures:
        raise RuntimeError(f"evaluation of {checkpoint.path} failed: " + "; ".join(failures))
    summary: dict[str, float] = {}
    for task in tasks:
        record = ledger.done(step, task) or {}
        summary.update(record.get("summary", {}))
    _console(f"[stars] eval step {step}: " + "; ".join(_summary_line(t, summary) for t in tasks))
    return summary


def _summary_line(task: str, s: dict[str, float]) -> str:
    if f"{task}/peak_acc" not in s:
        return f"{task} -"
    parts = [f"{task} peak {s[f'{task}/peak_acc']:.3f}@{int(s[f'{task}/best_depth'])}"]
    for d in DROP_DEPTHS:
        if f"{task}/acc_at_{d}" in s:
            parts.append(f"acc@{d} {s[f'{task}/acc_at_{d}']:.3f} (drop {100 * s[f'{task}/drop_at_{d}']:.1f}%)")
    return " ".join(parts)


def validate_checkpoint(checkpoint: Checkpoint, **context: Any) -> dict[str, float]:
    """Ray Train's validation function: runs for every checkpoint reported with `validation=True`
    (`context` is `EvalContext.to_json()`); while it runs Ray keeps the checkpoint from being pruned."""
    return score_checkpoint(checkpoint, EvalContext.from_json(context))


class EvaluationService:
    """The driver's handle on a job's evaluation: creates the named Evaluator actors (own resources
    from `eval.resources`, apart from the training workers), hands Ray Train the validation config
    of each trial, sweeps for anything missing after a trial, and stops the actors."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        benchmark_paths: dict[str, str] | None = None,
        console: Callable[[str], None] = _console,
    ) -> None:
        self.spec = spec
        self.names = actor_names(spec.name, spec.eval.workers)
        self.benchmark_paths = dict(spec.eval.benchmark_paths if benchmark_paths is None else benchmark_paths)
        self.console = console
        self.namespace: str | None = None
        self.actors: list[Any] = []

    @staticmethod
    def wanted(spec: JobSpec) -> bool:
        return bool(spec.eval.tasks)

    def start(self) -> EvaluationService:
        res = self.spec.eval.resources
        self.namespace = ray.get_runtime_context().namespace
        options: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus, "max_restarts": -1,
                                   "max_task_retries": ACTOR_TASK_RETRIES, "namespace": self.namespace,
                                   "get_if_exists": True}
        if res.accelerator_type:
            options["accelerator_type"] = res.accelerator_type
        if res.custom:
            options["resources"] = dict(res.custom)
        self.actors = [Evaluator.options(name=n, **options).remote(n, int(res.cpus)) for n in self.names]
        self._warn_if_cluster_too_small()
        return self

    def _warn_if_cluster_too_small(self) -> None:
        """Evaluators hold their resources for the whole job. When training and evaluation together
        need more than the cluster has, an evaluator waits for resources that never free up and
        `fit()` waits for its validations: say so now rather than hang silently."""
        spec, total = self.spec, ray.cluster_resources()
        train = spec.resources
        need = {"CPU": train.num_workers * train.cpus_per_worker + spec.eval.workers * spec.eval.resources.cpus,
                "GPU": train.num_workers * (train.gpus_per_worker or 0) + spec.eval.workers * spec.eval.resources.gpus}
        for kind, amount in need.items():
            if amount > total.get(kind, 0.0) + 1e-9:
                self.console(
                    f"[stars] warning: training ({train.num_workers} workers) and evaluation ({spec.eval.workers} "
                    f"actors) need {amount:g} {kind} together but the cluster has {total.get(kind, 0.0):g}; the "
                    "evaluators may wait for resources (autoscaling) and the job cannot finish before they run. "
                    "Lower eval.workers / eval.resources or the training resources."
                )

    def context(
        self, trial_spec: JobSpec, trial_run_id: str | None, run_dir: str, actor_offset: int = 0
    ) -> EvalContext:
        """How the checkpoints of one trial are evaluated."""
        return EvalContext(
            run_dir=run_dir, eval=trial_spec.eval, actors=tuple(self.names), namespace=self.namespace,
            trial_run_id=trial_run_id, tracking_uri=trial_spec.tracking.uri if trial_run_id else None,
            artifact_root=trial_spec.tracking.artifact_location, benchmark_paths=dict(self.benchmark_paths),
            actor_offset=actor_offset,
        )

    def validation_config(
        self, trial_spec: JobSpec, trial_run_id: str | None, run_dir: str, actor_offset: int = 0
    ) -> ValidationConfig | None:
        """Ray Train `ValidationConfig` scoring every checkpoint as it is committed, or None when
        only the final checkpoint is evaluated (`eval.every_checkpoint: false`)."""
        if not (trial_spec.eval.tasks and trial_spec.eval.every_checkpoint):
            return None
        context = self.context(trial_spec, trial_run_id, run_dir, actor_offset)
        return ValidationConfig(
            fn=validate_checkpoint,
            task_config=ValidationTaskConfig(fn_kwargs=context.to_json()),
            ray_remote_kwargs={"num_cpus": 0, "max_retries": 2},
        )

    def finish_trial(
        self, trial_spec: JobSpec, trial_run_id: str | None, run_dir: str, final_checkpoint: str | None,
        actor_offset: int = 0,
    ) -> dict[int, dict[str, float]]:
        """After `fit()`: score every committed checkpoint of the run that is still missing a task
        (only the final one with `eval.every_checkpoint: false`). Returns {step: summary}."""
        if not trial_spec.eval.tasks:
            return {}
        if trial_spec.eval.every_checkpoint:
            names = committed_checkpoints(run_dir)
        else:
            names = [os.path.basename(final_checkpoint.rstrip("/"))] if final_checkpoint else []
        ctx = self.context(trial_spec, trial_run_id, run_dir, actor_offset)
        ledger = EvalLedger(run_dir)
        out: dict[int, dict[str, float]] = {}
        errors = []
        for name in names:
            step = step_of(name)
            if step is None:
                continue
            if ledger.missing(step, trial_spec.eval.tasks):
                self.console(f"[stars] scoring {name} (not scored during training)")
                try:
                    out[step] = score_checkpoint(Checkpoint(f"{run_dir.rstrip('/')}/{name}"), ctx)
                except RuntimeError as exc:
                    errors.append(str(exc))
            else:
                out[step] = {k: v for t in trial_spec.eval.tasks for k, v in (ledger.done(step, t) or {}).get(
                    "summary", {}).items()}
        if errors:
            raise RuntimeError("; ".join(errors))
        return out

    def stop(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
