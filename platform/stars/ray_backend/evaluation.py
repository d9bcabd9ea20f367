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

Fault tolerance: actors restart without limit (`max_restarts=-1`) and Ray retries the calls an actor
had when it died (`max_task_retries`); the dispatcher calls a unit's actor again when Ray's retries ran
out, and forgets where a unit whose scoring raised was queued so the next dispatcher picks an actor
afresh. Every (checkpoint, task) that is done has `<run dir>/eval/step_N/<task>.done.json` (`EvalLedger`
in `stars.ray_backend.ledger`), written after MLflow holds its results, so a retried or restarted
evaluation scores only what is missing and never logs a depth curve twice. After `fit()` the driver
sweeps the run's committed checkpoints once more (`EvaluationService.finish_trial`) and scores
anything still missing (the final checkpoint when `eval.every_checkpoint` is false; a validation
that failed).

Hung evaluators. An evaluator stuck in a call (or frozen) would keep its validation, and so `fit()`,
waiting forever. Each attempt at a unit claims it in the ledger (`<task>.running.json`: actor, pid,
start time, attempt number, counted across retries and restarts), and every poll a waiting
dispatcher looks at the claims of this trial's units in flight (its own, those it scores ahead, and
those an earlier dispatcher handed out). When a claim is older than `eval.timeout_s`, the dispatcher
asks its evaluator what it runs (`Evaluator.running`, answered from the actor's metrics thread, so a
busy evaluator answers). If the evaluator says it runs that attempt, or does not answer within
`PROBE_SECONDS` (frozen), the attempt is recorded as killed (`<task>.killed.json`) and the actor
killed with `ray.kill(no_restart=False)`: Ray restarts it under the same name and re-runs the calls it
had (`max_task_retries`; the dispatcher calls again once those ran out), so the unit is tried again
and every handle and queued call of every trial stays valid. (Killing with no_restart and creating
the actor again instead would race the release of its name, and the calls other dispatchers had
queued on it would fail instead of moving to the new process.) An evaluator that answers with
something else holds a stale claim (the attempt died with an earlier process) and is left alone. When
the attempt that timed out, or whose evaluator died, was attempt `eval.max_attempts`, the unit is
given up (`give_up`, before the kill): `<task>.failed.json` holds the reason, so no dispatcher sends
it again and a call still queued returns at once; the checkpoint's eval run gets the reason in the tag
`stars.eval.failure` and ends FAILED; one line says so; the validation returns (the summaries of the
checkpoint's other tasks) and training goes on. No attempt past `eval.max_attempts` is started, not
even by Ray's retries. A failed unit stays failed in a resubmitted job; to score it again, delete its
`<task>.failed.json` and `<task>.running.json` (which counts the attempts).

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
ACTOR_TASK_RETRIES = 2  # Ray re-runs the calls an actor had when it died (or was killed), once it is back
DISPATCH_CALLS = 3  # a dispatcher calls a unit's actor again, up to this many calls (or eval.max_attempts)
POLL_SECONDS = 2.0  # how often a waiting dispatcher looks for idle evaluators, new checkpoints, hung units
PROBE_SECONDS = 3.0  # an evaluator past eval.timeout_s that does not say what it runs by then is frozen
BACKLOG_METRIC = "eval/backlog"  # on the trial run: committed checkpoints not fully scored
FAILURE_TAG = "stars.eval.failure"  # on an eval run: why units of its checkpoint were given up


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


def give_up(
    ctx: EvalContext, step: int, task: str, what: str, attempts: int, tracker: Tracker | None = None
) -> None:
    """Record (step, task) as failed: the ledger's failed marker (no dispatcher sends it again, a call
    still queued returns it at once), the reasons of the checkpoint's failed tasks in the tag
    `FAILURE_TAG` of its eval run (which ends FAILED when the checkpoint's validation closes it), and
    one line on the console. `what` happened to the last of `attempts` attempts."""
    ledger = EvalLedger(ctx.run_dir)
    reason = f"{task} at step {step}: {what} ({attempts} attempt{'s' if attempts != 1 else ''})"
    ledger.mark_failed(step, task, {"reason": reason, "attempts": attempts, "failed": time.time(),
                                    "trial_run_id": ctx.trial_run_id})
    ledger.clear_queued(step, task)
    _console(f"[stars] eval failed: {reason}; recorded as failed and not tried again")
    record = ledger.eval_run(step)
    if not (ctx.trial_run_id and record and record.get("trial_run_id") == ctx.trial_run_id):
        return
    reasons = [r["reason"] for r in ledger.failures(step, ctx.eval.tasks or []).values()]
    try:
        (tracker or ctx.tracker()).set_tags(str(record["run_id"]), {FAILURE_TAG: "; ".join(reasons)})
    except Exception as exc:  # noqa: BLE001 - the ledger holds the reason; a tag is not worth failing for
        _console(f"[stars] eval: cannot tag eval run {record['run_id']} with the failure ({exc!r})")


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
        self._running: dict[str, Any] | None = None  # the unit `score` works on now (`running`)
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

    @ray.method(concurrency_group="metrics", max_task_retries=0)
    def running(self) -> dict[str, Any] | None:
        """The unit `score` works on now (`run_dir`, `step`, `task`, `attempt`), None when idle. In the
        metrics group, so an evaluator busy scoring answers at once; a frozen one does not (`Dispatcher`
        asks before it kills an evaluator for a timeout)."""
        return self._running

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
        """Score one task of one checkpoint, log it to MLflow, mark it done; return the done record
        (or, for a unit given up, its failure record). Claims the unit in the ledger first."""
        ctx, step, task = unit.context, unit.step, unit.task
        ledger = EvalLedger(ctx.run_dir)
        record = ledger.done(step, task) or ledger.failed(step, task)
        if record is not None:  # a retried call whose first attempt got as far as the marker; a unit given up
            return record
        started = time.time()
        attempt = int((ledger.running(step, task) or {}).get("attempt", 0)) + 1  # retries and restarts count
        if attempt > ctx.eval.max_attempts:  # Ray re-ran a call whose evaluator died at the last attempt
            give_up(ctx, step, task, "its evaluator died", ctx.eval.max_attempts)
            return ledger.failed(step, task) or {}
        ledger.mark_running(step, task, {"pid": os.getpid(), "host": socket.gethostname(),
                                         "actor": self.name, "started": started, "attempt": attempt})
        self._running = {"run_dir": ctx.run_dir, "step": step, "task": task, "attempt": attempt}
        try:
            return self._score_claimed(checkpoint, unit, ledger, started, attempt)
        finally:
            self._running = None

    def _score_claimed(
        self, checkpoint: Checkpoint, unit: EvalUnit, ledger: EvalLedger, started: float, attempt: int
    ) -> dict[str, Any]:
        """`score` once the unit is claimed (attempt `attempt`, since `started`)."""
        ctx, step, task = unit.context, unit.step, unit.task
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
        # (step, task) -> its last attempt known to be over (killed here, or its evaluator runs another)
        self._over: dict[tuple[int, str], int] = {}

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

    def send_ahead(
        self, after: int, ahead: dict[Any, _Handed], committed: Mapping[int, Checkpoint] | None
    ) -> None:
        """Give each evaluator without a unit of this trial in flight one missing, unqueued unit of a
        committed checkpoint later than `after` (oldest first); the calls are added to `ahead`."""
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

    def _send_ahead_safely(
        self, after: int, ahead: dict[Any, _Handed], committed: Mapping[int, Checkpoint] | None
    ) -> None:
        try:
            self.send_ahead(after, ahead, committed)
        except Exception as exc:  # noqa: BLE001 - scoring ahead only saves time; its validation scores the unit
            _console(f"[stars] eval: scoring ahead of step {after} failed ({exc!r}); checkpoints wait for their validation")

    def _poll(self, step: int, ahead: dict[Any, _Handed]) -> None:
        """What a waiting dispatcher does every `POLL_SECONDS`: kill the evaluators of hung units of
        this trial, then hand idle evaluators units of later checkpoints."""
        committed = self.committed()
        try:
            self.kill_hung(self.in_flight(self._pending_from(step, committed or {})))
        except Exception as exc:  # noqa: BLE001 - storage or MLflow hiccup: the next poll looks again
            _console(f"[stars] eval: cannot check for hung evaluators now ({exc!r})")
        self._send_ahead_safely(step, ahead, committed)

    # -- hung evaluators and units given up -------------------------------------------------------
    def kill_hung(self, units: Iterable[tuple[int, str]]) -> None:
        """Kill (Ray restarts it) the evaluator of every unit of `units` whose current attempt has run
        longer than `eval.timeout_s`, after asking the evaluator what it runs: one busy with something
        else holds no such attempt (its claim in the ledger is stale: the attempt died with an earlier
        process). A unit whose last attempt (`eval.max_attempts`) timed out is recorded as failed first."""
        timeout = self.ctx.eval.timeout_s
        if timeout is None:
            return
        for step, task in units:
            claim = self.ledger.running(step, task)
            if claim is None or claim.get("actor") not in self.ctx.actors:
                continue
            attempt = int(claim.get("attempt", 0))
            if attempt > self._over.get((step, task), 0) and time.time() - float(claim["started"]) > timeout:
                killed = self.ledger.killed(step, task) or {}
                if killed.get("started") != claim["started"]:  # not killed already (by an earlier dispatcher)
                    self._time_out(step, task, claim, attempt, timeout)

    def _time_out(self, step: int, task: str, claim: dict[str, Any], attempt: int, timeout: float) -> None:
        actor = claim["actor"]
        self._over[(step, task)] = attempt
        running = {"run_dir": self.ctx.run_dir, "step": step, "task": task, "attempt": attempt}
        answer = self._ask(actor, running, timeout)
        if answer == "elsewhere":
            return
        what = f"timed out after {timeout:g} s"
        self.ledger.mark_killed(step, task, {"attempt": attempt, "actor": actor, "pid": claim.get("pid"),
                                             "started": claim["started"], "killed": time.time(), "outcome": what,
                                             "evaluator": answer})
        try:
            if attempt >= self.ctx.eval.max_attempts:
                self.record_failed(step, task, what, attempt)  # before the kill: the retried call returns it
            else:
                _console(f"[stars] eval: {task} at step {step} {what} on {actor} (attempt {attempt} of "
                         f"{self.ctx.eval.max_attempts}; the evaluator {answer}); restarting it and trying again")
        finally:  # whatever the bookkeeping met, a hung evaluator must not stay hung
            self._kill(actor)

    def _kill(self, actor: str) -> None:
        """Kill `actor`: Ray restarts it under its name and re-runs its calls (`ACTOR_TASK_RETRIES`)."""
        try:
            ray.kill(_actor(actor, self.ctx.namespace), no_restart=False)
        except ValueError:  # no such actor any more
            pass

    def _ask(self, actor: str, attempt: dict[str, Any], timeout: float) -> str:
        """Whether `actor` runs `attempt`: "is still running it", "does not answer" (frozen, or
        restarting) or "elsewhere" (it runs another unit or none, or it is gone)."""
        try:
            ref = _actor(actor, self.ctx.namespace).running.remote()
            ready, _ = ray.wait([ref], timeout=min(PROBE_SECONDS, timeout))
            if not ready:
                return "does not answer"
            return "is still running it" if ray.get(ref) == attempt else "elsewhere"
        except (ray.exceptions.RayActorError, ValueError):  # died meanwhile: the attempt died with it
            return "elsewhere"

    def record_failed(self, step: int, task: str, what: str, attempts: int) -> None:
        """Give (step, task) up (`give_up`)."""
        give_up(self.ctx, step, task, what, attempts, self.tracker if self.ctx.trial_run_id else None)

    def _lost(self, handed: _Handed, exc: Exception) -> bool:
        """The call of `handed` failed: its actor died and Ray's own retries ran out. Call the actor
        again (it restarts) while the unit has attempts and calls left and returns True; else record
        the unit as failed. False too when the unit is settled meanwhile (a timeout gave it up)."""
        unit = handed.unit
        if self.ledger.done(unit.step, unit.task) or self.ledger.failed(unit.step, unit.task):
            return False
        attempts = int((self.ledger.running(unit.step, unit.task) or {}).get("attempt", 0))
        limit = self.ctx.eval.max_attempts
        if attempts < limit and handed.calls < max(DISPATCH_CALLS, limit):
            time.sleep(1.0)
            self.resend(handed)
            return True
        what = f"its evaluator died ({type(exc).__name__})"
        self.record_failed(unit.step, unit.task, what, max(attempts, 1))
        return False

    # -- one checkpoint ---------------------------------------------------------------------------
    def wait(self, step: int, own: dict[str, _Handed]) -> list[str]:
        """Wait for `own` (units of the checkpoint at `step`), calling an actor again when it died;
        meanwhile kill evaluators whose unit runs past `eval.timeout_s` and keep idle ones busy with
        later checkpoints. Returns the errors scoring raised (units given up are in the ledger)."""
        pending = dict(own)
        ahead: dict[Any, _Handed] = {}
        errors: list[str] = []
        self._poll(step, ahead)
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
                    if not self._lost(handed, exc):
                        del pending[task]
                except ray.exceptions.RayTaskError as exc:
                    errors.append(f"{task}: {exc.cause!r}" if getattr(exc, "cause", None) else f"{task}: {exc}")
                    self.ledger.clear_queued(step, task)
                    del pending[task]
            self._poll(step, ahead)
            for task in [t for t in pending if self.ledger.failed(step, t) is not None]:
                del pending[task]  # given up: its call returns the failure record once its actor is back
        return errors

    def score(self, checkpoint: Checkpoint) -> dict[str, float]:
        """Score the checkpoint's missing tasks (what `score_checkpoint` does); returns its summary."""
        step = step_of(checkpoint.path)
        if step is None:
            raise ValueError(f"checkpoint {checkpoint.path!r} is not a step_NNNNNNN directory")
        todo = self.ledger.missing(step, self.tasks)
        errors = self.wait(step, self.send_own(checkpoint, step, todo) if todo else {})
        given_up = self.ledger.failures(step, self.tasks)
        self.close_eval_run(step, "FAILED" if errors or given_up else "FINISHED")
        if errors:
            raise RuntimeError(f"evaluation of {checkpoint.path} failed: " + "; ".join(errors))
        summary: dict[str, float] = {}
        for task in self.tasks:
            record = self.ledger.done(step, task) or {}
            summary.update(record.get("summary", {}))
        lines = [f"{t} failed" if t in given_up else _summary_line(t, summary) for t in self.tasks]
        _console(f"[stars] eval step {step}: " + "; ".join(lines))
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
