"""MLflow tracking with explicit run ids: a real local store, and one real tracking server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from stars.evaluation import depth_table_csv, summary_metrics
from stars.spec import JobSpec, resolve_spec, spec_hash, sweep_trials
from stars.tracking import (
    TAG_KIND,
    TAG_PARENT,
    TAG_RUN_KEY,
    TRAIN_METRICS,
    Tracker,
    eval_run_name,
    git_info,
    log_task_eval,
    ray_job_id,
    resolve_tracking_uri,
)

BASE = {"name": "trk", "data": {"task": "addition"}, "train": {"max_steps": 100}}
GIT = ("0123abc", False)


def make_spec(root: Path, **sections) -> JobSpec:
    data = json.loads(json.dumps(BASE))
    data.update(sections)
    return resolve_spec(JobSpec.model_validate(data), cwd=root)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One sqlite store for the module (creating its tables takes seconds)."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def tracker(store) -> Tracker:
    return Tracker(f"sqlite:///{store}/mlflow.db", artifact_root=str(store / "mlruns"))


def read_artifact(tracker: Tracker, run_id: str, path: str) -> str:
    local = tracker.client.download_artifacts(run_id, path)
    return Path(local).read_text()


# --------------------------------------------------------------------------------------- pure
def test_eval_run_name():
    assert eval_run_name(1200) == "eval@step=1200"


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://example:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"


def test_ray_job_id_from_a_ray_job_environment(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_42"}}))
    assert ray_job_id() == "raysubmit_42"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if "ray" not in sys.modules:
        assert ray_job_id() is None


def test_git_info(monkeypatch):
    monkeypatch.setenv("STARS_GIT_SHA", "feedbeef")
    assert git_info() == ("feedbeef", None)
    monkeypatch.delenv("STARS_GIT_SHA")
    sha, _ = git_info(Path(__file__).parent)
    assert sha is None or len(sha) == 40


# --------------------------------------------------------------------------------- local store
def test_job_run_has_flattened_params_tags_and_the_resolved_spec(tracker, store, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_7"}}))
    spec = make_spec(store, name="job-a", resources={"env_vars": {"HF_TOKEN": "hf_topsecret"}}, tracking={"tags": {"team": "x"}})
    run_id = tracker.start_job(spec, git=GIT)
    run = tracker.client.get_run(run_id)
    assert run.info.run_name == "job-a"
    assert tracker.client.get_experiment(run.info.experiment_id).name == "job-a"
    assert run.data.params["train.lr"] == "0.0003"
    assert run.data.params["model.norm.position"] == "post_sandwich"
    assert run.data.params["resources.env_vars.HF_TOKEN"] == "<redacted>"
    assert "hf_topsecret" not in json.dumps(run.data.params)
    tags = run.data.tags
    assert tags["stars.spec_hash"] == spec_hash(spec)
    assert tags["stars.git_sha"] == "0123abc" and tags["stars.git_dirty"] == "false"
    assert tags["stars.ray_job_id"] == "raysubmit_7"
    assert tags["team"] == "x" and tags[TAG_KIND] == "job"
    assert tags[TAG_RUN_KEY] == f"job-a@{spec_hash(spec)}"
    text = read_artifact(tracker, run_id, "spec/resolved.yaml")
    assert "hf_topsecret" not in text
    saved = yaml.safe_load(text)
    assert saved["resources"]["env_vars"] == {"HF_TOKEN": "<redacted>"}
    saved["resources"]["env_vars"]["HF_TOKEN"] = "hf_topsecret"
    assert JobSpec.model_validate(saved) == spec
    assert run.info.artifact_uri.startswith((store / "mlruns").as_uri())


def test_a_restarted_job_reuses_its_run(tracker, store):
    spec = make_spec(store, name="job-b")
    first = tracker.start_job(spec, git=GIT)
    tracker.end(first, "FAILED")
    again = tracker.start_job(spec, git=GIT)
    assert again == first
    assert tracker.client.get_run(again).info.status == "RUNNING"
    other = tracker.start_job(make_spec(store, name="job-b", seed=1), git=GIT)
    assert other != first  # a different spec is a different run
    fresh = tracker.start_job(spec, git=GIT, reuse=False)
    assert fresh != first


def test_without_a_sweep_the_job_run_is_the_trial_run(tracker, store):
    spec = make_spec(store, name="job-c")
    job = tracker.start_job(spec, git=GIT)
    (trial,) = sweep_trials(spec)
    assert tracker.start_trial(job, trial) == job
    assert tracker.child_runs(job) == []


def test_sweep_trials_are_child_runs_found_again_on_restart(tracker, store):
    spec = make_spec(store, name="job-d", sweep={"grid": {"model.norm.type": ["layernorm", "rmsnorm"], "seed": [0, 1]}})
    job = tracker.start_job(spec, git=GIT)
    trials = sweep_trials(spec)
    run_ids = [tracker.start_trial(job, t) for t in trials]
    assert len(set(run_ids)) == 4 and job not in run_ids
    children = tracker.child_runs(job, kind="trial")
    assert {c.info.run_id for c in children} == set(run_ids)
    first = tracker.client.get_run(run_ids[1])
    assert first.data.tags[TAG_PARENT] == job
    assert first.info.run_name == f"job-d/{trials[1].key}"
    assert first.data.params["model.norm.type"] == "layernorm" and first.data.params["seed"] == "1"
    assert first.data.tags["stars.spec_hash"] == spec_hash(trials[1].spec)
    assert first.data.tags["stars.git_sha"] == "0123abc"
    assert [tracker.start_trial(job, t) for t in trials] == run_ids  # restart: no duplicates
    assert len(tracker.child_runs(job)) == 4


def test_a_stopped_job_ends_what_it_left_running_and_a_restart_reopens_it(tracker, store):
    """A job interrupted mid-sweep: its trials still RUNNING (one mid-evaluation) end KILLED, a finished
    trial keeps FINISHED; restarting the trial marks its run RUNNING again."""
    spec = make_spec(store, name="job-stop", sweep={"grid": {"model.norm.type": ["layernorm", "rmsnorm", "simplenorm"]}})
    job = tracker.start_job(spec, git=GIT)
    done, cut, scoring = (tracker.start_trial(job, t) for t in sweep_trials(spec))
    tracker.end(done)
    evaluation = tracker.start_eval(scoring, 10)
    finished_eval = tracker.start_eval(done, 10)
    tracker.end(finished_eval)
    assert sorted(tracker.close_open_descendants(job, "KILLED")) == sorted([cut, scoring, evaluation])
    status = {r: tracker.client.get_run(r).info.status for r in (done, cut, scoring, evaluation, finished_eval, job)}
    assert status == {done: "FINISHED", cut: "KILLED", scoring: "KILLED", evaluation: "KILLED",
                      finished_eval: "FINISHED", job: "RUNNING"}  # the job run is the caller's to end
    assert tracker.close_open_descendants(job, "KILLED") == []
    assert tracker.start_trial(job, sweep_trials(spec)[1]) == cut
    assert tracker.client.get_run(cut).info.status == "RUNNING"


def test_training_metrics_at_optimizer_steps(tracker, store):
    run = tracker.start_job(make_spec(store, name="job-e"), git=GIT)
    for step in (10, 20, 30):
        tracker.log_train_step(
            run, step, {"loss": 3.0 / step, "ce": 2.0, "jsrr": 0.5, "depth": 5, "lr": 1e-3, "tokens_per_s": 1e4}
        )
    tracker.log_metrics(run, {"train/loss": 0.01, "skipped": None}, step=40)
    assert tracker.metric_history(run, "train/loss") == [(10, 0.3), (20, 0.15), (30, 0.1), (40, 0.01)]
    logged = set(tracker.client.get_run(run).data.metrics)
    assert set(TRAIN_METRICS) <= logged and "skipped" not in logged


def test_eval_runs_log_depth_curves_and_the_trial_gets_summaries(tracker, store, tmp_path):
    trial = tracker.start_job(make_spec(store, name="job-f"), git=GIT)
    acc = {d: min(1.0, d / 4) for d in range(1, 17)}
    curves = {"addition/acc": acc, "dyn/hidden_norm": {d: 10.0 + d for d in acc}, "dyn/rho": {4: 0.9}}
    table = tmp_path / "depth_curves.csv"
    table.write_text(depth_table_csv(curves))
    for step in (500, 1000):
        ev = tracker.start_eval(trial, step)
        log_task_eval(tracker, ev, trial, step=step, curves=curves, summary=summary_metrics("addition", acc),
                      files=[table])
        tracker.end(ev)
    evals = tracker.child_runs(trial, kind="eval")
    assert sorted(r.info.run_name for r in evals) == ["eval@step=1000", "eval@step=500"]
    ev500 = next(r for r in evals if r.info.run_name == "eval@step=500")
    assert ev500.data.tags[TAG_PARENT] == trial and ev500.data.tags["stars.step"] == "500"
    curve = tracker.metric_history(ev500.info.run_id, "addition/acc")
    assert [d for d, _ in curve] == list(range(1, 17)) and curve[0] == (1, 0.25)
    assert tracker.metric_history(ev500.info.run_id, "dyn/rho") == [(4, 0.9)]
    assert read_artifact(tracker, ev500.info.run_id, "depth_curves.csv").startswith("depth,addition/acc,dyn/hidden_norm")
    assert tracker.metric_history(trial, "addition/peak_acc") == [(500, 1.0), (1000, 1.0)]
    assert tracker.metric_history(trial, "addition/drop_at_16") == [(500, 0.0), (1000, 0.0)]
    assert tracker.start_eval(trial, 500) == ev500.info.run_id  # re-evaluating reuses the run


def test_batches_larger_than_the_store_accepts_are_split_by_mlflow(tracker, store):
    """`Tracker` hands whole lists to `MlflowClient.log_batch`, which chunks them (<= 1000 metrics,
    <= 100 params/tags per store call); a store call over those limits would be rejected."""
    run = tracker.start_job(make_spec(store, name="job-h"), git=GIT)
    tracker.log_params(run, {f"extra.p{i}": i for i in range(250)})
    tracker.set_tags(run, {f"extra.t{i}": i for i in range(250)})
    tracker.log_metrics(run, {f"m/{i}": float(i) for i in range(1500)}, step=1)
    ev = tracker.start_eval(run, 1)
    log_task_eval(tracker, ev, run, step=1, curves={f"t{i}/acc": {d: 0.5 for d in range(1, 17)} for i in range(80)},
                  summary={"t0/peak_acc": 0.5})
    data = tracker.client.get_run(run).data
    assert data.params["extra.p249"] == "249" and data.tags["extra.t249"] == "249"
    assert len([k for k in data.metrics if k.startswith("m/")]) == 1500
    assert len(tracker.metric_history(ev, "t79/acc")) == 16  # 80 x 16 = 1280 points in one call


def test_runs_are_safe_to_use_from_another_tracker(tracker, store):
    """What a Ray worker does: a fresh client, only the run id."""
    run = tracker.start_job(make_spec(store, name="job-g"), git=GIT)
    worker = Tracker(tracker.uri)
    worker.log_train_step(run, 1, {"loss": 1.5})
    assert tracker.metric_history(run, "train/loss") == [(1, 1.5)]


# --------------------------------------------------------------------------------- HTTP server
@pytest.fixture
def mlflow_server(tmp_path, mlflow_server_runner):
    """A plain `mlflow server` (SQLite store, served artifacts) on 127.0.0.1 (tests/tracking/conftest.py)."""

    def args(port: int) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")]

    with mlflow_server_runner(args, {}, tmp_path / "server.log") as url:
        yield url


def test_tracking_server_over_http(mlflow_server, tmp_path):
    spec = make_spec(tmp_path, name="http-job", tracking={"uri": mlflow_server})
    assert spec.tracking.uri == mlflow_server and spec.tracking.artifact_location is None
    tracker = Tracker.from_spec(spec)
    job = tracker.start_job(spec, git=GIT)
    tracker.log_train_step(job, 5, {"loss": 0.5, "lr": 1e-3})
    ev = tracker.start_eval(job, 5)
    log_task_eval(tracker, ev, job, step=5, curves={"addition/acc": {1: 0.5, 2: 1.0}},
                  summary={"addition/peak_acc": 1.0})
    assert tracker.start_job(spec, git=GIT) == job
    assert tracker.metric_history(job, "train/loss") == [(5, 0.5)]
    assert tracker.metric_history(ev, "addition/acc") == [(1, 0.5), (2, 1.0)]
    assert tracker.metric_history(job, "addition/peak_acc") == [(5, 1.0)]
    assert yaml.safe_load(read_artifact(tracker, job, "spec/resolved.yaml"))["name"] == "http-job"
    assert tracker.client.get_run(ev).data.tags[TAG_PARENT] == job
