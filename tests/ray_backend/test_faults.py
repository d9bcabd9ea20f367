"""Faults a long run meets, each caused for real (docs/reliability.md):

- the driver is SIGKILLed after a checkpoint is committed and the same spec is submitted again: Ray
  cleans up the dead driver's job (within a bound); the resubmission resumes training from the last checkpoint
  committed before the kill, into the same MLflow job run, logs every training step exactly once and
  scores every committed checkpoint exactly once (one eval run, one point per depth, one done record);
- the disk fills while a checkpoint is copied to storage (a real ENOSPC from the kernel: the
  checkpoint's trainer state on storage is a symlink to /dev/full): the job exits 1 and its last word
  is one line naming the cause and the place, also the trial's `stars.failure` tag; the checkpoint
  before it still loads, and the half-written one is neither committed nor scored. A full local disk
  while rank 0 saves the checkpoint before the copy is the same one line;
- `resources.env_vars` reach every process of a run started here (shown by the killed driver's job
  above): the driver (its MLflow run's `stars.git_sha` comes from $STARS_GIT_SHA), the Ray Train
  controller, the training workers and the evaluators (each read from /proc/<pid>/environ), and their
  values are not printed; inside a submitted job, whose runtime env carries them already, none is set
  twice (which `ray.init` refuses).

The drivers that are killed, fail or are probed run as real `python -m stars.run` processes joined to
the module's Ray (`RAY_ADDRESS`); the resubmission after the kill runs in the test's own process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stars.checkpoint import TRAINER_STATE, load_checkpoint, load_trainer_state, step_dir_name, step_of
from stars.ray_backend.job import run_job
from stars.ray_backend.ledger import RAY_RUN_SNAPSHOT, EvalLedger, committed_checkpoints
from stars.ray_backend.sweep import TRIAL_DONE
from stars.ray_backend.training import run_dir_for
from stars.spec import resolve_spec, resolved_yaml
from stars.tracking import Tracker

DRIVER_START_TIMEOUT_S = 120  # imports, joining Ray, Ray Train's first report on a busy 2-core machine
CLEANUP_TIMEOUT_S = 60


def _driver(spec_file: Path, ray_cluster, log: Path) -> subprocess.Popen:
    """`python -m stars.run spec_file` in its own process, joined to the test's Ray; output to `log`."""
    # unbuffered: a driver killed with SIGKILL leaves every line it printed in the log
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "stars.run", str(spec_file)], cwd=spec_file.parent,
                                env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _committed_steps(run_dir: str) -> list[int]:
    """Steps of the checkpoints the Ray Train controller has registered in its run snapshot (a
    reported checkpoint is resumable only once it is there)."""
    try:
        with open(os.path.join(run_dir, RAY_RUN_SNAPSHOT)) as f:
            results = json.load(f).get("checkpoint_results", [])
    except (OSError, ValueError):  # not written yet, or being rewritten
        return []
    return sorted(step_of(r["checkpoint_dir_name"]) for r in results)


def _wait_for(predicate, timeout_s: float, what: str, driver: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if driver is not None and driver.poll() is not None:
            pytest.fail(f"the driver exited ({driver.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _driver_job_id(pid: int) -> str | None:
    from ray._private import state

    return next((j["JobID"] for j in state.jobs() if j["DriverPid"] == pid), None)


def _job_cleaned_up(ray_cluster, job_id: str) -> bool:
    """The job is dead in the GCS, its actors are dead and its resources are free again. Ray Train's
    detached helpers (its state actor, autoscaling coordinator and placement-group cleaner) outlive
    the job by design and are not counted."""
    from ray._private import state

    if not any(j["JobID"] == job_id and j["IsDead"] for j in state.jobs()):
        return False
    if any(a["JobID"] == job_id and a["State"] != "DEAD" and not a["IsDetached"] for a in state.actors().values()):
        return False
    total, free = ray_cluster.cluster_resources(), ray_cluster.available_resources()
    return free.get("CPU", 0.0) >= total.get("CPU", 0.0)


def _eval_runs(client: MlflowClient, job_run_id: str) -> list:
    run = client.get_run(job_run_id)
    return client.search_runs([run.info.experiment_id], max_results=1000,
                              filter_string=f"tags.`mlflow.parentRunId` = '{job_run_id}' and tags.`stars.kind` = 'eval'")


@pytest.mark.ray
def test_a_sigkilled_driver_resubmitted_resumes_from_its_last_committed_checkpoint(
        ray_cluster, tiny_spec, tmp_path, monkeypatch):
    """The killed driver also shows that `resources.env_vars` reach every process of a run started
    here (one job for both: Ray Train's start-up is most of a tiny job's time)."""
    max_steps, every = 15, 5
    secret = "s3cr3t-value-never-printed"
    env_vars = {"STARS_PROBE": "yes", "STARS_PROBE_TOKEN": secret, "STARS_GIT_SHA": "probe-sha"}
    spec = resolve_spec(tiny_spec(**{"train.max_steps": max_steps, "train.checkpoint_every": every,
                                     "train.log_every": 1, "train.warmup_steps": 1, "resources.env_vars": env_vars}))
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(resolved_yaml(spec))
    run_dir = run_dir_for(spec)
    assert "STARS_PROBE" not in os.environ  # what the job's processes have comes from the spec

    first_log = tmp_path / "first.log"
    driver = _driver(spec_file, ray_cluster, first_log)
    seen: dict[str, str | None] = {}

    def probed_and_committed() -> bool:
        job_id = _driver_job_id(driver.pid)
        if job_id:
            _probe_job_processes(job_id, "STARS_PROBE", seen)
        return bool(_committed_steps(run_dir)) and len(seen) == len(PROCESS_KINDS)

    try:
        _wait_for(probed_and_committed, DRIVER_START_TIMEOUT_S, "a committed checkpoint", driver, first_log)
        job_id = _driver_job_id(driver.pid)
        driver.send_signal(signal.SIGKILL)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    assert job_id is not None, "the driver never registered with Ray"
    # Each kind of process the job ran had the variable, set from the spec; no value was printed.
    assert seen == dict.fromkeys(PROCESS_KINDS, "yes")
    assert secret not in first_log.read_text()
    _wait_for(lambda: _job_cleaned_up(ray_cluster, job_id), CLEANUP_TIMEOUT_S, "Ray to clean up the dead driver's job")
    committed_at_kill = _committed_steps(run_dir)  # nothing of the dead job writes any more
    assert committed_at_kill and max(committed_at_kill) < max_steps, committed_at_kill
    assert not (Path(run_dir) / TRIAL_DONE).exists()

    first_run = re.search(r"^\[stars\] MLflow run (\w+) ", first_log.read_text(), re.M).group(1)

    # The same spec again (in this process: the test's own Ray driver, which sets the spec's env_vars
    # here too; monkeypatch takes them away again afterwards).
    for name, value in env_vars.items():
        monkeypatch.setenv(name, value)
    result = run_job(spec, console=lambda line: None)
    assert not result.failed and result.trials[0].checkpoint_path.endswith(step_dir_name(max_steps))
    assert (Path(run_dir) / TRIAL_DONE).exists()

    # Training resumed from the last checkpoint committed before the kill, once, and trained every step once.
    final_state = load_trainer_state(result.trials[0].checkpoint_path)
    assert final_state["resumes"] == [max(committed_at_kill)], (final_state["resumes"], committed_at_kill)
    assert [s for s, _ in final_state["history"]] == list(range(1, max_steps + 1))

    # One MLflow job run, the killed driver's, reused; each training step logged once.
    tracker = Tracker(spec.tracking.uri, artifact_root=spec.tracking.artifact_location)
    client = tracker.client
    experiment = client.get_experiment_by_name(spec.experiment or spec.name)
    jobs = client.search_runs([experiment.experiment_id], filter_string="tags.`stars.kind` = 'job'")
    assert [r.info.run_id for r in jobs] == [first_run] == [result.job_run_id]
    assert jobs[0].info.status == "FINISHED"
    # The killed driver had the variables before it opened the job run ($STARS_GIT_SHA names the commit).
    assert jobs[0].data.tags["stars.git_sha"] == "probe-sha"
    job_run_id = result.job_run_id
    assert [s for s, _ in tracker.metric_history(job_run_id, "train/loss")] == list(range(1, max_steps + 1))

    # Every committed checkpoint scored once: one eval run each, one point per depth, one done record.
    ledger = EvalLedger(run_dir)
    checkpoints = list(range(every, max_steps + 1, every))
    assert ledger.done_steps("addition") == checkpoints
    eval_runs = _eval_runs(client, job_run_id)
    assert sorted(int(r.data.tags["stars.step"]) for r in eval_runs) == checkpoints
    for run in eval_runs:
        step = int(run.data.tags["stars.step"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "addition/acc")] == [1, 2, 3, 4], step
        assert ledger.done(step, "addition")["eval_run_id"] == run.info.run_id
    summary_steps = [s for s, _ in tracker.metric_history(job_run_id, "addition/peak_acc")]
    assert summary_steps == checkpoints


def _environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with (/proc/<pid>/environ)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone meanwhile
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


PROCESS_KINDS = ("TrainController", "RayTrainWorker", "Evaluator")


def _probe_job_processes(job_id: str, name: str, seen: dict[str, str | None]) -> None:
    """Record, for each kind of the job's actor processes alive now, the value of `name` in its environment."""
    from ray._private import state

    for actor in state.actors().values():
        kind = actor["ActorClassName"]
        if actor["JobID"] == job_id and actor["State"] == "ALIVE" and kind in PROCESS_KINDS and kind not in seen:
            environ = _environ_of(int(actor["Pid"]))
            if environ:
                seen[kind] = environ.get(name)


def test_a_submitted_job_sets_no_variable_its_runtime_env_sets_already(monkeypatch):
    """Inside a job submitted through the Jobs API the spec's variables are in the job's runtime env
    already (`stars.ray_backend.submit`); `ray.init` refuses a runtime env that sets one of them again."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from stars.ray_backend.cluster import JOB_CONFIG_ENV, _env_vars_to_add

    submitted = {"env_vars": {"OMP_NUM_THREADS": "1", "HF_TOKEN": "x"}, "working_dir": "gcs://job.zip"}
    spec_env = {"OMP_NUM_THREADS": "1", "STARS_PROBE": "yes"}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": submitted, "metadata": {}}))
    added = _env_vars_to_add(spec_env)
    assert added == {"STARS_PROBE": "yes"}
    assert _merge_runtime_env(submitted, {"env_vars": added}) is not None  # what ray.init does with it
    assert _merge_runtime_env(submitted, {"env_vars": spec_env}) is None  # all of them: refused
    monkeypatch.delenv(JOB_CONFIG_ENV)
    assert _env_vars_to_add(spec_env) == spec_env  # a run started here: all of them


def test_a_full_local_disk_while_saving_a_checkpoint_is_one_line_naming_it(tiny_spec, tmp_path):
    """Before Ray copies a checkpoint to storage, rank 0 writes it to a local scratch directory: a
    full disk there (a real ENOSPC: the task file is a symlink to /dev/full) is the same one line."""
    from stars.checkpoint import TASK_FILE, CheckpointWriteError
    from stars.train import train_loop

    spec = tiny_spec(**{"train.max_steps": 4, "train.checkpoint_every": 2})
    scratch = tmp_path / "scratch"
    (scratch / step_dir_name(4)).mkdir(parents=True)
    (scratch / step_dir_name(4) / TASK_FILE).symlink_to("/dev/full")
    with pytest.raises(CheckpointWriteError) as failed:
        train_loop(spec, checkpoint_root=scratch)
    assert str(failed.value) == (
        f"checkpoint {step_dir_name(4)} could not be written to {scratch}: no space left on device; the "
        "checkpoints committed before it are kept, and submitting the job again resumes from the last one")
    assert load_trainer_state(scratch / step_dir_name(2))["step"] == 2

@pytest.mark.ray
def test_a_full_disk_while_writing_a_checkpoint_ends_the_job_with_one_clear_line(ray_cluster, tiny_spec, tmp_path):
    every = 10
    spec = resolve_spec(tiny_spec(**{"train.max_steps": 3 * every, "train.checkpoint_every": every,
                                     "train.warmup_steps": 1}))
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(resolved_yaml(spec))
    run_dir = run_dir_for(spec)
    # The second checkpoint's trainer state lands on a full device: copying it to storage fails with ENOSPC.
    full = Path(run_dir) / step_dir_name(2 * every) / TRAINER_STATE
    full.parent.mkdir(parents=True)
    full.symlink_to("/dev/full")

    log = tmp_path / "driver.log"
    driver = _driver(spec_file, ray_cluster, log)
    try:
        driver.wait(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    output = log.read_text()
    assert driver.returncode == 1, output[-3000:]
    # The job's last word is one line naming the cause and the place (Ray's own log lines come before).
    reason = (f"checkpoint {step_dir_name(2 * every)} could not be written to {run_dir}: no space left on device; "
              "the checkpoints committed before it are kept, and submitting the job again resumes from the last one")
    ours = [line for line in output.splitlines() if line.startswith("[stars]")]
    assert ours[-2].startswith("[stars] job 'tiny' done in") and ours[-2].endswith(": 1 failed"), ours[-2:]
    assert ours[-1] == f"[stars]   t000: failed: {reason}"
    assert sum("no space left on device" in line for line in ours) == 1
    client = MlflowClient(spec.tracking.uri)
    (job,) = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id],
                                filter_string="tags.`stars.kind` = 'job'")
    assert job.info.status == "FAILED" and job.data.tags["stars.failure"] == reason

    # The checkpoint before still loads; the half-written one is neither committed nor scored.
    assert committed_checkpoints(run_dir) == [step_dir_name(every)]
    assert load_checkpoint(Path(run_dir) / step_dir_name(every), device="cpu").step == every
    assert EvalLedger(run_dir).done_steps("addition") == [every]
    assert not (Path(run_dir) / "eval" / step_dir_name(2 * every)).exists()
    assert [r.data.tags["stars.step"] for r in _eval_runs(client, job.info.run_id)] == [str(every)]
