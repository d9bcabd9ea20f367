"""The Ray dashboard of a job: its URL and login printed by every run, live metrics, and what a browser
sees on it.

- Without Ray: the lines every run prints (`dashboard_lines`), and `stars.train`'s live-metrics hook.
- `ray`, on the session's cluster: `TrainMetrics` / `EvalMetrics` read back from the node's Prometheus
  export endpoint with their tags.
- `ray`, on a head of its own (`start_head`: token auth with a token of its own, ended by `stop_head`):
  a submitted job with two evaluators, seen in headless Chromium (Debian's, driven by Playwright) on
  the dashboard's pages after logging in with the token, refused without it; and the job's training
  and evaluation metrics as Prometheus scrapes them from the head.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stars.ray_backend.jobs_api import dashboard_lines
from stars.ray_backend.local_cluster import LocalHead, cluster_processes, next_steps
from stars.train import TrainHooks, WorkerContext, train_loop

#: Long enough to be running all through the checks (the head is stopped at the end); a checkpoint
#: every 10 steps, so both evaluators get work early.
JOB = textwrap.dedent("""\
    name: dashjob
    model: {{d_model: 32, n_heads: 2, d_ff: 64, n_block: 1, injection: add, max_position_embeddings: 24}}
    data: {{task: addition, digits: 2, num_train: 2000, num_test: 32}}
    stars:
      loop_sampling: {{kind: lognormal, mu: 1.0, sigma: 0.5, min: 1, max: 4}}
      jsrr: {{weight: 0.1, mode: vjp}}
    train: {{max_steps: 100000, global_batch_size: 16, lr: 3.0e-3, warmup_steps: 2, checkpoint_every: 10,
            log_every: 5}}
    resources: {{num_workers: 1, cpus_per_worker: 1, storage_path: {root}/runs}}
    eval: {{tasks: [addition], depths: "1-2", limit: 8, workers: 2, resources: {{cpus: 0.5}}}}
    tracking: {{enabled: false}}
""")
EVALUATORS = ("stars-eval-dashjob-0", "stars-eval-dashjob-1")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# ------------------------------------------------------------------------------- without Ray
def test_every_run_prints_the_dashboard_and_how_to_log_in(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t0k3n\n")
    url = "http://127.0.0.1:8265"
    embedded = dashboard_lines(url, token_auth=True)
    assert embedded[0] == f"Ray dashboard: {url}"
    assert "`ray get-auth-token` prints it (it is in ~/.ray/auth_token)" in embedded[1]
    assert "t0k3n" not in "".join(embedded)  # where the token is, never the token
    submitted = dashboard_lines(url, token_auth=True, job_id="stars-x-1")
    assert submitted == [f"Ray dashboard: {url}/#/jobs/stars-x-1", embedded[1]]
    assert dashboard_lines(url, token_auth=False) == [embedded[0]]
    head = LocalHead(str(tmp_path), 1, [], url, 6379, None, 0.0)
    assert next_steps(head).splitlines()[-2:] == embedded  # `starsctl cluster up`: the same two lines


def test_rank_0_publishes_every_logged_step_even_those_already_in_mlflow(tiny_spec, tmp_path):
    """Live metrics are not deduplicated against MLflow (a resumed run logs there only new steps), and
    only rank 0 publishes."""
    spec = tiny_spec(**{"train.max_steps": 6, "train.log_every": 2, "train.checkpoint_every": None})
    published: dict[int, dict[str, float]] = {}
    logged: list[int] = []
    hooks = TrainHooks(console=lambda line: None, last_logged_step=lambda: 4,
                       log_metrics=lambda m, step: logged.append(step),
                       publish_metrics=lambda m, step: published.setdefault(step, m))
    train_loop(spec, hooks=hooks, checkpoint_root=tmp_path / "a")
    assert sorted(published) == [2, 4, 6] and logged == [6]
    assert {"train/loss", "train/tokens_per_s", "train/depth"} <= set(published[6])
    other: list[int] = []
    train_loop(spec, WorkerContext(rank=1), TrainHooks(console=lambda line: None,
                                                       publish_metrics=lambda m, step: other.append(step)),
               checkpoint_root=tmp_path / "b")
    assert other == []


# ------------------------------------------------------------------------------- reading metrics
@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(targets: list[str]) -> list[Sample]:
    """Every sample the Prometheus endpoints `host:port` export now (unreachable ones skipped)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = []
    for target in targets:
        try:
            text = urllib.request.urlopen(f"http://{target}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            samples += [Sample(s.name, dict(s.labels), s.value) for s in family.samples]
    return samples


def wait_for_samples(targets: Callable[[], list[str]], wanted: Callable[[list[Sample]], bool],
                     timeout_s: float) -> list[Sample]:
    """Scrape until `wanted(samples)` (Ray exports what workers record every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(targets())
        if wanted(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1)


def values(samples: list[Sample], name: str, **labels: str) -> list[float]:
    return [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]


@pytest.mark.ray
def test_published_metrics_carry_their_tags_and_gauges_stay(ray_cluster):
    """Read back from the node's Prometheus endpoint, and again when Ray would have dropped a gauge set
    only once (two export intervals, 20 s)."""
    from stars.ray_backend.metrics import EVAL_METRICS, TRAIN_METRICS

    ray = ray_cluster
    job = f"metrics-{uuid.uuid4().hex[:6]}"  # apart from any other series of the session
    trial = f"{job}-0123456789"

    @ray.remote(num_cpus=0)
    class Publisher:  # a long-lived process, like rank 0 and the evaluators
        def publish(self, job: str, trial: str) -> float:
            from stars.ray_backend.metrics import EvalMetrics, TrainMetrics

            TrainMetrics(job, trial).publish({"train/loss": 1.5, "train/tokens_per_s": 900.0,
                                              "train/depth": 3.0, "train/lr": 1e-3}, 7)
            evaluator = EvalMetrics(job, "stars-eval-x-0")
            evaluator.unit_scored(trial, "addition", 2.0)
            evaluator.unit_scored(trial, "addition", 2.5)
            evaluator.set_backlog(trial, 3)
            return time.monotonic()

    publisher = Publisher.remote()
    published = ray.get(publisher.publish.remote(job, trial))
    node = next(n for n in ray.nodes() if n["Alive"])
    target = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
    unit = {"job": job, "trial": trial, "actor": "stars-eval-x-0", "task": "addition"}
    try:
        samples = wait_for_samples(lambda: [target], lambda s: bool(values(s, "ray_stars_eval_backlog", job=job)), 60)
        assert values(samples, "ray_stars_train_loss", job=job, trial=trial) == [1.5]
        assert values(samples, "ray_stars_train_tokens_per_s", job=job, trial=trial) == [900.0]
        assert values(samples, "ray_stars_train_depth", job=job, trial=trial) == [3.0]
        assert values(samples, "ray_stars_train_step", job=job, trial=trial) == [7.0]
        assert values(samples, "ray_stars_eval_checkpoints_scored_total", **unit) == [2.0]
        assert values(samples, "ray_stars_eval_seconds_per_unit", **unit) == [2.5]
        assert values(samples, "ray_stars_eval_backlog", job=job, trial=trial) == [3.0]
        ours = {re.sub(r"^ray_|_total$", "", s.name) for s in samples if s.labels.get("job") == job}
        assert ours == {*TRAIN_METRICS, *EVAL_METRICS}  # what the module names, nothing else (no train/lr)

        time.sleep(max(0.0, published + 40 - time.monotonic()))
        later = scrape([target])
        assert values(later, "ray_stars_train_loss", job=job, trial=trial) == [1.5]
        assert values(later, "ray_stars_eval_backlog", job=job, trial=trial) == [3.0]
    finally:
        ray.kill(publisher)


# ------------------------------------------------------------------------------- a head of its own
@dataclass
class RunningJob:
    address: str
    token: str
    temp_dir: Path
    submission_id: str
    run_name: str
    submit_output: str
    env: dict[str, str]
    """Environment of a client of the head (address, token auth, the head's token)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(**extra: str) -> dict[str, str]:
    """This environment without Ray's or MLflow's settings (the session may have run `ray.init`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def api_get(job: RunningJob, path: str) -> Any:
    request = urllib.request.Request(job.address + path, headers={"Authorization": f"Bearer {job.token}"})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def train_runs(job: RunningJob) -> list[dict[str, Any]]:
    """The Ray Train runs in the dashboard's Train API (an error until the first run registers)."""
    try:
        return api_get(job, "/api/train/v2/runs/v1")["train_runs"]
    except (urllib.error.HTTPError, ValueError):
        return []


def alive_actor_names(job: RunningJob) -> set[str]:
    try:
        result = api_get(job, "/api/v0/actors?limit=1000")["data"]["result"]["result"]
    except urllib.error.HTTPError:  # the state API can time out while the head is busy starting the job
        return set()
    return {a["name"] for a in result if a["state"] == "ALIVE"}


@pytest.fixture(scope="module")
def running_job(tmp_path_factory):
    """A token-auth head with the dashboard job running: its Train run registered and both evaluators
    alive. No MLflow: not what is checked here, and it would only add to the start-up."""
    from stars.ray_backend.local_cluster import start_head, stop_head
    from stars.ray_backend.training import run_name_for
    from stars.spec import load_spec

    root = tmp_path_factory.mktemp("dash")
    temp = Path(tempfile.mkdtemp(prefix="sd", dir="/tmp"))  # short: Ray's socket paths live under it
    token = secrets.token_hex(16)
    with pytest.MonkeyPatch.context() as patch:  # the head's own token, not ~/.ray/auth_token
        for var in [v for v in os.environ if v.startswith("RAY_")]:
            patch.delenv(var)
        patch.setenv("RAY_AUTH_TOKEN", token)
        head = start_head(temp, num_cpus=4, dashboard_port=free_port())
    try:
        spec_file = root / "dashjob.yaml"
        spec_file.write_text(JOB.format(root=root))
        env = client_env(RAY_ADDRESS=head.dashboard_url, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        submitted = subprocess.run([sys.executable, "-m", "stars.cli", "submit", str(spec_file)], env=env, cwd=root,
                                   capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        job = RunningJob(head.dashboard_url, token, temp, submitted.stdout.split()[1],
                         run_name_for(load_spec(spec_file)), submitted.stdout, env)
        deadline = time.monotonic() + 150
        while not (train_runs(job) and set(EVALUATORS) <= alive_actor_names(job)):
            assert time.monotonic() < deadline, subprocess.run(
                [sys.executable, "-m", "stars.cli", "logs", job.submission_id], env=env, capture_output=True,
                text=True).stdout[-3000:]
            time.sleep(2)
        yield job
    finally:
        _, pids = stop_head(temp, grace_s=5)
        left = cluster_processes(head)
        shutil.rmtree(temp, ignore_errors=True)
        assert pids and not left


@pytest.mark.ray
def test_the_job_its_train_run_and_evaluators_are_named_in_ray_state(running_job):
    job = running_job
    assert f"Ray dashboard: {job.address}/#/jobs/{job.submission_id}" in job.submit_output
    assert "Ray dashboard token: the dashboard asks for the cluster's auth token" in job.submit_output
    (run,) = [r for r in train_runs(job) if r["name"] == job.run_name]  # Ray Train's state, by our name
    assert run["status"] in ("INITIALIZING", "SCHEDULING", "RUNNING")
    assert run["run_settings"]["train_loop_config"]["worker"].startswith("WorkerConfig(run_dir=")  # not the spec
    code = ("import json, sys\nfrom ray.util.state import list_actors\n"
            "print(json.dumps({a.actor_id: [a.class_name, a.name, a.repr_name, a.state] "
            "for a in list_actors(address=sys.argv[1], detail=True, limit=1000)}))")
    listed = subprocess.run([sys.executable, "-c", code, job.address], env=job.env, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr[-2000:]
    actors = json.loads(listed.stdout)
    by_name = {name: (cls, rep, state) for cls, name, rep, state in actors.values() if name}
    for name in EVALUATORS:  # named, and the repr (the dashboard's Repr column, their log prefix) too
        assert by_name[name] == ("Evaluator", name, "ALIVE")
    assert actors[run["controller_actor_id"]][0::3] == ["TrainController", "ALIVE"]


def chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.mark.ray
def test_a_browser_logs_in_with_the_token_and_sees_the_job_by_name(running_job):
    """Headless Chromium: without the token the dashboard shows its login dialog and its APIs answer
    401; a wrong token is refused; with the token (the dialog sets Ray's cookie) the Jobs page lists the
    job, its page names the Train run's validation tasks, the Actors page lists both evaluators, and
    the Train API names the run."""
    browser_path = chromium()
    if browser_path is None:
        pytest.skip(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}; Debian: apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    job = running_job
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
            page.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)

            page.goto(f"{job.address}/#/actors")
            dialog = page.get_by_role("dialog", name="Authentication Token Required")
            expect(dialog).to_be_visible()
            assert EVALUATORS[0] not in page.inner_text("body")
            for path in ("/api/v0/actors", "/api/jobs/", "/api/train/v2/runs/v1"):
                assert page.request.get(job.address + path).status == 401, path

            token_box = dialog.get_by_role("textbox", name="Authentication Token")
            token_box.fill("not-the-token")
            dialog.get_by_role("button", name=re.compile("submit", re.I)).click()
            expect(dialog.get_by_text("Invalid authentication token")).to_be_visible()
            token_box.fill(job.token)
            dialog.get_by_role("button", name=re.compile("submit", re.I)).click()
            expect(page.get_by_role("dialog", name="Authentication Token Required")).to_have_count(0)
            cookies = {c["name"]: c for c in page.context.cookies()}
            assert cookies["ray-authentication-token"]["httpOnly"]

            page.goto(f"{job.address}/#/actors")
            for name in EVALUATORS:
                expect(page.get_by_text(name, exact=True).first).to_be_visible()

            page.goto(f"{job.address}/#/jobs")
            row = page.get_by_role("row").filter(has_text=job.submission_id)
            expect(row).to_contain_text("dashjob")  # the Name column: the job_name metadata
            expect(row).to_contain_text("RUNNING")

            page.goto(f"{job.address}/#/jobs/{job.submission_id}")
            page.get_by_text("Task Table", exact=True).click()
            # The table shows 10 tasks a page and the evaluators' score tasks outnumber the validations:
            # filter by name as a user would.
            page.get_by_role("combobox", name="Name", exact=True).first.fill(f"validate {job.run_name}")
            expect(page.get_by_text(f"validate {job.run_name}").first).to_be_visible(timeout=60_000)

            response = page.goto(f"{job.address}/api/train/v2/runs/v1")
            assert response is not None and response.status == 200
            runs = json.loads(page.inner_text("body"))["train_runs"]
            assert [r["name"] for r in runs] == [job.run_name]
        finally:
            browser.close()


@pytest.mark.ray
def test_the_jobs_training_and_evaluation_metrics_reach_prometheus(running_job):
    """What Prometheus scrapes from the head (the targets Ray writes for its service discovery):
    rank 0's training gauges and the evaluators' counters, tagged with the job and the Train run."""
    job = running_job
    discovery = job.temp_dir / "session_latest" / "prom_metrics_service_discovery.json"

    def targets() -> list[str]:
        return [t for group in json.loads(discovery.read_text()) for t in group["targets"]]

    tags = {"job": "dashjob", "trial": job.run_name}

    def complete(samples: list[Sample]) -> bool:
        scored = {s.labels.get("actor") for s in samples
                  if s.name == "ray_stars_eval_checkpoints_scored_total" and tags.items() <= s.labels.items()}
        return bool(values(samples, "ray_stars_train_step", **tags)) and bool(scored) \
            and bool(values(samples, "ray_stars_eval_backlog", **tags))

    samples = wait_for_samples(targets, complete, 120)
    assert complete(samples), sorted({s.name for s in samples if s.name.startswith("ray_stars")})
    (step,) = values(samples, "ray_stars_train_step", **tags)
    assert step >= 5 and step % 5 == 0  # logged every 5 optimizer steps
    assert values(samples, "ray_stars_train_loss", **tags)[0] > 0
    assert values(samples, "ray_stars_train_tokens_per_s", **tags)[0] > 0
    assert 1 <= values(samples, "ray_stars_train_depth", **tags)[0] <= 4
    scored = [s for s in samples if s.name == "ray_stars_eval_checkpoints_scored_total"
              and tags.items() <= s.labels.items()]
    assert {s.labels["actor"] for s in scored} <= set(EVALUATORS) and {s.labels["task"] for s in scored} == {"addition"}
    for sample in scored:  # whichever evaluators scored: how many, and how long the last one took
        assert sample.value >= 1
        assert values(samples, "ray_stars_eval_seconds_per_unit", actor=sample.labels["actor"], task="addition",
                      **tags)[0] > 0
    assert values(samples, "ray_stars_eval_backlog", **tags)[0] >= 0
