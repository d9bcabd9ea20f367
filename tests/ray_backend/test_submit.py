"""`starsctl submit` for real: a subprocess in a fresh directory, its own embedded Ray, the default
local MLflow store (./mlflow.db), checkpoints under ./stars_runs."""

import re
import subprocess
import sys
import textwrap

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.ray

TINY_JOB = textwrap.dedent("""\
    name: tiny-submit
    model: {d_model: 32, n_heads: 2, d_ff: 64, n_block: 1, injection: add, max_position_embeddings: 24}
    data: {task: addition, digits: 2, num_train: 2000, num_test: 32}
    stars:
      loop_sampling: {kind: lognormal, mu: 1.0, sigma: 0.5, min: 1, max: 4}
      jsrr: {weight: 0.1, mode: vjp}
    train: {max_steps: 30, global_batch_size: 16, lr: 3.0e-3, warmup_steps: 2, checkpoint_every: 15, log_every: 5}
    resources: {num_workers: 1, cpus_per_worker: 1}
    eval: {tasks: [addition], depths: "1-4", limit: 32}
""")


def test_starsctl_submit_runs_the_job_into_the_local_store(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_JOB)
    proc = subprocess.run(
        [sys.executable, "-m", "stars.cli", "submit", "tiny.yaml", "--set", "train.max_steps=30"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[stars] job 'tiny-submit' done" in proc.stdout
    # an embedded run says where its dashboard is and how to log in to it (token auth is on)
    assert re.search(r"^Ray dashboard: http://127\.0\.0\.1:\d+$", proc.stdout, re.M), proc.stdout[:2000]
    assert re.search(r"^Ray dashboard token: .*`ray get-auth-token`", proc.stdout, re.M), proc.stdout[:2000]
    # the job ends with its final depth curve, as `starsctl compare` shows it
    table = proc.stdout[proc.stdout.index("addition/acc by depth"):].splitlines()
    assert table[1].split()[:5] == ["run", "1", "2", "3", "4"] and table[2].startswith("tiny-submit@30 ")
    assert (tmp_path / "mlflow.db").exists() and list((tmp_path / "stars_runs").glob("tiny-submit-*/step_0000030"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-submit")
    (job,) = client.search_runs([experiment.experiment_id], filter_string="tags.`stars.kind` = 'job'")
    assert job.info.status == "FINISHED"
    assert job.data.params["train.max_steps"] == "30" and job.data.params["model.d_model"] == "32"
    curve = client.get_metric_history(job.info.run_id, "train/loss")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [5, 10, 15, 20, 25, 30]
    artifacts = [a.path for a in client.list_artifacts(job.info.run_id, "spec")]
    assert "spec/resolved.yaml" in artifacts


def test_the_uploaded_spec_holds_no_secret_values(tiny_spec, tmp_path):
    """What travels in the job's working_dir leaves secret-looking env vars out (their values go
    through the runtime env only), and keeps the others."""
    from stars.ray_backend.submit import spec_for_upload
    from stars.spec import resolved_yaml

    spec = tiny_spec(**{"resources.env_vars": {"HF_TOKEN": "hf_s3cr3t", "OMP_NUM_THREADS": "2"}})
    uploaded = resolved_yaml(spec_for_upload(spec))
    assert "hf_s3cr3t" not in uploaded and "HF_TOKEN" not in uploaded
    assert "OMP_NUM_THREADS" in uploaded
    assert spec.resources.env_vars["HF_TOKEN"] == "hf_s3cr3t"  # the caller's spec is unchanged
