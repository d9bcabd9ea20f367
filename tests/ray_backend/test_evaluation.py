"""Evaluation actors on a real local Ray with a real MLflow store: every committed checkpoint is
scored at depths 1..16 while training runs, survives pruning, a killed Evaluator and a restart."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stars.ray_backend.evaluation import EvaluationService
from stars.ray_backend.job import run_job
from stars.ray_backend.ledger import EvalLedger
from stars.spec import JobSpec, resolve_spec

pytestmark = pytest.mark.ray

STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow store and storage root for the module (creating the sqlite tables takes ~8 s)."""
    return tmp_path_factory.mktemp("evaljobs")


def eval_job(tmp_path: Path, name: str, **eval_overrides) -> JobSpec:
    """A tiny addition job: 30 steps, a checkpoint every 10, Ray keeps only the newest one."""
    ev = {"tasks": ["addition"], "depths": "1-16", "rho_depths": [1, 16], "rho_iters": 5, "limit": 50,
          "batch_size": 64, "workers": 1, "resources": {"cpus": 1}, **eval_overrides}
    return JobSpec.model_validate({
        "name": name, "experiment": name, "seed": 0,
        "data": {"task": "addition", "digits": 4, "num_train": 400, "num_test": 50},
        "model": {"d_model": 32, "n_heads": 2, "n_block": 1, "d_ff": 64, "max_position_embeddings": 24,
                  "injection": "add"},
        "stars": {"loop_sampling": {"kind": "uniform", "min": 1, "max": 4}, "jsrr": {"weight": 0.0}},
        "train": {"max_steps": 30, "global_batch_size": 16, "lr": 1e-3, "checkpoint_every": 10,
                  "log_every": 10, "keep_checkpoints": 1},
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


def check_all_scored(spec: JobSpec, result, rho_depths=(1, 16)) -> tuple[MlflowClient, dict[int, object]]:
    """3 eval runs, 16 depth points each (no duplicates), dynamics, summaries on the trial run."""
    client = MlflowClient(spec.tracking.uri)
    trial_run = result.job_run_id  # no sweep: the job run is the trial run
    runs = eval_runs(client, trial_run)
    assert sorted(runs) == list(STEPS)
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
        assert sorted(m.step for m in client.get_metric_history(trial_run, f"addition/{key}")) == list(STEPS), key
    ledger = EvalLedger(result.trials[0].storage_dir)
    assert ledger.done_steps("addition") == list(STEPS)
    return client, runs


def test_every_checkpoint_is_scored_at_16_depths_despite_pruning_and_a_restart(ray_cluster, store):
    spec = eval_job(store, "evaljob")
    result = run_job(spec, console=lambda line: None)
    client, runs = check_all_scored(spec, result)
    run_dir = Path(result.trials[0].storage_dir)
    # keep_checkpoints=1: Ray pruned step 10 and 20, but only after they were scored (above)
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_0000030"]
    ledger = EvalLedger(str(run_dir))
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
    check_all_scored(spec, result)  # still 3 eval runs, 16 points each: nothing logged twice
    done_after = {s: ledger.done(s, "addition")["finished"] for s in STEPS}
    assert done_after[10] == done_before[10] and done_after[20] == done_before[20]
    assert done_after[30] > done_before[30]


def _kill_evaluator_while_it_works(run_root: Path, stop: threading.Event, killed: list[int], job: str) -> None:
    """SIGKILL the Evaluator process that claimed the first (checkpoint, task), before it finishes."""
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
            killed.append(int(pid))
            return
        time.sleep(0.02)


def test_a_killed_evaluator_is_replaced_and_no_checkpoint_is_left_unscored(ray_cluster, store):
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
    ledger = EvalLedger(result.trials[0].storage_dir)
    pids = {s: ledger.done(s, "addition")["pid"] for s in STEPS}
    assert killed[0] not in pids.values()  # the unit it was working on was redone by the restarted actor


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
