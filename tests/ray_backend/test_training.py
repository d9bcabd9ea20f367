"""STARS training on a real local Ray: 2-worker DDP, and recovery from a killed training worker."""

import glob
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stars.checkpoint import load_trainer_state
from stars.ray_backend.job import run_job
from stars.train import build_sampler

pytestmark = pytest.mark.ray


def test_two_worker_ddp_keeps_replicas_identical_learns_and_resubmitting_resumes_or_starts_fresh(
        ray_cluster, tiny_spec):
    """2-worker DDP, then the same job submitted again (one job for both: a tiny job is mostly Ray
    Train's start-up): with only a logging field changed it finds its finished run (same directory, same
    final checkpoint, no step trained again); with a training field changed it starts fresh in a new
    directory. (Sweep trials: tests/ray_backend/test_sweep.py.)"""
    from stars.spec import apply_overrides

    spec = tiny_spec(**{"resources.num_workers": 2, "train.max_steps": 40, "train.global_batch_size": 32,
                        "train.checkpoint_every": 20, "train.log_every": 5})
    quiet = {"console": lambda line: None}
    result = run_job(spec, **quiet)
    (trial,) = result.trials
    checksums = trial.metrics["ddp/param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    client = MlflowClient(spec.tracking.uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "tiny"]
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`stars.kind` != 'eval'")
    assert len(runs) == 1  # one run per training, not one per worker (eval runs are nested apart)
    losses = [m.value for m in sorted(client.get_metric_history(result.job_run_id, "train/loss"), key=lambda m: m.step)]
    assert [m.step for m in client.get_metric_history(result.job_run_id, "train/depth")] == list(range(5, 41, 5))
    assert losses[-1] < 0.8 * losses[0]
    params = runs[0].data.params
    assert params["resources.num_workers"] == "2" and params["stars.jsrr.weight"] == "0.1"
    final = load_trainer_state(trial.checkpoint_path)
    assert [s for s, _ in final["history"]] == list(range(1, 41))

    again = run_job(apply_overrides(spec, {"train.log_every": 3}), **quiet).trials[0]
    assert again.storage_dir == trial.storage_dir and again.checkpoint_path == trial.checkpoint_path
    assert sorted(p.name for p in Path(trial.storage_dir).glob("step_*")) == ["step_0000020", "step_0000040"]
    state = load_trainer_state(again.checkpoint_path)
    assert state["resumes"] == [] and [s for s, _ in state["history"]] == list(range(1, 41))
    fresh = run_job(apply_overrides(spec, {"train.lr": 1e-3, "eval.tasks": []}), **quiet).trials[0]
    assert fresh.storage_dir != trial.storage_dir
    assert load_trainer_state(fresh.checkpoint_path)["resumes"] == []


def _committed_steps(storage: str) -> list[int]:
    """Checkpoints the Ray Train controller has registered (it polls workers every ~2 s; a reported
    checkpoint is only resumable once it appears in this snapshot)."""
    steps = []
    for path in glob.glob(os.path.join(storage, "*", "checkpoint_manager_snapshot.json")):
        try:
            with open(path) as f:
                results = json.load(f).get("checkpoint_results", [])
        except (OSError, ValueError):  # being rewritten
            continue
        steps += [int(r["checkpoint_dir_name"].split("_")[1]) for r in results]
    return steps


def _kill_training_workers_as_they_commit(storage: str, stop: threading.Event, kills: list, times: int) -> None:
    """SIGKILL the live training worker each time a checkpoint later than the last kill's is committed
    (the first time: once one is), `times` times; record (last committed step, pids) per kill."""
    from ray._private import state

    deadline, dead = time.time() + 240, set()
    while not stop.is_set() and time.time() < deadline and len(kills) < times:
        committed = _committed_steps(storage)
        if committed and max(committed) > (kills[-1][0] if kills else -1):
            pids = [int(a["Pid"]) for a in state.actors().values()
                    if a.get("ActorClassName") == "RayTrainWorker" and a.get("State") == "ALIVE"
                    and int(a["Pid"]) not in dead]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            if pids:
                dead.update(pids)
                kills.append((max(committed), pids))
        time.sleep(0.1)


def test_a_killed_worker_resumes_without_a_step_lost_and_with_no_restart_left_the_job_says_so(ray_cluster, tiny_spec):
    """`resources.max_failures: 1` and the training worker SIGKILLed twice. The first time Ray Train
    restarts it and training resumes from the last committed checkpoint with no step lost or repeated;
    the second time no restart is left: the job fails with one line that says so and names the committed
    checkpoint a resubmission resumes from, and that checkpoint loads."""
    from stars.checkpoint import load_checkpoint, step_of
    from stars.ray_backend.ledger import committed_checkpoints
    from stars.ray_backend.sweep import WORKER_DIED
    from stars.ray_backend.training import run_dir_for
    from stars.spec import resolve_spec

    spec = resolve_spec(tiny_spec(**{"train.max_steps": 400, "train.checkpoint_every": 20, "train.log_every": 10,
                                     "resources.max_failures": 1, "model.d_model": 64, "model.d_ff": 128,
                                     "train.global_batch_size": 64, "eval.tasks": []}))
    stop, kills = threading.Event(), []
    killer = threading.Thread(target=_kill_training_workers_as_they_commit,
                              args=(spec.resources.storage_path, stop, kills, 2))
    killer.start()
    lines: list[str] = []
    try:
        result = run_job(spec, console=lines.append)
    finally:
        stop.set()
        killer.join()
    assert len(kills) == 2, f"the training worker was killed {len(kills)} times (the run ended first?)"
    (failed,) = result.failed
    run_dir = run_dir_for(spec)
    last = committed_checkpoints(run_dir)[-1]
    assert failed.reason == (f"{WORKER_DIED}; no restart left (resources.max_failures: 1); submitting the job "
                             f"again resumes from its last committed checkpoint, {last}")
    assert any(failed.reason in line for line in lines)  # the job's summary line
    client = MlflowClient(spec.tracking.uri)
    job = client.get_run(result.job_run_id)
    assert job.info.status == "FAILED" and job.data.tags["stars.failure"] == failed.reason
    step = step_of(last)
    assert step >= kills[1][0] > kills[0][0]
    state = load_checkpoint(os.path.join(run_dir, last))
    assert state.step == step
    trainer = load_trainer_state(os.path.join(run_dir, last))
    sampler = build_sampler(spec)
    # Every step up to the checkpoint exactly once, with the depth the sampler gives that step: the
    # restart after the first kill lost and repeated nothing.
    assert trainer["history"] == [(s + 1, sampler(s)) for s in range(step)]
    (resumed_at,) = trainer["resumes"]
    assert resumed_at % 20 == 0 and kills[0][0] <= resumed_at < step
    # MLflow's curve has each logged step once, though steps after a checkpoint were re-run.
    steps = [m.step for m in client.get_metric_history(result.job_run_id, "train/loss")]
    assert sorted(steps) == sorted(set(steps)) and set(range(10, step + 1, 10)) <= set(steps)


def test_run_directories_follow_what_training_computes(tiny_spec):
    """A run's directory (its Ray Train run name) changes with a field that changes training and stays
    with one that does not, for a single job and for a sweep trial."""
    from stars.ray_backend.training import run_name_for
    from stars.spec import apply_overrides, sweep_trials

    base = tiny_spec()
    single = run_name_for(base)
    assert single.startswith("tiny-")
    assert run_name_for(apply_overrides(base, {"eval.depths": "1-2", "train.log_every": 3})) == single
    assert run_name_for(apply_overrides(base, {"train.lr": 1e-3})) != single

    def trial_dir(**changes):
        spec = apply_overrides(base, {"sweep.grid.model.norm.type": ["layernorm", "rmsnorm"], **changes})
        trial = sweep_trials(spec)[1]
        return run_name_for(trial.spec, trial.key)

    first = trial_dir()
    assert first.startswith("tiny-t001-type=rmsnorm-")
    assert trial_dir(**{"eval.limit": 8, "resources.max_failures": 3}) == first
    assert trial_dir(**{"seed": 7}) != first


def test_the_train_worker_module_leaves_the_model_stack_to_the_workers():
    """Ray Train's controller and Tune's trainable import `stars.ray_backend.training` to unpickle
    `train_worker`; transformers and MLflow (~3 s of CPU per process here) load only on the workers."""
    import subprocess
    import sys

    probe = ("import sys, stars.ray_backend.training as t; "
             "print(sorted(m for m in ('transformers', 'mlflow', 'stars.train', 'stars.model') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
