"""A job whose `resources.storage_path` is an `s3://` URI, against a local S3-compatible server
(moto) on 127.0.0.1: checkpoints, the evaluation ledger and the trial marker land in the bucket, and
a resubmission resumes from there (docs/architecture.md, "Remote storage")."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
from mlflow import MlflowClient

from stars.checkpoint import MODEL_DIR, TRAINER_STATE, load_trainer_state, step_dir_name
from stars.ray_backend.job import run_job
from stars.ray_backend.ledger import storage_filesystem
from stars.ray_backend.sweep import TRIAL_DONE

pytestmark = pytest.mark.ray

BUCKET = "stars-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every Ray process (the Ray Train controller, the evaluators, the workers) inherits the environment
# Ray was started with, and the session's Ray (`ray_cluster`) starts after collection: set it now, so
# pyarrow's S3 filesystem (which reads AWS_ENDPOINT_URL) reaches the local server everywhere.
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",
    "AWS_ACCESS_KEY_ID": "stars-test",
    "AWS_SECRET_ACCESS_KEY": "stars-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
for _name, _value in S3_ENV.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="module")
def s3_bucket():
    """A moto S3 server on 127.0.0.1 with an empty bucket; yields the boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    if endpoint != S3_ENV["AWS_ENDPOINT_URL"]:
        pytest.skip(f"AWS_ENDPOINT_URL is already set to {endpoint!r} in this environment")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(endpoint.rsplit(":", 1)[1]), verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def _objects(client, prefix: str) -> dict[str, tuple[str, object]]:
    """Key -> (ETag, LastModified) of every object under `prefix`: a rewritten object changes."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"]: (obj["ETag"], obj["LastModified"]) for page in pages for obj in page.get("Contents", [])}


def _keys(client, prefix: str) -> set[str]:
    return set(_objects(client, prefix))


def _trainer_state(fs_path: str) -> dict:
    """`trainer_state.pt` of a checkpoint on S3 (its path as Ray reports it: bucket/key, no scheme)."""
    fs, root = storage_filesystem(f"s3://{fs_path}")
    with tempfile.TemporaryDirectory() as tmp:
        with fs.open_input_stream(f"{root}/{TRAINER_STATE}") as src, open(f"{tmp}/{TRAINER_STATE}", "wb") as dst:
            dst.write(src.read())
        return load_trainer_state(tmp)


def test_job_on_s3_storage_checkpoints_scores_and_resumes_there(ray_cluster, s3_bucket, tiny_spec):
    import ray

    assert ray.get(ray.remote(lambda: os.environ.get("AWS_ENDPOINT_URL")).remote()) == os.environ[
        "AWS_ENDPOINT_URL"], "the session's Ray was started before this module set the S3 environment"
    spec = tiny_spec(**{"resources.storage_path": f"s3://{BUCKET}/runs", "resources.env_vars": dict(S3_ENV),
                        "train.max_steps": 4, "train.checkpoint_every": 2})
    quiet = {"console": lambda line: None}
    first = run_job(spec, **quiet)
    assert not first.failed
    (trial,) = first.trials
    assert trial.storage_dir.startswith(f"s3://{BUCKET}/runs/")
    run_prefix = trial.storage_dir.removeprefix(f"s3://{BUCKET}/") + "/"
    keys = _keys(s3_bucket, run_prefix)
    steps = (2, 4)
    for step in steps:
        ckpt = f"{run_prefix}{step_dir_name(step)}/"
        assert f"{ckpt}{TRAINER_STATE}" in keys
        assert any(k.startswith(f"{ckpt}{MODEL_DIR}/") for k in keys), f"no model files under {ckpt}"
        assert f"{run_prefix}eval/{step_dir_name(step)}/addition.done.json" in keys
    assert f"{run_prefix}{TRIAL_DONE}" in keys
    assert trial.checkpoint_path == f"{BUCKET}/{run_prefix}{step_dir_name(4)}"

    client = MlflowClient(spec.tracking.uri)
    eval_runs = client.search_runs(
        [client.get_run(first.job_run_id).info.experiment_id], filter_string="tags.`stars.kind` = 'eval'"
    )
    assert sorted(int(r.data.tags["stars.step"]) for r in eval_runs) == list(steps)
    for run in eval_runs:  # the depth curve of each checkpoint: accuracy at depths 1..4
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "addition/acc")) == [1, 2, 3, 4]

    # An eval-only change keeps the run's name (`stars.spec.spec_hash`): Ray Train restores the run from
    # the bucket, at its last checkpoint, and the job ends there: no step trained, no checkpoint
    # written or scored again.
    kept = {k: v for k, v in _objects(s3_bucket, run_prefix).items() if k.startswith((f"{run_prefix}step_",
                                                                                      f"{run_prefix}eval/"))}
    again = run_job(spec.model_copy(update={"eval": spec.eval.model_copy(update={"limit": 16})}), **quiet)
    assert not again.failed
    (resumed,) = again.trials
    assert resumed.storage_dir == trial.storage_dir and resumed.checkpoint_path == trial.checkpoint_path
    after = _objects(s3_bucket, run_prefix)
    assert {k: after.get(k) for k in kept} == kept
    assert not {k for k in after.keys() - kept.keys() if k.startswith(f"{run_prefix}step_")}
    state = _trainer_state(resumed.checkpoint_path)
    assert [s for s, _ in state["history"]] == list(range(1, 5))


def test_storage_that_cannot_be_written_is_one_line_before_any_trial_or_run(ray_cluster, s3_bucket, tiny_spec,
                                                                           monkeypatch):
    """A bucket that does not exist, then an S3 endpoint that does not answer: the job stops with one
    line naming `resources.storage_path` and the store's own reason, before an MLflow run is made or a
    trial trains (`stars.ray_backend.ledger.storage_problem`)."""
    from stars.ray_backend.job import UnrunnableSpecError

    quiet = {"console": lambda line: None}
    missing = tiny_spec(**{"resources.storage_path": "s3://no-such-bucket/runs"})
    with pytest.raises(UnrunnableSpecError) as err:
        run_job(missing, **quiet)
    assert str(err.value).startswith("resources.storage_path 's3://no-such-bucket/runs' cannot be written: ")
    assert "no-such-bucket" in str(err.value).split(": ", 1)[1] and "\n" not in str(err.value)

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    gone = tiny_spec(**{"resources.storage_path": f"s3://{BUCKET}/runs"})
    with pytest.raises(UnrunnableSpecError) as err:
        run_job(gone, **quiet)
    assert str(err.value).startswith(f"resources.storage_path 's3://{BUCKET}/runs' cannot be written: ")
    assert "connect" in str(err.value).lower() and "\n" not in str(err.value)
    client = MlflowClient(gone.tracking.uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
