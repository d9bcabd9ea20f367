"""A job on Ray reports to a real tracking server over HTTP: PostgreSQL backend store, artifacts
uploaded through the server's artifact proxy (the setup of cluster/mlflow/, fixtures in conftest.py)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stars.ray_backend.job import run_job

pytestmark = pytest.mark.ray

STEPS = (3, 6)  # checkpoints of the tiny job below
DEPTHS = [1, 2, 3, 4]


def files_under(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def test_a_job_reports_to_the_tracking_server_over_http(
    ray_cluster, mlflow_postgres_server, postgres_cluster, tiny_spec, tmp_path, monkeypatch
):
    server = mlflow_postgres_server
    monkeypatch.chdir(tmp_path)  # a stray local store (./mlflow.db, ./mlruns) would show up here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    hf_token = "hf_" + secrets.token_hex(12)
    spec = tiny_spec(**{
        "name": "http-job",
        "train.max_steps": STEPS[-1], "train.checkpoint_every": STEPS[0], "train.log_every": 2,
        "eval.depths": f"{DEPTHS[0]}-{DEPTHS[-1]}",
        "resources.env_vars": {"HF_TOKEN": hf_token},
        "tracking.uri": server.url, "tracking.artifact_location": None,  # the server's default root
    })
    result = run_job(spec, console=lambda line: None)
    assert not result.failed and result.tracking_uri == server.url

    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("http-job")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # uploads go through the proxy
    (job,) = client.search_runs([experiment.experiment_id], filter_string="tags.`stars.kind` = 'job'")
    assert job.info.run_id == result.job_run_id and job.info.status == "FINISHED"
    assert job.data.params["train.max_steps"] == str(STEPS[-1]) and job.data.params["model.d_model"] == "32"
    assert job.data.params["resources.env_vars.HF_TOKEN"] == "<redacted>"
    loss = client.get_metric_history(job.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == [2, 4, 6]

    evals = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`stars.kind` = 'eval' and tags.`mlflow.parentRunId` = '{job.info.run_id}'",
    )
    assert sorted(int(r.data.tags["stars.step"]) for r in evals) == list(STEPS)
    for run in evals:
        acc = client.get_metric_history(run.info.run_id, "addition/acc")
        assert sorted(m.step for m in acc) == DEPTHS and all(0.0 <= m.value <= 1.0 for m in acc)

    # Artifacts landed in the server's artifacts destination, uploaded over HTTP, not in a local store.
    stored = files_under(server.artifacts_destination)
    spec_file = f"{experiment.experiment_id}/{job.info.run_id}/artifacts/spec/resolved.yaml"
    assert spec_file in stored
    downloaded = Path(client.download_artifacts(job.info.run_id, "spec/resolved.yaml", str(tmp_path / "dl")))
    assert downloaded.read_text() == stored[spec_file].read_text()
    for run in evals:
        assert f"{experiment.experiment_id}/{run.info.run_id}/artifacts/addition/addition.csv" in stored
    assert not any((tmp_path / name).exists() for name in ("mlruns", "mlflow.db"))

    # The secret reached the job only as an env var: not in the server's params, tags or artifacts.
    [(job_params,)] = postgres_cluster.execute(
        "SELECT count(*) FROM params WHERE run_uuid = %(run)s", "mlflow", {"run": job.info.run_id})
    assert job_params == len(job.data.params) > 0  # the query sees what the server stored
    [(leaks,)] = postgres_cluster.execute(
        "SELECT (SELECT count(*) FROM params WHERE value LIKE %(s)s) + (SELECT count(*) FROM tags WHERE value LIKE %(s)s)",
        "mlflow", {"s": f"%{hf_token}%"})
    assert leaks == 0
    assert not [name for name, path in stored.items() if hf_token.encode() in path.read_bytes()]
