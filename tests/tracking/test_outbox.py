"""Training's metric journal (`stars.tracking.outbox`) against a real `mlflow server` on 127.0.0.1 that is
stopped and started again: logging never waits for the server, every step reaches MLflow exactly once
after an outage, what the server never took stays on disk, and `starsctl sync` (or a new outbox over
the same journal, as a restarted worker or resumed job makes) sends it, once, however often it runs.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from stars.tracking import MetricOutbox, Tracker, find_journals, journal_status

from .conftest import RestartableMlflowServer


@pytest.fixture(autouse=True)
def short_client_retries(monkeypatch):
    """MLflow's client retries a refused connection for minutes by default (7 retries, backoff 2 s..):
    correct in production, where the outbox thread can wait, but slow for a test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture
def server(tmp_path):
    srv = RestartableMlflowServer(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def new_run(url: str) -> tuple[Tracker, str]:
    tracker = Tracker(url)
    run = tracker.client.create_run(tracker.experiment_id("outbox")).info.run_id
    return tracker, run


def loss(step: int) -> float:
    return 10.0 / step


def assert_every_step_once(tracker: Tracker, run: str, last: int) -> None:
    history = tracker.client.get_metric_history(run, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, last + 1))  # each step once: no gap, no duplicate
    assert all(m.value == pytest.approx(loss(m.step)) for m in history)


def test_an_outage_never_stalls_logging_and_every_step_arrives_once(server, tmp_path):
    tracker, run = new_run(server.url)
    lines: list[str] = []
    outbox = MetricOutbox(tracker, run, tmp_path / "run" / "tracking", console=lines.append)
    for step in range(1, 21):
        outbox.log({"train/loss": loss(step), "train/lr": None}, step)
    server.stop()
    slowest = 0.0
    for step in range(21, 41):  # the server is gone: logging must not notice
        start = time.perf_counter()
        outbox.log({"train/loss": loss(step)}, step)
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.1)
    assert slowest < 0.05, f"log() waited {slowest:.3f} s for a dead server"
    server.start()
    assert outbox.close(timeout_s=60), lines
    assert_every_step_once(tracker, run, 40)
    assert any("unreachable" in line and str(outbox.journal) in line for line in lines), lines
    assert any("reachable again" in line for line in lines), lines
    assert outbox.last_step() == 40


def test_a_server_that_never_returns_leaves_the_metrics_on_disk_for_sync(server, tmp_path):
    tracker, run = new_run(server.url)
    journal_dir = tmp_path / "storage" / "job-abc" / "tracking"
    server.stop()
    lines: list[str] = []
    outbox = MetricOutbox(tracker, run, journal_dir, console=lines.append)
    for step in range(1, 31):
        outbox.log({"train/loss": loss(step)}, step)
    assert not outbox.close(timeout_s=2)
    warning = lines[-1]
    assert "did not take the last 30 logged step(s)" in warning and f"starsctl sync {journal_dir}" in warning
    (journal,) = find_journals(tmp_path / "storage")
    status = journal_status(journal)
    assert (status.run_id, status.tracking_uri, status.unsent_lines, status.last_step) == (run, server.url, 30, 30)

    def sync() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stars.cli", "sync", str(tmp_path / "storage")],
                              capture_output=True, text=True, timeout=120)

    down = sync()
    assert down.returncode == 1 and "NOT sent" in down.stdout, down.stdout + down.stderr
    server.start()
    first = sync()
    assert first.returncode == 0 and f"30 step(s) sent to run {run} at {server.url}" in first.stdout, first.stdout
    assert_every_step_once(tracker, run, 30)
    again = sync()
    assert again.returncode == 0 and "nothing left to send" in again.stdout
    # A crash between MLflow taking a batch and the offset being written: the batch goes again, and
    # MLflow stores each (key, value, timestamp, step) once.
    journal.with_suffix(".sent").write_text("0")
    assert sync().returncode == 0
    assert_every_step_once(tracker, run, 30)


def test_a_new_outbox_over_the_journal_sends_what_the_last_one_could_not(server, tmp_path):
    """A restarted training worker (or a resumed job) on the same storage: the unsent steps go first,
    and `last_step` tells it where logging stopped, server or no server."""
    tracker, run = new_run(server.url)
    server.stop()
    first = MetricOutbox(tracker, run, tmp_path / "tracking", console=lambda _: None)
    for step in range(1, 11):
        first.log({"train/loss": loss(step)}, step)
    assert not first.close(timeout_s=1)
    server.start()
    second = MetricOutbox(tracker, run, tmp_path / "tracking", console=lambda _: None)
    assert second.last_step() == 10
    for step in range(11, 16):
        second.log({"train/loss": loss(step)}, step)
    assert second.close(timeout_s=60)
    assert_every_step_once(tracker, run, 15)


def test_sync_refuses_a_path_without_journals(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stars.cli", "sync", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no metric journal" in result.stderr and "Traceback" not in result.stderr
