"""Cluster jobs from `starsctl`: submit / status / logs / stop / list through the Ray Jobs API, and
`starsctl cluster up | down` for a head on this machine.

The `ray` tests start one real head for the module (`starsctl cluster up`: its own temp dir, free ports,
token auth with a token of its own in $RAY_AUTH_TOKEN) and end exactly its processes afterwards
(`starsctl cluster down`). The head runs this machine's Python, where `stars` is installed; jobs are
submitted with --ship-code anyway, the way a laptop sends its code. The other tests need no Ray.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from stars.errors import UserError
from stars.ray_backend.cluster_spec import remote_spec_problems, temporary_cwd_problems
from stars.ray_backend.jobs_api import (
    ClusterAccessError,
    is_loopback_address,
    jobs_address,
    token_problem,
)
from stars.ray_backend.submit import MissingForwardEnvError, prepare_submission
from stars.spec import JobSpec
from stars.tracking.params import flatten_params

ROOT = Path(__file__).resolve().parents[2]

#: Small enough for 2 busy cores: the cost is Ray and torch starting, not the steps.
JOB = textwrap.dedent("""\
    name: {name}
    model: {{d_model: 32, n_heads: 2, d_ff: 64, n_block: 1, injection: add, max_position_embeddings: 24}}
    data: {{task: addition, digits: 2, num_train: 2000, num_test: 32}}
    stars:
      loop_sampling: {{kind: lognormal, mu: 1.0, sigma: 0.5, min: 1, max: 4}}
      jsrr: {{weight: 0.1, mode: vjp}}
    train: {{max_steps: {steps}, global_batch_size: 16, lr: 3.0e-3, warmup_steps: 2, checkpoint_every: 10,
            log_every: 10}}
    resources:
      num_workers: 1
      cpus_per_worker: 1
      storage_path: {root}/runs
      forward_env: [STARS_TEST_API_TOKEN]
      env_vars: {{HF_TOKEN: {inline_secret}}}
    eval: {{tasks: []}}
    tracking: {{uri: "sqlite:///{root}/mlflow.db"}}
""")


def write_job(root: Path, name: str, steps: int, inline_secret: str = "hf_inline_not_secret_here") -> Path:
    path = root / f"{name}.yaml"
    path.write_text(JOB.format(name=name, steps=steps, root=root, inline_secret=inline_secret))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Ray's or MLflow's settings (a test session may have run `ray.init`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def starsctl(*args: str | Path, env: dict[str, str], cwd: Path | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stars.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def spec_of(**sections) -> JobSpec:
    """A minimal valid spec with whole sections given."""
    return JobSpec.model_validate({"name": "remote", "data": {"task": "addition"}, "train": {"max_steps": 10},
                                   **sections})


# --------------------------------------------------------------------------------- without Ray
def test_an_unreachable_address_is_one_line_and_exit_2(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there
    proc = starsctl("status", "stars-some-job", "--address", closed, env=clean_env())
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc) == [error_lines(proc)[0]] and f"cannot reach the Ray Jobs API at {closed}" in proc.stderr
    submit = starsctl("submit", write_job(tmp_path, "unreachable", 10), "--address", closed,
                      env=clean_env(STARS_TEST_API_TOKEN="x"))
    assert submit.returncode == 2 and "Traceback" not in submit.stderr
    assert error_lines(submit)[-1].startswith(f"cannot reach the Ray Jobs API at {closed}")


def test_cluster_status_and_down_when_no_head_is_up(tmp_path):
    """No head recorded: one line, exit 1. A recorded head whose processes all ended (its session is
    one that just exited): `status` says down, exit 1; `down` forgets it. A state file that is not one
    of ours: one line naming it, exit 2."""
    temp = tmp_path / "ray"
    temp.mkdir()
    proc = starsctl("cluster", "status", "--temp-dir", temp, env=clean_env())
    assert proc.returncode == 1 and error_lines(proc) == [
        f"no head started by starsctl is recorded in {temp} (`starsctl cluster up` starts one)"]

    ended = subprocess.Popen(["true"], start_new_session=True)  # a session id no process has any more
    ended.wait()
    state = temp / "stars_cluster.json"
    state.write_text(json.dumps({"temp_dir": str(temp), "session": ended.pid, "pids": [ended.pid],
                                 "dashboard_url": f"http://127.0.0.1:{free_port()}", "gcs_port": 6379,
                                 "num_cpus": 2, "started": time.time() - 60}))
    proc = starsctl("cluster", "status", "--temp-dir", temp, env=clean_env())
    assert proc.returncode == 1 and re.search(r"^head\s+down \(no process left\)$", proc.stdout, re.M), proc.stdout
    proc = starsctl("cluster", "down", "--temp-dir", temp, env=clean_env())
    assert proc.returncode == 0 and "had already ended; forgot it" in proc.stdout and not state.exists()

    state.write_text("not json")
    proc = starsctl("cluster", "status", "--temp-dir", temp, env=clean_env())
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert f"{state} is not a starsctl cluster state file" in proc.stderr


def test_a_head_that_answers_with_an_error_is_one_line_and_exit_1():
    """The cluster's own failure (here an HTTP server answering 500 to everything, as a sick head would):
    one line naming the address and Ray's error, exit 1, no traceback; the user's own mistakes are exit 2."""
    import http.server
    import threading

    class Failing(http.server.BaseHTTPRequestHandler):
        def _fail(self) -> None:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal error")

        do_GET = do_POST = _fail

        def log_message(self, *args) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        proc = starsctl("status", "stars-some-job", "--address", address,
                        env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t" * 32))
    finally:
        server.shutdown()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert error_lines(proc) == [f"starsctl: the Ray Jobs API at {address} failed: 500 Server Error: Internal "
                                 f"Server Error for url: {address}/api/version"]


def test_a_remote_address_with_a_local_store_is_refused_before_anything_is_sent(tmp_path):
    """A remote head: a sqlite store and a relative storage path are exit 2, all problems at once,
    before Ray is even imported."""
    job = write_job(tmp_path, "remote", 10)
    job.write_text(job.read_text().replace(f"storage_path: {tmp_path}/runs", "storage_path: ./runs"))
    code = ("import sys, runpy\n"
            f"sys.argv = ['starsctl', 'submit', {str(job)!r}, '--address', 'http://head.invalid:8265']\n"
            "try:\n    runpy.run_module('stars.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    print('@@', e.code, 'ray' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env(STARS_TEST_API_TOKEN="x"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("@@")[-1].split() == ["2", "False"], proc.stderr
    assert "tracking.uri 'sqlite:///" in proc.stderr and "is an MLflow store on one machine" in proc.stderr
    assert "resources.storage_path './runs' is a path relative to this machine" in proc.stderr
    assert "not submitted to http://head.invalid:8265 (2 problem(s) above)" in proc.stderr


@pytest.mark.parametrize(("dotted", "value", "refused"), [
    ("resources.storage_path", "./stars_runs", "resources.storage_path"),
    ("resources.storage_path", "~/stars_runs", "resources.storage_path"),
    ("resources.storage_path", "/mnt/shared/stars", None),  # absolute: a path on the cluster
    ("resources.storage_path", "s3://bucket/stars", None),
    ("tracking.uri", "sqlite:////abs/mlflow.db", "tracking.uri"),
    ("tracking.uri", "file:///abs/mlruns", "tracking.uri"),
    ("tracking.uri", "http://mlflow.internal:5000", None),
    ("tracking.artifact_location", "mlruns", "tracking.artifact_location"),
    ("eval.benchmark_paths", {"gsm8k": "bench/gsm8k.jsonl"}, "eval.benchmark_paths.gsm8k"),
    ("eval.benchmark_paths", {"gsm8k": "/data/gsm8k.jsonl"}, None),
])
def test_remote_rules_for_paths_and_stores(dotted, value, refused):
    section, key = dotted.split(".")
    base = {"resources": {"storage_path": "/mnt/shared/stars"}, "tracking": {"uri": "http://mlflow:5000"}}
    base.setdefault(section, {})[key] = value
    problems = remote_spec_problems(spec_of(**base), environ={})
    assert [p.split(" ")[0] for p in problems] == ([refused] if refused else [])


def test_names_that_exist_here_are_refused_for_a_remote_cluster_and_hub_ids_are_not(tmp_path):
    (tmp_path / "ckpt").mkdir()
    shared = {"resources": {"storage_path": "/mnt/shared/stars"}, "data": {"task": "math_sft"}}
    here = spec_of(model={"source": "ouro", "pretrained": "ckpt"}, **shared)
    hub = spec_of(model={"source": "ouro", "pretrained": "ByteDance/Ouro-1.4B"}, **shared)
    assert [p.split(" ")[0] for p in remote_spec_problems(here, environ={}, cwd=tmp_path)] == ["model.pretrained"]
    assert remote_spec_problems(hub, environ={}, cwd=tmp_path) == []


def test_a_forwarded_local_tracking_uri_is_refused_and_a_server_is_not():
    spec = spec_of(resources={"storage_path": "/mnt/shared/stars", "forward_env": ["MLFLOW_TRACKING_URI"]})
    local = remote_spec_problems(spec, environ={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    assert len(local) == 1 and local[0].startswith("MLFLOW_TRACKING_URI 'sqlite:///mlflow.db'")
    assert remote_spec_problems(spec, environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == []


def test_the_cluster_side_refuses_outputs_in_its_temporary_working_dir():
    spec = spec_of(resources={"storage_path": "./runs"})
    problems = temporary_cwd_problems(spec, environ={})
    assert [p.split(" ")[0] for p in problems] == ["resources.storage_path", "tracking.uri"]
    placed = spec_of(resources={"storage_path": "/mnt/shared/stars"})
    assert temporary_cwd_problems(placed, environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == []
    untracked = spec_of(resources={"storage_path": "/mnt/shared/stars"}, tracking={"enabled": False})
    assert temporary_cwd_problems(untracked, environ={}) == []


@pytest.mark.parametrize(("address", "loopback"), [
    ("http://127.0.0.1:8265", True), ("http://localhost:8265", True), ("http://[::1]:8265", True),
    ("http://10.0.0.10:8265", False), ("https://head.example:443", False),
])
def test_only_loopback_heads_count_as_this_machine(address, loopback):
    assert is_loopback_address(address) is loopback


def test_the_jobs_address_is_found_the_way_ray_finds_it(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.10:6379")  # a GCS address (what ray.init sets): not the Jobs API
    assert jobs_address(None, required=False) is None
    with pytest.raises(ClusterAccessError, match="no Ray cluster address"):
        jobs_address(None, required=True)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert jobs_address(None, required=True) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert jobs_address(None, required=True) == "http://api:8265"
    assert jobs_address("head:8265", required=True) == "http://head:8265"  # --address wins, http assumed
    with pytest.raises(ClusterAccessError, match="Ray Client"):
        jobs_address("ray://head:10001", required=True)


def test_a_refused_or_missing_token_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert "export RAY_AUTH_MODE=token" in token_problem("http://h:8265", refused=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    missing = token_problem("http://h:8265", refused=False)
    assert "none was found" in missing and all(w in missing for w in ("$RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                                                       "~/.ray/auth_token"))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    assert f"$RAY_AUTH_TOKEN_PATH={tmp_path / 'absent'} cannot be read" in token_problem("http://h:8265", refused=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    assert "refused the Ray auth token from $RAY_AUTH_TOKEN" in token_problem("http://h:8265", refused=True)


def test_secrets_travel_only_in_the_runtime_env(tiny_spec, tmp_path):
    """forward_env values and secret-looking env_vars: in the runtime env's env_vars, and nowhere in the
    uploaded spec, the job's metadata, its MLflow params or what `submit --dry-run` prints."""
    spec = tiny_spec(**{"resources.forward_env": ["STARS_TEST_API_TOKEN"],
                        "resources.env_vars": {"HF_TOKEN": "hf_inline_s3cr3t", "OMP_NUM_THREADS": "1"}})
    submission = prepare_submission(spec, environ={"STARS_TEST_API_TOKEN": "fwd_s3cr3t"})
    env_vars = submission.runtime_env["env_vars"]
    assert env_vars["STARS_TEST_API_TOKEN"] == "fwd_s3cr3t" and env_vars["HF_TOKEN"] == "hf_inline_s3cr3t"
    uploaded = yaml.safe_load(submission.spec_yaml)
    assert uploaded["resources"]["forward_env"] == ["STARS_TEST_API_TOKEN"]  # the name travels
    assert uploaded["resources"]["env_vars"] == {"OMP_NUM_THREADS": "1"}
    params = json.dumps(flatten_params(spec))
    for text in (submission.spec_yaml, json.dumps(submission.metadata), submission.submission_id,
                 submission.entrypoint, params):
        assert "fwd_s3cr3t" not in text and "hf_inline_s3cr3t" not in text
    with pytest.raises(MissingForwardEnvError, match="STARS_TEST_API_TOKEN is not set"):
        prepare_submission(spec, environ={})
    job = write_job(tmp_path, "dry", 10, inline_secret="hf_inline_s3cr3t")
    dry = starsctl("submit", job, "--dry-run", "--address", "http://127.0.0.1:9",
                   env=clean_env(STARS_TEST_API_TOKEN="fwd_s3cr3t"))
    assert dry.returncode == 0, dry.stderr
    assert yaml.safe_load(dry.stdout)["resources"]["forward_env"] == ["STARS_TEST_API_TOKEN"]
    assert "s3cr3t" not in dry.stdout + dry.stderr


def test_a_submission_names_its_spec_by_hash_and_its_code_by_git_sha(tiny_spec):
    """The job's identity on the cluster: metadata with the spec's name and hash (which a training
    change moves), the git sha of this checkout (also sent as STARS_GIT_SHA), and a submission id that
    starts with the name and the hash's first 8 characters."""
    from stars.spec import spec_hash
    from stars.tracking import git_info

    spec = tiny_spec()
    submission = prepare_submission(spec, environ={})
    digest = spec_hash(spec)
    assert re.fullmatch(r"[0-9a-f]{16,}", digest), digest
    assert submission.metadata["stars.name"] == submission.metadata["job_name"] == "tiny"
    assert submission.metadata["stars.spec_hash"] == digest
    assert submission.submission_id.startswith(f"stars-tiny-{digest[:8]}-")
    assert spec_hash(tiny_spec(**{"train.lr": 1e-3})) != digest
    sha, _ = git_info()
    assert sha and submission.metadata["stars.git_sha"] == sha == submission.runtime_env["env_vars"]["STARS_GIT_SHA"]
    assert prepare_submission(spec, environ={}).submission_id != submission.submission_id  # unique per submit


@pytest.mark.parametrize(("resources", "problem"), [
    ({"forward_env": ["HF-TOKEN"]}, "must be an environment variable name"),
    ({"forward_env": ["HF_TOKEN", "HF_TOKEN"]}, "names a variable twice"),
    ({"forward_env": ["HF_TOKEN"], "env_vars": {"HF_TOKEN": "x"}}, "is also set in resources.env_vars"),
])
def test_forward_env_names_are_checked(resources, problem):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=problem):
        spec_of(resources=resources)


def test_ship_code_without_a_cluster_is_a_user_error(tiny_spec):
    from stars.ray_backend.submit import submit

    with pytest.raises(UserError, match="--ship-code .* needs --address"):
        submit(tiny_spec(), ship_code=True)


# ------------------------------------------------------------------------------------ with Ray
@dataclass
class Head:
    address: str
    env: dict[str, str]
    """Environment of a client with $RAY_ADDRESS, RAY_AUTH_MODE=token and the head's token."""
    temp_dir: Path
    session: int


def session_processes(session: int) -> list[int]:
    out = subprocess.run(["ps", "-A", "-o", "pid=,sess=,stat="], capture_output=True, text=True).stdout
    return [int(pid) for pid, sess, stat in (line.split()[:3] for line in out.splitlines())
            if int(sess) == session and not stat.startswith("Z")]


@pytest.fixture(scope="module")
def head():
    temp = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))  # short: Ray's socket paths live under it
    port = free_port()
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    up = starsctl("cluster", "up", "--temp-dir", temp, "--num-cpus", "2", "--dashboard-port", port, env=env,
                  timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    address = f"http://127.0.0.1:{port}"
    assert f"export RAY_ADDRESS={address} RAY_AUTH_MODE=token" in up.stdout and "ray get-auth-token" in up.stdout
    session = json.loads((temp / "stars_cluster.json").read_text())["session"]
    yield Head(address, {**env, "RAY_ADDRESS": address}, temp, session)
    down = starsctl("cluster", "down", "--temp-dir", temp, "--grace", "5", env=env, timeout=120)
    leftover = session_processes(session)
    for pid in leftover:  # only ever this head's own processes
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)
    assert down.returncode == 0 and "processes ended" in down.stdout, down.stdout + down.stderr
    assert leftover == []


@dataclass
class LongJob:
    id: str
    root: Path


@pytest.fixture(scope="module")
def long_job(head, tmp_path_factory) -> LongJob:
    """A job of 100,000 steps, for `starsctl stop`. Requested by the first Ray test too, so that it
    trains while that one runs: one after the other, the two jobs' start-up costs a minute more."""
    root = tmp_path_factory.mktemp("long")
    job = write_job(root, "cluster-long", 100_000)
    proc = starsctl("submit", job, env={**head.env, "STARS_TEST_API_TOKEN": "x"}, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return LongJob(proc.stdout.split()[1], root)


def mlflow_job_run(root: Path, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`stars.kind` = 'job'")
    return client, run


@pytest.mark.ray
def test_a_submitted_job_succeeds_and_is_listed_logged_and_tracked(head, long_job, tmp_path):
    """The README's main job, `jobs/addition.yaml`, made tiny with `--set` (one trial: the sweep itself is
    tests/ray_backend/test_sweep.py's), submitted to the head and followed to its end."""
    tiny = {
        "name": "cluster-tiny", "experiment": "cluster-tiny", "sweep.variants": "{}",
        "model.d_model": 32, "model.n_heads": 2, "model.d_ff": 64, "model.n_block": 1,
        "data.digits": 2, "data.num_train": 2000, "data.num_test": 32,
        "train.max_steps": 20, "train.global_batch_size": 16, "train.warmup_steps": 2,
        "train.checkpoint_every": 10, "train.log_every": 10, "stars.jsrr.start_step": 0,
        "resources.storage_path": f"{tmp_path}/runs", "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
        "resources.forward_env": "[STARS_TEST_API_TOKEN]", "resources.env_vars": "{HF_TOKEN: hf_inline_s3cr3t}",
        "eval.tasks": "[]",
    }
    overrides = [arg for key, value in tiny.items() for arg in ("--set", f"{key}={value}")]
    env = {**head.env, "STARS_TEST_API_TOKEN": "fwd_s3cr3t"}
    proc = starsctl("submit", ROOT / "jobs" / "addition.yaml", *overrides, "--wait", "--ship-code", env=env,
                    cwd=tmp_path)  # the address: $RAY_ADDRESS
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = re.match(r"submitted (\S+) to " + re.escape(head.address), proc.stdout).group(1)
    assert "[stars] job 'cluster-tiny' done" in proc.stdout  # the logs, followed
    assert proc.stdout.rstrip().splitlines()[-1].startswith(f"job {job_id} SUCCEEDED")
    assert "s3cr3t" not in proc.stdout + proc.stderr

    logs = starsctl("logs", job_id, env=head.env)
    assert logs.returncode == 0 and "[stars] step 20/20" in logs.stdout
    followed = starsctl("logs", job_id, "--follow", env=head.env)  # an ended job: its logs, then its end
    assert followed.returncode == 0 and "[stars] step 20/20" in followed.stdout
    assert followed.stderr.strip().splitlines()[-1] == f"job {job_id} SUCCEEDED"
    listed = starsctl("list", env=head.env)
    assert re.search(rf"^{re.escape(job_id)}\s+SUCCEEDED\s+cluster-tiny\s", listed.stdout, re.M), listed.stdout
    status = starsctl("status", job_id, env=head.env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    assert f"{head.address}/#/jobs/{job_id}" in status.stdout

    client, run = mlflow_job_run(tmp_path, "cluster-tiny")
    assert run.info.status == "FINISHED" and run.data.tags["stars.ray_job_id"] == job_id
    shown_sha = re.search(r"^git sha\s+(\S+)", status.stdout, re.M)
    if shown_sha:  # submitted from a git checkout: the run carries the commit the job was submitted from
        assert run.data.tags["stars.git_sha"] == shown_sha.group(1)
    logged_spec = Path(client.download_artifacts(run.info.run_id, "spec/resolved.yaml", str(tmp_path))).read_text()
    assert "s3cr3t" not in json.dumps(run.data.params) + logged_spec
    uploaded = list(head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/job.yaml"))
    assert uploaded and all("s3cr3t" not in f.read_text() for f in uploaded)
    assert any("STARS_TEST_API_TOKEN" in f.read_text() for f in uploaded)


@pytest.mark.ray
def test_a_stopped_job_keeps_its_last_committed_checkpoint(head, long_job):
    from stars.checkpoint import load_checkpoint, load_trainer_state

    job_id, root = long_job.id, long_job.root
    deadline = time.monotonic() + 150
    snapshot: dict = {}
    while time.monotonic() < deadline and not snapshot.get("latest_checkpoint_result"):
        time.sleep(1)
        for path in (root / "runs").glob("cluster-long-*/checkpoint_manager_snapshot.json"):
            try:
                snapshot = json.loads(path.read_text())
            except ValueError:  # being written
                continue
    assert snapshot.get("latest_checkpoint_result"), starsctl("logs", job_id, env=head.env).stdout[-3000:]

    stopped = starsctl("stop", job_id, env=head.env)
    assert stopped.returncode == 0 and f"job {job_id} STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert "STOPPED" in starsctl("status", job_id, env=head.env).stdout
    again = starsctl("stop", job_id, env=head.env)
    assert again.returncode == 0 and "had already ended: STOPPED" in again.stdout

    (run_dir,) = (root / "runs").glob("cluster-long-*")
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    last = run_dir / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    step = int(last.name.removeprefix("step_"))
    loaded = load_checkpoint(last, device="cpu")
    assert loaded.step == step and load_trainer_state(last)["step"] == step
    assert mlflow_job_run(root, "cluster-long")[1].info.status == "KILLED"


@pytest.mark.ray
def test_wait_exits_1_when_the_job_fails(head, tmp_path):
    """A job that fails on the cluster (its checkpoint is nowhere: refused before its Ray Train starts)."""
    job = tmp_path / "broken.yaml"
    job.write_text(f"name: broken\nmodel: {{source: ouro, pretrained: /nowhere}}\ndata: {{task: addition}}\n"
                   f"train: {{max_steps: 10}}\nresources: {{storage_path: {tmp_path}/runs}}\n"
                   f"tracking: {{uri: 'sqlite:///{tmp_path}/mlflow.db'}}\n")
    proc = starsctl("submit", job, "--wait", env=head.env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "model.pretrained '/nowhere'" in proc.stdout  # the job's own error, in the followed logs
    failed = re.search(r"^job (\S+) FAILED after \d+ s", proc.stdout, re.M)
    assert failed, proc.stdout[-2000:]
    followed = starsctl("logs", failed.group(1), "-f", env=head.env)
    assert followed.returncode == 1 and "model.pretrained '/nowhere'" in followed.stdout
    assert followed.stderr.strip().splitlines()[-1] == f"job {failed.group(1)} FAILED"


@pytest.mark.ray
def test_a_missing_or_wrong_token_and_an_unknown_job_are_one_line_each(head):
    no_mode = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
    proc = starsctl("list", env=no_mode)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "export RAY_AUTH_MODE=token" in proc.stderr
    proc = starsctl("list", env={**head.env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert proc.returncode == 2 and "refused the Ray auth token from $RAY_AUTH_TOKEN" in proc.stderr
    proc = starsctl("status", "stars-no-such-job", env=head.env)
    assert proc.returncode == 2 and error_lines(proc) == [
        f"no job 'stars-no-such-job' on {head.address} (`starsctl list` shows its jobs)"]
    proc = starsctl("cluster", "status", "--temp-dir", head.temp_dir, env=head.env)
    assert proc.returncode == 0 and re.search(r"^head\s+up \(\d+ processes\)$", proc.stdout, re.M), proc.stdout
