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

Scoring ahead. Ray runs one validation at a time (MAX_IN_FLIGHT_VALIDATIONS = 1), in report order.
When scoring a checkpoint takes longer than training to the next one, the evaluators its tasks leave
free would idle while a backlog builds, so the dispatcher of checkpoint N (`Dispatcher`) also scores
later checkpoints: it hands N's missing units out first, then gives every evaluator that has no unit
of this trial in flight a unit of a later committed checkpoint (oldest first) without waiting for it,
and does so again whenever an evaluator frees up or a checkpoint is committed while it waits for N's
own units (every `POLL_SECONDS`). It waits only for N's units. A later checkpoint is safe to score
ahead: Ray validates in report order, so its validation has not run yet, and Ray keeps it from
pruning until that validation returns, which is only once its units are done (below).

Exactly once. Before a unit is handed to an actor the ledger gets a queued marker naming the actor
(`EvalLedger.mark_queued`). A dispatcher sends a unit that is queued and not done to that same
actor: the call queues behind the first one (an actor runs one call at a time) and, since
`Evaluator.score` returns the done record when there is one, comes back with it. So a checkpoint's
validation skips its done units, waits on the actor for those an earlier validation handed out, and
scores nothing twice nor logs a depth curve twice; an ahead call that was lost (its actor died after
its dispatcher returned) is scored by that validation's own call. The checkpoint's MLflow run
`eval@step=N` is opened by whichever dispatcher first hands out a unit of N, which records its id in
the ledger (`eval_run.json`); later dispatchers log into that run, and the dispatcher of N itself
(the validation, or the sweep after fit) closes it once all of N's tasks are done.

Backlog. At the end of each validation the dispatcher prints `[stars] eval backlog: K checkpoints
waiting (steps ...), M units in flight` and logs `eval/backlog` (committed checkpoints not fully
scored) on the trial run at the checkpoint's training step; the validation returns it among its
metrics, and the trial's first evaluator publishes it as the live metric `stars_eval_backlog`
(`stars.ray_backend.metrics`, beside each evaluator's units scored and seconds per unit). Validation
and scoring tasks are named after the trial's Ray Train run (`validate <run>`, `score <run> step_N
<task>`) in the dashboard's task table and log prefixes. Evaluators count as idle from the trial's own ledger: the trials of a sweep share them, so
a trial's unit scored ahead may queue behind another trial's work (nothing is lost, only waits).

Fault tolerance: actors restart without limit (`max_restarts=-1`) and Ray retries the call that was
running when one died (`max_task_retries`); the dispatcher retries its own units a few more times
itself, and forgets where a failed unit was queued so the next dispatcher picks an actor afresh. Every
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
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.train import Checkpoint, ValidationConfig, ValidationTaskConfig

from stars.checkpoint import LoadedCheckpoint, load_checkpoint, step_dir_name, step_of
from stars.evaluation import DROP_DEPTHS, evaluate_task, write_task_artifacts
from stars.ray_backend.ledger import EvalLedger, committed_checkpoints
from stars.ray_backend.metrics import EvalMetrics
from stars.spec import EvalSpec, JobSpec

if TYPE_CHECKING:
    from stars.tracking import Tracker

ACTOR_PREFIX = "stars-eval"
ACTOR_TASK_RETRIES = 2  # Ray re-runs the call that was running when its actor died
DISPATCH_ATTEMPTS = 3  # and the dispatcher tries a unit this many times on top of that
POLL_SECONDS = 2.0  # how often a waiting dispatcher looks for idle evaluators and new checkpoints
BACKLOG_METRIC = "eval/backlog"  # on the trial run: committed checkpoints not fully scored


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
    """Where the trial's actor rotation starts: a unit goes to the least loaded actor, ties broken in
    the order actor_offset, actor_offset + 1, ... (mod len(actors)), so with nothing in flight task j
    of a checkpoint goes to actor (actor_offset + j) % len(actors). A sweep gives each trial its own
    offset (its index), so concurrent trials start on different evaluators instead of all queueing on
    the first one."""

    def to_json(self) -> dict[str, Any]:
        """The JSON form Ray Train's `ValidationTaskConfig.fn_kwargs` asks for."""
        return {
            "run_dir": self.run_dir, "eval": self.eval.model_dump(mode="json"), "actors": list(self.actors),
            "namespace": self.namespace, "trial_run_id": self.trial_run_id, "tracking_uri": self.tracking_uri,
            "artifact_root": self.artifact_root, "benchmark_paths": dict(self.benchmark_paths),
            "actor_offset": self.actor_offset,
        }

    @property
    def trial(self) -> str:
        """The trial's Ray Train run name (its run directory's name): the `trial` tag of its metrics."""
        return os.path.basename(self.run_dir.rstrip("/"))

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


@ray.remote(concurrency_groups={"metrics": 1})
class Evaluator:
    """Scores (checkpoint, task) units. Keeps the last checkpoint loaded, so the tasks of one
    checkpoint sent to the same actor load it once. Stateless otherwise: after a restart it simply
    loads again. Publishes the job's evaluation metrics (`stars.ray_backend.metrics.EvalMetrics`);
    `publish_backlog` runs in a concurrency group of its own, so it never waits behind a `score`
    (which still run one at a time)."""

    def __init__(self, name: str, threads: int, job: str) -> None:
        import torch

        import stars.model  # noqa: F401 - import now, while training starts, not at the first checkpoint
        import stars.tracking  # noqa: F401

        torch.set_num_threads(max(1, threads))
        self.name = name
        self.metrics = EvalMetrics(job, name)
        self._key: str | None = None
        self._loaded: LoadedCheckpoint | None = None
        self._download: str | None = None

    def __repr__(self) -> str:  # the dashboard's Repr column and the prefix of this actor's log lines
        return getattr(self, "name", "Evaluator")

    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="metrics")
    def publish_backlog(self, trial: str, waiting: int) -> None:
        self.metrics.set_backlog(trial, waiting)

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
        attempt = int((ledger.running(step, task) or {}).get("attempt", 0)) + 1  # retries and restarts count
        ledger.mark_running(step, task, {"pid": os.getpid(), "host": socket.gethostname(),
                                         "actor": self.name, "started": started, "attempt": attempt})
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
        # claims of this unit so far: another claim made while this one ran (there should be none) counts too
        attempts = max(attempt, int((ledger.running(step, task) or {}).get("attempt", 0)))
        record = {**result.to_json(), "step": step, "checkpoint": checkpoint.path,
                  "eval_run_id": unit.eval_run_id, "trial_run_id": ctx.trial_run_id,
                  "actor": self.name, "pid": os.getpid(), "started": started, "finished": time.time(),
                  "attempts": attempts}
        ledger.mark_done(step, task, record)
        self.metrics.unit_scored(ctx.trial, task, record["finished"] - started)
        return record


def _actor(name: str, namespace: str | None) -> Any:
    return ray.get_actor(name, namespace=namespace)


@dataclass
class _Handed:
    """A unit a dispatcher handed to an actor, with the call in flight."""

    unit: EvalUnit
    checkpoint: Checkpoint
    actor: str
    ref: Any  # ray.ObjectRef of the `Evaluator.score` call
    calls: int = 1


@dataclass(frozen=True)
class Backlog:
    """A trial's committed checkpoints not fully scored yet, and its units handed to evaluators."""

    waiting: tuple[int, ...]  # their steps
    in_flight: int

    def line(self) -> str:
        steps = f" (steps {', '.join(map(str, self.waiting))})" if self.waiting else ""
        return f"[stars] eval backlog: {len(self.waiting)} checkpoints waiting{steps}, {self.in_flight} units in flight"


class Dispatcher:
    """Hands one trial's (checkpoint, task) units to the job's Evaluator actors: a checkpoint's own
    units, and units of later checkpoints to evaluators that are idle (module docstring). Every
    hand-off is recorded in the ledger before the call, and a unit already queued goes to the actor
    it was queued on, so it is scored once whoever dispatches it."""

    def __init__(self, ctx: EvalContext) -> None:
        self.ctx = ctx
        self.tasks = list(ctx.eval.tasks or [])
        self.ledger = EvalLedger(ctx.run_dir)
        n = len(ctx.actors)
        # actor_offset first: the trials of a sweep start on different evaluators
        self.rotation = [ctx.actors[(ctx.actor_offset + i) % n] for i in range(n)]
        self._tracker: Tracker | None = None
        self._eval_runs: dict[int, str] = {}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = self.ctx.tracker()
        return self._tracker

    # -- what the run's storage says --------------------------------------------------------------
    def committed(self) -> dict[int, Checkpoint] | None:
        """The run's committed checkpoints by step; None when Ray's run snapshot cannot be read now."""
        try:
            names = committed_checkpoints(self.ctx.run_dir)
        except Exception as exc:  # noqa: BLE001 - ledger retried already; scoring ahead can wait for the next poll
            _console(f"[stars] eval: cannot read the committed checkpoints of {self.ctx.run_dir} now ({exc!r})")
            return None
        root = self.ctx.run_dir.rstrip("/")
        return {step: Checkpoint(f"{root}/{name}") for name in names if (step := step_of(name)) is not None}

    def in_flight(self, steps: Iterable[int]) -> dict[tuple[int, str], str]:
        """Units of `steps` handed to one of this job's actors and not scored yet: (step, task) -> actor.
        A unit queued on an actor the job no longer has (fewer `eval.workers` since) is not in flight."""
        records = self.ledger.in_flight(steps, self.tasks)
        return {unit: r["actor"] for unit, r in records.items() if r.get("actor") in self.ctx.actors}

    @staticmethod
    def _pending_from(step: int, committed: Mapping[int, Checkpoint]) -> set[int]:
        """The steps whose units can be in flight while the checkpoint at `step` is validated: itself
        and the later ones. An earlier checkpoint's validation returned only once its units were
        done or failed (a failed unit's queued marker is cleared), so evaluators are free of them;
        leaving those steps out also keeps each poll's reads few when many checkpoints are kept."""
        return {step, *(s for s in committed if s > step)}

    def backlog(self) -> Backlog | None:
        committed = self.committed()
        if committed is None:
            return None
        waiting = tuple(s for s in sorted(committed) if self.ledger.missing(s, self.tasks))
        return Backlog(waiting, len(self.in_flight(committed)))

    # -- the checkpoint's MLflow eval run ---------------------------------------------------------
    def eval_run(self, step: int, checkpoint: Checkpoint) -> str | None:
        """The `eval@step=N` run units of `step` log into: the open one the ledger names, else opened
        now (`start_eval` finds the step's run again by its key, so a closed one is reopened, not
        duplicated) and recorded in the ledger. None without MLflow."""
        if not self.ctx.trial_run_id:
            return None
        if step in self._eval_runs:
            return self._eval_runs[step]
        record = self.ledger.eval_run(step)
        if record and record.get("trial_run_id") == self.ctx.trial_run_id and record.get("status") == "RUNNING":
            run = str(record["run_id"])
        else:
            run = self.tracker.start_eval(self.ctx.trial_run_id, step)
            self.tracker.set_tags(run, {"stars.checkpoint": checkpoint.path, "stars.eval.tasks": ",".join(self.tasks)})
            self.ledger.mark_eval_run(step, {"run_id": run, "trial_run_id": self.ctx.trial_run_id,
                                             "status": "RUNNING", "opened": time.time()})
        self._eval_runs[step] = run
        return run

    def close_eval_run(self, step: int, status: str) -> None:
        """End the step's eval run when this trial opened it and it is still open."""
        record = self.ledger.eval_run(step)
        if not (self.ctx.trial_run_id and record and record.get("trial_run_id") == self.ctx.trial_run_id
                and record.get("status") == "RUNNING"):
            return
        self.tracker.end(record["run_id"], status)
        self.ledger.mark_eval_run(step, {**record, "status": status, "closed": time.time()})
        self._eval_runs.pop(step, None)

    # -- handing units out ------------------------------------------------------------------------
    def send(self, checkpoint: Checkpoint, step: int, task: str, actor: str, *, for_step: int) -> _Handed:
        """Record (step, task) as queued on `actor`, then call it; the call is not waited for here.
        `for_step`: the checkpoint whose dispatcher this is (`step` itself, or an earlier one scoring ahead)."""
        unit = EvalUnit(self.ctx, step, task, primary=task == self.tasks[0],
                        eval_run_id=self.eval_run(step, checkpoint))
        self.ledger.mark_queued(step, task, {"actor": actor, "queued": time.time(), "by_step": for_step,
                                             "pid": os.getpid(), "host": socket.gethostname()})
        return _Handed(unit, checkpoint, actor, self._call(actor, checkpoint, unit))

    def resend(self, handed: _Handed) -> None:
        """Call the same actor again (it died and Ray's own retries ran out; it restarts)."""
        handed.ref = self._call(handed.actor, handed.checkpoint, handed.unit)
        handed.calls += 1

    def _call(self, actor: str, checkpoint: Checkpoint, unit: EvalUnit) -> Any:
        name = f"score {unit.context.trial} {step_dir_name(unit.step)} {unit.task}"  # in the dashboard's task table
        return _actor(actor, self.ctx.namespace).score.options(name=name).remote(checkpoint, unit)

    def send_own(self, checkpoint: Checkpoint, step: int, tasks: Sequence[str]) -> dict[str, _Handed]:
        """Hand out the missing `tasks` of the checkpoint at `step`: each one queued already to its
        actor, the others to the least loaded evaluators (ties in rotation order)."""
        queued = self.in_flight(self._pending_from(step, self.committed() or {}))
        load = Counter(queued.values())
        handed = {}
        for task in tasks:
            actor = queued.get((step, task))
            if actor is None:
                actor = min(self.rotation, key=lambda a: load[a])
                load[actor] += 1
            handed[task] = self.send(checkpoint, step, task, actor, for_step=step)
        return handed

    def send_ahead(self, after: int, ahead: dict[Any, _Handed]) -> None:
        """Give each evaluator without a unit of this trial in flight one missing, unqueued unit of a
        committed checkpoint later than `after` (oldest first); the calls are added to `ahead`."""
        committed = self.committed()
        if not committed:
            return
        queued = self.in_flight(self._pending_from(after, committed))
        busy = set(queued.values())
        idle = [a for a in self.rotation if a not in busy]
        for step in sorted(s for s in committed if s > after):
            if not idle:
                return
            for task in self.ledger.missing(step, self.tasks):
                if idle and (step, task) not in queued:
                    handed = self.send(committed[step], step, task, idle.pop(0), for_step=after)
                    ahead[handed.ref] = handed

    def _ahead_finished(self, handed: _Handed) -> None:
        unit = handed.unit
        try:
            ray.get(handed.ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            self.ledger.clear_queued(unit.step, unit.task)
            _console(f"[stars] eval of {unit.task} at step {unit.step} (ahead of its validation) failed on "
                     f"{handed.actor}: {type(exc).__name__}; its validation scores it")

    def _send_ahead_safely(self, after: int, ahead: dict[Any, _Handed]) -> None:
        try:
            self.send_ahead(after, ahead)
        except Exception as exc:  # noqa: BLE001 - scoring ahead only saves time; its validation scores the unit
            _console(f"[stars] eval: scoring ahead of step {after} failed ({exc!r}); checkpoints wait for their validation")

    # -- one checkpoint ---------------------------------------------------------------------------
    def wait(self, step: int, own: dict[str, _Handed]) -> list[str]:
        """Wait for `own` (units of the checkpoint at `step`), calling an actor again when it died;
        meanwhile keep idle evaluators busy with later checkpoints. Returns the failures."""
        pending = dict(own)
        ahead: dict[Any, _Handed] = {}
        failures: list[str] = []
        self._send_ahead_safely(step, ahead)
        while pending:
            task_of = {h.ref: task for task, h in pending.items()}
            ready, _ = ray.wait([*task_of, *ahead], num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                if ref in ahead:
                    self._ahead_finished(ahead.pop(ref))
                    continue
                task = task_of[ref]
                handed = pending[task]
                try:
                    ray.get(ref)
                    del pending[task]
                except ray.exceptions.RayActorError as exc:  # died (and Ray's own retries ran out)
                    if handed.calls < DISPATCH_ATTEMPTS:
                        time.sleep(1.0)
                        self.resend(handed)
                        continue
                    failures.append(f"{task}: evaluator died {handed.calls} times ({type(exc).__name__})")
                    self.ledger.clear_queued(step, task)
                    del pending[task]
                except ray.exceptions.RayTaskError as exc:
                    failures.append(f"{task}: {exc.cause!r}" if getattr(exc, "cause", None) else f"{task}: {exc}")
                    self.ledger.clear_queued(step, task)
                    del pending[task]
            self._send_ahead_safely(step, ahead)
        return failures

    def score(self, checkpoint: Checkpoint) -> dict[str, float]:
        """Score the checkpoint's missing tasks (what `score_checkpoint` does); returns its summary."""
        step = step_of(checkpoint.path)
        if step is None:
            raise ValueError(f"checkpoint {checkpoint.path!r} is not a step_NNNNNNN directory")
        todo = self.ledger.missing(step, self.tasks)
        failures = self.wait(step, self.send_own(checkpoint, step, todo) if todo else {})
        self.close_eval_run(step, "FAILED" if failures else "FINISHED")
        if failures:
            raise RuntimeError(f"evaluation of {checkpoint.path} failed: " + "; ".join(failures))
        summary: dict[str, float] = {}
        for task in self.tasks:
            record = self.ledger.done(step, task) or {}
            summary.update(record.get("summary", {}))
        _console(f"[stars] eval step {step}: " + "; ".join(_summary_line(t, summary) for t in self.tasks))
        return summary

    def report_backlog(self, step: int) -> int | None:
        """Print the backlog and log `eval/backlog` on the trial run at `step` (once); None when the
        run's committed checkpoints cannot be read now."""
        backlog = self.backlog()
        if backlog is None:
            return None
        _console(backlog.line())
        try:  # set by one long-lived actor per trial (`stars.ray_backend.metrics`); not waited for
            _actor(self.rotation[0], self.ctx.namespace).publish_backlog.remote(self.ctx.trial, len(backlog.waiting))
        except Exception as exc:  # noqa: BLE001 - a metric is never worth failing a validation for
            _console(f"[stars] eval: cannot publish the backlog metric ({exc!r})")
        if self.ctx.trial_run_id:
            trial = self.ctx.trial_run_id
            if step not in {s for s, _ in self.tracker.metric_history(trial, BACKLOG_METRIC)}:  # a retried validation
                self.tracker.log_metrics(trial, {BACKLOG_METRIC: len(backlog.waiting)}, step)
        return len(backlog.waiting)


def score_checkpoint(checkpoint: Checkpoint, ctx: EvalContext) -> dict[str, float]:
    """Score every task of `checkpoint` that the ledger does not list as done, spread over the
    job's Evaluator actors (scoring later checkpoints ahead on idle ones); open/close the
    checkpoint's `eval@step=N` MLflow run. Returns the summary metrics of all its tasks. Raises when
    a unit still fails after its retries."""
    return Dispatcher(ctx).score(checkpoint)


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
    (`context` is `EvalContext.to_json()`); while it runs Ray keeps the checkpoint from being pruned.
    Returns the checkpoint's summary metrics and `eval/backlog`."""
    dispatcher = Dispatcher(EvalContext.from_json(context))
    summary = dispatcher.score(checkpoint)
    backlog = dispatcher.report_backlog(step_of(checkpoint.path) or 0)
    return summary if backlog is None else {**summary, BACKLOG_METRIC: float(backlog)}


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
        self.actors = [Evaluator.options(name=n, **options).remote(n, int(res.cpus), self.spec.name)
                       for n in self.names]
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
            # named after the trial in the dashboard's task table (Ray's default: run_validation_fn)
            ray_remote_kwargs={"num_cpus": 0, "max_retries": 2, "name": f"validate {context.trial}"},
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
