"""Evaluation actors on a real local Ray with a real MLflow store: every committed checkpoint is
scored at depths 1..16 while training runs, survives pruning, a killed Evaluator and a restart, and
is scored ahead of its validation on an idle evaluator when scoring is slower than training."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from ray.train import Checkpoint

from stars.checkpoint import step_of
from stars.ray_backend.evaluation import Dispatcher, EvaluationService, EvalUnit
from stars.ray_backend.job import run_job
from stars.ray_backend.ledger import EvalLedger
from stars.spec import JobSpec, resolve_spec

pytestmark = pytest.mark.ray

STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow store and storage root for the module (creating the sqlite tables takes ~8 s)."""
    return tmp_path_factory.mktemp("evaljobs")


def eval_job(tmp_path: Path, name: str, train: dict | None = None, **eval_overrides) -> JobSpec:
    """A tiny addition job: 30 steps, a checkpoint every 10 (`train` overrides), Ray keeps only the
    newest one."""
    ev = {"tasks": ["addition"], "depths": "1-16", "rho_depths": [1, 16], "rho_iters": 5, "limit": 50,
          "batch_size": 64, "workers": 1, "resources": {"cpus": 1}, **eval_overrides}
    return JobSpec.model_validate({
        "name": name, "experiment": name, "seed": 0,
        "data": {"task": "addition", "digits": 4, "num_train": 400, "num_test": 50},
        "model": {"d_model": 32, "n_heads": 2, "n_block": 1, "d_ff": 64, "max_position_embeddings": 24,
                  "injection": "add"},
        "stars": {"loop_sampling": {"kind": "uniform", "min": 1, "max": 4}, "jsrr": {"weight": 0.0}},
        "train": {"max_steps": 30, "global_batch_size": 16, "lr": 1e-3, "checkpoint_every": 10,
                  "log_every": 10, "keep_checkpoints": 1, **(train or {})},
        # max_failures 1: on this 2-core box Ray's PlacementGroupCleaner now and then takes a failed
        # state-API lookup for a dead controller and removes the live worker group's placement
        # group; training then resumes from its last checkpoint instead of failing the test.
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(tmp_path / "runs"),
                      "max_failures": 1},
        "eval": ev,
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "mlruns")},
    })


def eval_runs(client: MlflowClient, trial_run: str) -> dict[int, object]:
    runs = client.search_runs(
        [client.get_run(trial_run).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{trial_run}' and tags.`stars.kind` = 'eval'",
    )
    return {int(r.data.tags["stars.step"]): r for r in runs}


def check_all_scored(
    spec: JobSpec, result, rho_depths=(1, 16), steps=STEPS
) -> tuple[MlflowClient, dict[int, object]]:
    """One eval run per checkpoint, 16 depth points each (no duplicates), dynamics, summaries on the
    trial run."""
    client = MlflowClient(spec.tracking.uri)
    trial_run = result.job_run_id  # no sweep: the job run is the trial run
    runs = eval_runs(client, trial_run)
    assert sorted(runs) == list(steps)
    for step, run in runs.items():
        assert run.info.run_name == f"eval@step={step}" and run.info.status == "FINISHED"
        acc = client.get_metric_history(run.info.run_id, "addition/acc")
        assert sorted(m.step for m in acc) == list(range(1, 17)), step
        for name in ("dyn/hidden_norm", "dyn/step_size", "dyn/dist_from_start"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == list(range(1, 17))
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "dyn/rho")) == list(rho_depths)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "addition")}
        assert artifacts == {"addition/addition.csv", "addition/addition.png"}
    for key in ("peak_acc", "best_depth", "acc_at_4", "acc_at_8", "acc_at_16", "drop_at_8", "drop_at_16"):
        assert sorted(m.step for m in client.get_metric_history(trial_run, f"addition/{key}")) == list(steps), key
    ledger = EvalLedger(result.trials[0].storage_dir)
    assert ledger.done_steps("addition") == list(steps)
    assert ledger.in_flight(steps, ["addition"]) == {}  # nothing left queued
    for step, run in runs.items():
        assert ledger.done(step, "addition")["eval_run_id"] == run.info.run_id
        assert ledger.eval_run(step)["status"] == "FINISHED"
    return client, runs


def _kill_evaluator_while_it_works(
    run_root: Path, stop: threading.Event, killed: list[tuple[int, int]], job: str
) -> None:
    """SIGKILL the Evaluator process that claimed the first (checkpoint, task), before it finishes;
    record (its pid, the checkpoint's step)."""
    deadline = time.time() + 240
    while not stop.is_set() and time.time() < deadline:
        for running in run_root.glob(f"{job}-*/eval/step_*/addition.running.json"):
            if running.with_name("addition.done.json").exists():
                continue
            try:
                pid = json.loads(running.read_text())["pid"]
            except (ValueError, OSError):
                continue  # being written
            os.kill(int(pid), signal.SIGKILL)  # the actor our job started (pid from its own claim)
            killed.append((int(pid), step_of(running.parent.name)))
            return
        time.sleep(0.02)


def test_every_checkpoint_is_scored_once_despite_a_killed_evaluator_pruning_and_a_restart(ray_cluster, store):
    """One job (Ray Train's start-up is most of a tiny job's time) for three ways to lose a score: the
    Evaluator working on a unit is SIGKILLed (the actor is replaced and the unit redone), Ray prunes
    checkpoints (keep_checkpoints=1) that are still waiting to be scored, and the job is restarted
    with one done marker gone (only that unit is scored again)."""
    # more power iterations: the unit takes long enough to be killed in the middle of it
    spec = eval_job(store, "evalkill", rho_depths="1-16", rho_iters=30)
    stop, killed = threading.Event(), []
    killer = threading.Thread(
        target=_kill_evaluator_while_it_works, args=(store / "runs", stop, killed, "evalkill"), daemon=True
    )
    killer.start()
    try:
        result = run_job(spec, console=lambda line: None)
    finally:
        stop.set()
        killer.join()
    assert killed, "no Evaluator was killed (did evaluation start?)"
    client, runs = check_all_scored(spec, result, rho_depths=range(1, 17))
    run_dir = Path(result.trials[0].storage_dir)
    ledger = EvalLedger(str(run_dir))
    pids = {s: ledger.done(s, "addition")["pid"] for s in STEPS}
    pid, step = killed[0]
    assert pid not in pids.values()  # the unit it was working on was redone by the restarted actor
    attempts = {s: ledger.done(s, "addition")["attempts"] for s in STEPS}
    assert attempts[step] == 2 and all(attempts[s] == 1 for s in STEPS if s != step)  # the ledger counts claims

    # keep_checkpoints=1: Ray pruned step 10 and 20, but only after they were scored (above)
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_0000030"]
    record = ledger.done(20, "addition")
    assert record["eval_run_id"] == runs[20].info.run_id and len(record["acc"]) == 16
    # the summary on the trial run is the summary of the logged curve
    curve = {m.step: m.value for m in client.get_metric_history(runs[30].info.run_id, "addition/acc")}
    peak = client.get_metric_history(result.job_run_id, "addition/peak_acc")
    assert [m.value for m in peak if m.step == 30] == [max(curve.values())]

    # A restarted job: the driver's sweep after fit() (what a re-run of this job executes once Ray
    # has re-queued its pending validations) scores exactly the unit whose done marker is missing.
    done_before = {s: ledger.done(s, "addition")["finished"] for s in STEPS}
    (run_dir / "eval" / "step_0000030" / "addition.done.json").unlink()
    service = EvaluationService(resolve_spec(spec)).start()
    try:
        summaries = service.finish_trial(resolve_spec(spec), result.job_run_id, str(run_dir), None)
    finally:
        service.stop()
    assert sorted(summaries) == [30] and summaries[30]["addition/peak_acc"] == max(curve.values())
    check_all_scored(spec, result, rho_depths=range(1, 17))  # still 3 eval runs, 16 points each: nothing logged twice
    done_after = {s: ledger.done(s, "addition")["finished"] for s in STEPS}
    assert done_after[10] == done_before[10] and done_after[20] == done_before[20]
    assert done_after[30] > done_before[30]
    assert ledger.done(30, "addition")["attempts"] == attempts[30] + 1
    assert ledger.done(20, "addition")["attempts"] == attempts[20]


def _freeze_evaluators(
    run_root: Path, job: str, plan: dict[int, int | None], stop: threading.Event,
    frozen: list[tuple[int, int, int]],
) -> None:
    """SIGSTOP the Evaluator process as it claims the addition unit of a step in `plan`, for attempts
    1..plan[step] (None: every attempt): a real hang, with no hook in the code. Records (pid, step,
    attempt)."""
    deadline, seen = time.time() + 240, set()
    while not stop.is_set() and time.time() < deadline:
        for running in run_root.glob(f"{job}-*/eval/step_*/addition.running.json"):
            step = step_of(running.parent.name)
            try:
                claim = json.loads(running.read_text())
            except (ValueError, OSError):
                continue  # being written
            attempt, limit = int(claim["attempt"]), plan.get(step, 0)
            if (step, attempt) in seen or (limit is not None and attempt > limit):
                continue
            if running.with_name("addition.done.json").exists():
                continue
            os.kill(int(claim["pid"]), signal.SIGSTOP)  # the actor our job started (pid from its own claim)
            seen.add((step, attempt))
            frozen.append((int(claim["pid"]), step, attempt))
        time.sleep(0.01)


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def test_a_hung_evaluator_is_restarted_and_a_unit_that_always_hangs_is_given_up(ray_cluster, store):
    # Two checkpoints: step 10's first attempt hangs (the evaluator is restarted, the unit scored on the
    # second attempt); step 20 hangs at every attempt (given up after max_attempts). A unit takes a
    # second or two here, so 5 s is a hang.
    steps = (10, 20)
    spec = eval_job(store, "evalhang", train={"max_steps": 20}, timeout_s=5, max_attempts=2)
    stop, frozen = threading.Event(), []
    freezer = threading.Thread(target=_freeze_evaluators, daemon=True,
                               args=(store / "runs", "evalhang", {10: 1, 20: None}, stop, frozen))
    freezer.start()
    try:
        result = run_job(spec, console=lambda line: None)
    finally:
        stop.set()
        freezer.join()
        for pid, _, _ in frozen:  # a process still stopped was not killed (the test fails below): let it go
            if _stopped(pid):
                os.kill(pid, signal.SIGCONT)
    # every hang was ended by killing the evaluator: a second attempt at each unit (on a new process)
    assert sorted((step, attempt) for _, step, attempt in frozen) == [(10, 1), (20, 1), (20, 2)]
    # training finished: every checkpoint committed, the job's (= trial's) run FINISHED
    assert [o.status for o in result.outcomes] == ["finished"]
    client = MlflowClient(spec.tracking.uri)
    assert client.get_run(result.job_run_id).info.status == "FINISHED"
    ledger = EvalLedger(result.trials[0].storage_dir)
    reason = "addition at step 20: timed out after 5 s (2 attempts)"
    # the ledger: 10 scored once, by its second attempt on a new process; 20 given up
    assert ledger.done_steps("addition") == [10]
    assert ledger.done(10, "addition")["attempts"] == 2
    assert ledger.done(10, "addition")["pid"] != frozen[0][0]  # (the process that hung at step 10)
    assert ledger.done(20, "addition") is None and ledger.failed(20, "addition")["reason"] == reason
    assert ledger.killed(20, "addition")["attempt"] == 2 and ledger.killed(10, "addition")["attempt"] == 1
    assert {ledger.killed(s, "addition")["evaluator"] for s in steps} == {"does not answer"}  # SIGSTOPped
    assert all(ledger.missing(s, ["addition"]) == [] for s in steps)  # nothing left to dispatch
    assert ledger.in_flight(steps, ["addition"]) == {}
    # MLflow: one eval run per checkpoint; 10's holds its depth curve once; 20's is FAILED with the reason
    runs = eval_runs(client, result.job_run_id)
    assert sorted(runs) == list(steps)
    assert {s: r.info.status for s, r in runs.items()} == {10: "FINISHED", 20: "FAILED"}
    assert runs[20].data.tags["stars.eval.failure"] == reason
    assert "stars.eval.failure" not in runs[10].data.tags
    for step, run in runs.items():
        acc = sorted(m.step for m in client.get_metric_history(run.info.run_id, "addition/acc"))
        assert acc == ([] if step == 20 else list(range(1, 17))), step
        assert ledger.eval_run(step)["status"] == run.info.status
    assert [m.step for m in client.get_metric_history(result.job_run_id, "addition/peak_acc")] == [10]


def test_a_stale_claim_is_left_alone_a_frozen_evaluator_is_killed_and_no_attempt_passes_the_limit(
    ray_cluster, store
):
    """The dispatcher's timeout decisions on one evaluator, without a training run: a claim past the
    timeout whose evaluator is idle (its attempt died with an earlier process) is left alone; a frozen
    evaluator is killed and restarted; at the last attempt the unit is given up; and an evaluator asked
    to start an attempt past `max_attempts` (Ray re-running a call) gives the unit up instead."""
    spec = resolve_spec(eval_job(store, "evalprobe", timeout_s=2, max_attempts=2))
    run_dir = str(store / "runs" / "evalprobe-x")
    ledger, service = EvalLedger(run_dir), EvaluationService(spec).start()
    actor, name = service.actors[0], service.names[0]

    def frozen_while(check, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)  # the actor this test started
        try:
            check()
            deadline = time.time() + 30  # Ray kills the process a moment after ray.kill returns
            while _stopped(pid) and time.time() < deadline:
                time.sleep(0.1)
        finally:
            if _stopped(pid):
                os.kill(pid, signal.SIGCONT)

    def claim(attempt: int) -> None:
        info = {"attempt": attempt, "actor": name, "pid": 1, "started": time.time() - 60}  # past the 2 s timeout
        ledger.mark_running(10, "addition", info)

    try:
        ctx = service.context(spec, None, run_dir)
        first = ray.get(actor.pid.remote(), timeout=120)
        claim(1)
        Dispatcher(ctx).kill_hung([(10, "addition")])  # idle: it answers that it runs nothing
        assert ray.get(actor.pid.remote(), timeout=60) == first and ledger.killed(10, "addition") is None
        frozen_while(lambda: Dispatcher(ctx).kill_hung([(10, "addition")]), first)
        second = ray.get(actor.pid.remote(), timeout=120)
        assert second != first and not _stopped(first)  # killed, and restarted under its name
        assert ledger.killed(10, "addition")["attempt"] == 1 and ledger.failed(10, "addition") is None
        claim(2)  # the last attempt
        frozen_while(lambda: Dispatcher(ctx).kill_hung([(10, "addition")]), second)
        reason = "addition at step 10: timed out after 2 s (2 attempts)"
        assert ledger.failed(10, "addition")["reason"] == reason and ledger.missing(10, ["addition"]) == []
        # a call re-run after the last attempt's evaluator died: no third attempt is claimed
        unit = EvalUnit(ctx, 20, "addition", primary=True, eval_run_id=None)
        ledger.mark_running(20, "addition", {"attempt": 2, "actor": name, "pid": 1, "started": time.time()})
        record = ray.get(actor.score.remote(Checkpoint(f"{run_dir}/step_0000020"), unit), timeout=120)
        assert record["reason"] == "addition at step 20: its evaluator died (2 attempts)"
        assert ledger.failed(20, "addition") == record and ledger.running(20, "addition")["attempt"] == 2
    finally:
        service.stop()


def test_the_payloads_into_ray_survive_json_and_pickle(store):
    """`EvalContext` goes to Ray Train as JSON `fn_kwargs` and comes back equal; an `EvalUnit` is pickled."""
    import pickle

    from stars.ray_backend.evaluation import EvalContext, EvalUnit

    spec = resolve_spec(eval_job(store, "payloads"))
    ctx = EvalContext(run_dir=str(store / "runs" / "x"), eval=spec.eval, actors=("a", "b"), namespace="ns",
                      trial_run_id="0" * 32, tracking_uri=spec.tracking.uri, benchmark_paths={"gsm8k": "/d"})
    assert EvalContext.from_json(json.loads(json.dumps(ctx.to_json()))) == ctx
    unit = EvalUnit(ctx, 10, "addition", primary=True, eval_run_id=None)
    assert pickle.loads(pickle.dumps(unit)) == unit


def _overlapping_on_two_actors(records: dict[int, dict]) -> list[tuple[int, int]]:
    """Pairs of checkpoints whose units ran at the same time on different evaluators."""
    return [(a, b) for a in records for b in records if a < b
            and records[a]["actor"] != records[b]["actor"]
            and records[a]["started"] < records[b]["finished"] and records[b]["started"] < records[a]["finished"]]


def _backlog_bounds(records: dict[int, dict], step: int, logged_at: float) -> tuple[int, int]:
    """What the backlog measured by the validation of `step` (logged at `logged_at`) can be, from the
    done records alone: at least the units started before that validation's own unit finished (so
    committed) and finished after the metric was logged; at most every unit finished after it."""
    own = records[step]["finished"]
    low = sum(1 for r in records.values() if r["started"] < own and r["finished"] > logged_at)
    high = sum(1 for r in records.values() if r["finished"] > own)
    return low, high


def test_checkpoints_are_scored_ahead_in_parallel_when_scoring_is_slower_than_training(ray_cluster, store):
    # A checkpoint every 2 steps (training them takes about a second); scoring one takes seconds: 16
    # depths, and the contraction factor rho at each of them with 15 power iterations. 2 evaluators.
    steps = (2, 4, 6, 8)
    spec = eval_job(store, "evalahead", train={"max_steps": 8, "checkpoint_every": 2, "log_every": 2},
                    workers=2, rho_depths="1-16", rho_iters=15)
    result = run_job(spec, console=lambda line: None)
    # one eval run per checkpoint, each depth logged once, although keep_checkpoints=1 pruned all but one
    client, runs = check_all_scored(spec, result, rho_depths=range(1, 17), steps=steps)
    ledger = EvalLedger(result.trials[0].storage_dir)
    records = {s: ledger.done(s, "addition") for s in steps}
    # scored once each: one claim per unit; a validation whose unit had been handed out ahead sent
    # its call to that same actor
    assert {s: r["attempts"] for s, r in records.items()} == {s: 1 for s in steps}
    assert all(ledger.queued(s, "addition")["actor"] == records[s]["actor"] for s in steps)
    # Ray validates one checkpoint at a time, yet units of two checkpoints ran at once (so one of
    # them was scored ahead of its validation)
    assert _overlapping_on_two_actors(records), records
    # the backlog: logged once per validated checkpoint, agreeing with when units ran, none at the end
    backlog = {m.step: m for m in client.get_metric_history(result.job_run_id, "eval/backlog")}
    assert sorted(backlog) == list(steps)
    for step, metric in backlog.items():
        low, high = _backlog_bounds(records, step, metric.timestamp / 1000)
        assert low <= metric.value <= high, (step, metric.value, low, high, records)
    assert max(m.value for m in backlog.values()) >= 1 and backlog[steps[-1]].value == 0
    assert result.trials[0].metrics["eval/backlog"] == 0.0  # what the last validation returned to Ray
