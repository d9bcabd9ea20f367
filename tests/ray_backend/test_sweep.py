"""Sweeps on a real local Ray Tune: concurrency, one MLflow child run per trial with its depth curves,
the sweep's table on the parent run, resume of unfinished trials only, and failure isolation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stars.ray_backend.job import run_job
from stars.ray_backend.sweep import TRIAL_DONE
from stars.spec import apply_overrides

pytestmark = pytest.mark.ray
QUIET = {"console": lambda line: None}


def _children(client: MlflowClient, job_run_id: str) -> list:
    run = client.get_run(job_run_id)
    return client.search_runs([run.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{job_run_id}' and tags.`stars.kind` = 'trial'")


def test_four_trials_two_at_a_time_interrupted_then_resubmitted_run_only_the_unfinished(
        ray_cluster, tiny_spec, tmp_path):
    """One sweep for the three things a sweep must do (one job: each costs ~30 s of Ray Train start-up).

    Concurrency: 4 trials, `max_concurrent_trials: 2`; two trial runs overlap in time. A real interrupt:
    `starsctl submit` in its own process (joined to the test's Ray) gets Ctrl-C once two trials are
    done, and is killed if it lingers. Resume: submitting the job again (with an eval-only change: same
    run directories) runs only the unfinished trials, from their checkpoints, into the same MLflow runs;
    no run is duplicated, no step logged twice, no checkpoint scored twice. At the end the parent run
    holds the sweep's table and per-trial summaries."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ray.util.state import list_tasks

    from stars.ray_backend.sweep import trial_run_dir
    from stars.spec import resolved_yaml, sweep_trials

    started = time.time()
    spec = tiny_spec(**{
        "train.max_steps": 8, "train.checkpoint_every": 4, "train.warmup_steps": 1,
        "sweep.grid": {"model.norm.type": ["layernorm", "rmsnorm"], "stars.jsrr.weight": [0.0, 0.1]},
        "sweep.max_concurrent_trials": 2,
        # Two trials' workers (1.5 CPUs each) and the evaluator (1) take all 4 of the test cluster's
        # CPUs: anything else that asks for CPU per trial would make the second trial's worker wait.
        "resources.cpus_per_worker": 1.5,
    })
    (tmp_path / "sweep.yaml").write_text(resolved_yaml(spec))
    done = [tmp_path / trial_run_dir(t) / TRIAL_DONE for t in sweep_trials(spec)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = tmp_path / "driver.log"  # a file, not a pipe: nobody reads a pipe while the driver runs
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "stars.cli", "submit", "sweep.yaml"], cwd=tmp_path,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while sum(p.exists() for p in done) < 2 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert sum(p.exists() for p in done) >= 2, log.read_text()[-3000:]
    driver.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        driver.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a driver that does not stop on Ctrl-C is killed
        driver.kill()
        driver.wait()
    output = log.read_text()
    # one line says what happened and what to do; the exit code is a shell's for Ctrl-C
    assert driver.returncode == 130, (driver.returncode, output[-3000:])
    assert "starsctl: interrupted. A job's MLflow run is marked KILLED; submitting the same spec again" in output
    finished_before = [p.exists() for p in done]
    assert 2 <= sum(finished_before) < 4, finished_before  # trials take ~20 s: Ctrl-C lands mid-sweep
    # Nothing is left RUNNING in MLflow: the job run and the trials it interrupted (with their eval runs)
    # end KILLED, the finished trials stay FINISHED.
    client = MlflowClient(spec.tracking.uri)
    experiment = client.get_experiment_by_name(spec.experiment or spec.name)
    runs = client.search_runs([experiment.experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}, [(r.info.run_name, r.info.status) for r in runs]
    kinds = {kind: sorted(r.info.status for r in runs if r.data.tags.get("stars.kind") == kind) for kind in ("job", "trial")}
    assert kinds["job"] == ["KILLED"] and kinds["trial"].count("FINISHED") == sum(finished_before), kinds
    assert set(kinds["trial"]) <= {"FINISHED", "KILLED"}, kinds

    resumed = run_job(apply_overrides(spec, {"eval.limit": 16}), **QUIET)
    assert [o.status for o in resumed.outcomes] == ["skipped" if f else "finished" for f in finished_before]
    assert all(p.exists() for p in done) and not resumed.failed
    jobs = client.search_runs([experiment.experiment_id], filter_string="tags.`stars.kind` = 'job'")
    assert len(jobs) == 1 and jobs[0].info.run_id == resumed.job_run_id  # the same job run, resumed
    children = _children(client, resumed.job_run_id)
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted(c.info.run_name for c in children) == sorted(f"tiny/{o.key}" for o in resumed.outcomes)
    # Two trials ran at the same time: the two that finished first overlap in time, and so do two of
    # their training workers' lifetimes (a trial's MLflow run starts before its worker gets resources).
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert spans[1][0] < spans[0][1], spans
    # A worker's life: from its actor starting (`__init__` runs once Ray has granted its resources) to
    # the end of its shutdown call. Ray fills in only some of a task's times: take those it has.
    lifetimes: dict[str, dict[str, list[int]]] = {}
    for method in ("__init__", "shutdown"):
        for task in list_tasks(filters=[("func_or_class_name", "=", f"RayTrainWorker.{method}")], detail=True,
                               limit=10_000, raise_on_missing_output=False):
            if (task.creation_time_ms or 0) >= started * 1000:
                times = [t for t in (task.start_time_ms, task.end_time_ms) if t]
                lifetimes.setdefault(task.actor_id, {})[method] = times
    workers = sorted((min(ends["__init__"]), max(ends["shutdown"])) for ends in lifetimes.values()
                     if ends.get("__init__") and ends.get("shutdown"))
    assert len(workers) >= 2, workers
    assert any(later[0] < earlier[1] for earlier, later in zip(workers, workers[1:])), workers
    for child in children:  # every trial trained to the end, each step logged once ...
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == sorted(set(steps)) and max(steps) == 8, (child.info.run_name, steps)
        # ... and each of its checkpoints was scored once: an eval run per step with a depth curve.
        evals = client.search_runs([child.info.experiment_id],
                                   filter_string=f"tags.`mlflow.parentRunId` = '{child.info.run_id}'")
        assert sorted(int(ev.data.tags["stars.step"]) for ev in evals) == [4, 8], child.info.run_name
        for ev in evals:
            assert [m.step for m in client.get_metric_history(ev.info.run_id, "addition/acc")] == [1, 2, 3, 4]
    # The parent run holds the sweep's table (4 trials x depths) and per-trial summaries.
    table = client.download_artifacts(resumed.job_run_id, "sweep/depth_curves.csv", str(tmp_path))
    rows = open(table).read().splitlines()
    assert rows[0].startswith("trial,status,task,step,1,2,3,4,peak_acc") and len(rows) == 5
    with open(table, newline="") as f:  # keys hold commas: the cells are quoted
        assert [r["trial"] for r in csv.DictReader(f)] == [o.key for o in resumed.outcomes]
    assert "trials/t003/addition/peak_acc" in client.get_run(resumed.job_run_id).data.metrics


def test_failure_reasons_read_through_rays_wrappers():
    """What a user sees for a failed trial: the divergence line, or the innermost error's last line."""
    from stars.ray_backend.sweep import TrialFailed, failure_reason
    from stars.train import TrainingDiverged

    wrapped = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n  File 'x.py', line 3\n"
                           f"stars.train.TrainingDiverged: {TrainingDiverged(7, float('nan'))}")
    assert failure_reason(wrapped) == "diverged at step 7: loss nan"
    assert failure_reason(TrialFailed("diverged at step 3: loss inf")) == "diverged at step 3: loss inf"
    inner = ValueError("bad value: 3")
    outer = RuntimeError("wrapper")
    outer.__cause__ = inner
    assert failure_reason(outer) == "ValueError: bad value: 3"


def test_results_of_an_interrupted_sweep_count_unstarted_trials_as_failed(tiny_spec):
    """Ray 2.60's Tune hands back a never-started trial's result with no config; a trial can also have
    no result at all. Neither may crash the job's summary; both are failed (the job did not run them)."""
    from types import SimpleNamespace

    from stars.ray_backend.sweep import NOT_STARTED, TRIAL_DONE, classify_results, trial_run_dir
    from stars.spec import sweep_trials

    spec = tiny_spec(**{"sweep.grid": {"stars.jsrr.weight": [0.0, 0.01, 0.1, 0.3, 0.5]}})
    trials = sweep_trials(spec)
    done_dir = Path(trial_run_dir(trials[1]))
    done_dir.mkdir(parents=True)
    (done_dir / TRIAL_DONE).write_text("{}")

    def result(trial=None, metrics=None, error=None):
        return SimpleNamespace(config={"trial": trial.index} if trial else None, metrics=metrics, error=error)
    results = [result(trials[0], {"stars/finished": 1}), result(trials[1]),  # finished; done marker only
               result(trials[2], {}, RuntimeError("boom")), result(trials[3], {"step": 4}),
               result(None)]  # trial 4: a config-less result, as an interrupted sweep leaves it
    outcomes = classify_results(results, trials, "stopped by Ray Tune")
    assert [(outcomes[t.index].status, outcomes[t.index].reason) for t in trials] == [
        ("finished", None), ("finished", None), ("failed", "RuntimeError: boom"),
        ("stopped", "stopped by Ray Tune"), ("failed", NOT_STARTED)]
    assert classify_results([], trials[:1], "x")[0].reason == NOT_STARTED


def test_a_trial_interrupted_between_its_done_marker_and_its_run_end_is_finished_in_mlflow(tiny_spec):
    """A trial writes its done marker, then ends its MLflow run. Ctrl-C landing in between has the
    driver end that run KILLED with the unfinished ones; the marker decides, so it ends FINISHED, and
    runs without a marker (or with a marker naming no run) stay as they were."""
    from stars.ray_backend.sweep import _mark_done, finish_done_trial_runs, trial_run_dir
    from stars.spec import sweep_trials
    from stars.tracking import Tracker

    spec = tiny_spec(**{"sweep.grid": {"stars.jsrr.weight": [0.0, 0.1, 0.3]}})
    trials = sweep_trials(spec)
    tracker = Tracker.from_spec(spec)
    job_run = tracker.start_job(spec)
    runs = [tracker.start_trial(job_run, t) for t in trials]
    _mark_done(trial_run_dir(trials[0]), {"trial": trials[0].key, "run_id": runs[0]})
    _mark_done(trial_run_dir(trials[2]), {})
    assert sorted(tracker.close_open_descendants(job_run, "KILLED", console=lambda line: None)) == sorted(runs)

    assert finish_done_trial_runs(trials, tracker) == [runs[0]]
    status = lambda run: tracker.client.get_run(run).info  # noqa: E731
    assert [status(r).status for r in runs] == ["FINISHED", "KILLED", "KILLED"]
    ended_at = status(runs[0]).end_time
    assert finish_done_trial_runs(trials, tracker) == []  # a finished run is left alone, end time and all
    assert status(runs[0]).end_time == ended_at


def test_the_sweep_table_quotes_trial_keys_with_commas():
    from stars.ray_backend.sweep_report import _csv

    rows = [{"trial": "t003-type=rmsnorm,weight=0.1", "status": "finished", "1": None, "2": 0.5}]
    parsed = list(csv.DictReader(_csv(rows).splitlines()))
    assert parsed == [{"trial": "t003-type=rmsnorm,weight=0.1", "status": "finished", "1": "", "2": "0.5"}]


def test_asha_stops_a_lagging_trial_and_a_diverging_trial_fails_alone(ray_cluster, tiny_spec):
    """One sweep, one trial at a time in order (one job for both: a tiny job is mostly Ray start-up):
    - `good` (lr 3e-3) finishes;
    - `diverging` (fp16 weights at lr 10, no clipping) fails alone with "diverged at step N": its run
      ends FAILED with that reason as a tag, and the sweep goes on;
    - `lagging` (lr 1e-7) reaches ASHA's first rung with a loss worse than `good`'s there and is stopped:
      its run ends KILLED with the reason, it is not a failure, and it has no done marker (a
      resubmission runs it again).
    The job run ends FAILED because one trial failed."""
    spec = tiny_spec(**{
        "train.max_steps": 8, "train.checkpoint_every": 2, "train.warmup_steps": 0, "train.schedule": "constant",
        "stars.jsrr.weight": 0.0, "eval.tasks": [],
        "sweep.variants": {
            "good": {"train": {"lr": 3e-3}},
            "diverging": {"train": {"lr": 10.0, "grad_clip": None},
                          "model": {"dtype": "float16", "norm": {"position": "pre"}}},  # overflows to NaN
            "lagging": {"train": {"lr": 1e-7}},
        },
        "sweep.max_concurrent_trials": 1,
        "sweep.early_stop": {"metric": "train/loss", "mode": "min", "grace_period": 2, "reduction_factor": 2},
    })
    result = run_job(spec, **QUIET)
    good, diverging, lagging = result.outcomes
    assert (good.key, diverging.key, lagging.key) == ("t000-v=good", "t001-v=diverging", "t002-v=lagging")
    assert good.status == "finished"
    assert diverging.status == "failed" and diverging.reason.startswith("diverged at step "), diverging.reason
    assert (lagging.status, lagging.reason) == ("stopped", "stopped early by ASHA on train/loss")
    assert result.failed == [diverging]
    client = MlflowClient(spec.tracking.uri)
    runs = {c.data.tags["stars.trial"]: c for c in _children(client, result.job_run_id)}
    assert runs[good.key].info.status == "FINISHED" and (Path(good.run_dir) / TRIAL_DONE).exists()
    assert runs[diverging.key].info.status == "FAILED"
    assert runs[diverging.key].data.tags["stars.failure"] == diverging.reason
    assert runs[lagging.key].info.status == "KILLED" and runs[lagging.key].data.tags["stars.failure"] == lagging.reason
    assert not (Path(lagging.run_dir) / TRIAL_DONE).exists()
    assert client.get_run(result.job_run_id).info.status == "FAILED"
