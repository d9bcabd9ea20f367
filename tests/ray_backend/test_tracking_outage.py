"""A job whose MLflow server (a real `mlflow server` on 127.0.0.1) goes away while it trains.

- Killed mid-training and started again 30 s later: the job finishes, every training step is in
  MLflow exactly once, steps were logged while the server was down (training did not wait), and every
  checkpoint's depth curve is there.
- Never back: the job still finishes; the steps MLflow did not take are in the run's journal next to
  the checkpoints, and `starsctl sync` uploads all of them, once.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stars.ray_backend.job import run_job
from stars.tracking import Tracker, find_journals, journal_status

from ..tracking.conftest import RestartableMlflowServer

pytestmark = pytest.mark.ray

OUTAGE_S = 30.0


@pytest.fixture
def server(tmp_path):
    srv = RestartableMlflowServer(tmp_path / "mlflow")
    srv.root.mkdir()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def journal_lines(storage: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in find_journals(storage)) if storage.exists() else 0


def stop_server_once_logging(server: RestartableMlflowServer, storage: Path, restart_after: float | None, out: dict) -> None:
    """Stop the server once training has logged a few steps; start it again `restart_after` s later."""
    deadline = time.monotonic() + 300
    while journal_lines(storage) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    out["down_at_ms"] = time.time() * 1000  # SIGTERM goes out now; it may take the server a while to exit
    server.stop()
    if restart_after is None:
        return
    time.sleep(restart_after)
    out["up_at_ms"] = time.time() * 1000
    server.start()


def train_steps(tracker: Tracker, run: str) -> list[int]:
    return sorted(m.step for m in tracker.client.get_metric_history(run, "train/loss"))


def test_mlflow_killed_mid_training_and_back_30s_later_loses_nothing(ray_cluster, tiny_spec, server, tmp_path):
    storage = tmp_path / "runs"
    # ~15 s of training on an idle 2-core machine (128 sequences a step), so it overlaps the outage.
    spec = tiny_spec(**{"train.max_steps": 400, "train.global_batch_size": 128, "train.log_every": 5,
                        "train.checkpoint_every": 100, "tracking.uri": server.url, "tracking.artifact_location": None})
    out: dict = {}
    chaos = threading.Thread(target=stop_server_once_logging, args=(server, storage, OUTAGE_S, out), daemon=True)
    chaos.start()
    lines: list[str] = []
    result = run_job(spec, console=lines.append)
    chaos.join(timeout=120)
    assert "up_at_ms" in out, "the job ended before the outage was over; make it longer"
    assert not result.failed
    tracker = Tracker(server.url)
    assert train_steps(tracker, result.job_run_id) == list(range(5, 401, 5))  # every step, once
    history = tracker.client.get_metric_history(result.job_run_id, "train/loss")
    logged_while_down = [m.step for m in history if out["down_at_ms"] < m.timestamp < out["up_at_ms"]]
    assert len(logged_while_down) >= 2, "training waited for the server instead of going on"
    evals = tracker.child_runs(result.job_run_id, kind="eval")
    assert sorted(int(r.data.tags["stars.step"]) for r in evals) == [100, 200, 300, 400]
    for run in evals:  # every checkpoint's depth curve, once per depth
        assert sorted(m.step for m in tracker.client.get_metric_history(run.info.run_id, "addition/acc")) == [1, 2, 3, 4]
    assert tracker.client.get_run(result.job_run_id).info.status == "FINISHED"


def test_mlflow_that_never_returns_leaves_every_step_on_disk_for_sync(ray_cluster, tiny_spec, server, tmp_path,
                                                                      monkeypatch):
    # The driver's own calls to a dead server give up after one quick retry instead of minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    storage = tmp_path / "runs"
    spec = tiny_spec(**{"train.max_steps": 120, "train.log_every": 4, "train.checkpoint_every": 60,
                        "tracking.uri": server.url, "tracking.artifact_location": None,
                        "tracking.flush_timeout_s": 3.0, "eval.tasks": []})
    out: dict = {}
    chaos = threading.Thread(target=stop_server_once_logging, args=(server, storage, None, out), daemon=True)
    chaos.start()
    lines: list[str] = []
    result = run_job(spec, console=lines.append)
    chaos.join(timeout=60)
    assert "down_at_ms" in out and not result.failed
    (journal,) = find_journals(storage)
    status = journal_status(journal)
    assert status.run_id == result.job_run_id and status.last_step == 120 and status.unsent_lines > 0
    assert any("WARNING: MLflow" in line and "unreachable" in line for line in lines), lines
    server.start()
    sync = subprocess.run([sys.executable, "-m", "stars.cli", "sync", str(storage)], capture_output=True, text=True,
                          timeout=120)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert f"{status.unsent_lines} step(s) sent to run {result.job_run_id}" in sync.stdout
    assert train_steps(Tracker(server.url), result.job_run_id) == list(range(4, 121, 4))
