"""Evaluation bookkeeping on run storage: the done-marker ledger, and the checkpoints Ray Train keeps
(read back from a real Ray Train run's snapshot through `ray.train.Result.from_path`)."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest

from stars.checkpoint import TASK_FILE, TRAINER_STATE, step_dir_name
from stars.ray_backend.ledger import RAY_RUN_SNAPSHOT, EvalLedger, committed_checkpoints


def test_ledger_records_done_units_and_lists_what_is_missing(tmp_path):
    ledger = EvalLedger(str(tmp_path / "run"))
    assert ledger.missing(10, ["addition", "gsm8k"]) == ["addition", "gsm8k"]
    ledger.mark_running(10, "addition", {"pid": 1})
    assert ledger.missing(10, ["addition"]) == ["addition"]  # running is not done
    ledger.mark_done(10, "addition", {"summary": {"addition/peak_acc": 1.0}})
    assert ledger.missing(10, ["addition", "gsm8k"]) == ["gsm8k"]
    assert ledger.done(10, "addition")["summary"] == {"addition/peak_acc": 1.0}
    assert ledger.running(10, "addition") == {"pid": 1}
    assert ledger.done_steps("addition") == [10]
    assert (tmp_path / "run" / "eval" / "step_0000010" / "addition.done.json").is_file()
    assert not list((tmp_path / "run" / "eval" / "step_0000010").glob("*.tmp-*"))  # atomic writes
    # a restarted job sees the same state through a new ledger
    assert EvalLedger(str(tmp_path / "run")).missing(10, ["addition"]) == []


def test_a_unit_handed_to_an_evaluator_is_in_flight_until_it_is_done(tmp_path):
    ledger = EvalLedger(str(tmp_path / "run"))
    assert ledger.in_flight([10, 20], ["addition", "gsm8k"]) == {}
    ledger.mark_queued(10, "addition", {"actor": "stars-eval-job-0"})
    ledger.mark_queued(20, "addition", {"actor": "stars-eval-job-1"})
    ledger.mark_queued(20, "gsm8k", {"actor": "stars-eval-job-0"})
    assert ledger.queued(20, "addition") == {"actor": "stars-eval-job-1"}
    assert sorted(ledger.in_flight([10, 20], ["addition", "gsm8k"])) == [(10, "addition"), (20, "addition"),
                                                                          (20, "gsm8k")]
    assert ledger.in_flight([20], ["addition"]) == {(20, "addition"): {"actor": "stars-eval-job-1"}}
    ledger.mark_done(10, "addition", {"summary": {}})  # scored: no longer in flight (the marker stays)
    ledger.clear_queued(20, "gsm8k")  # its call failed: forgotten, so the next dispatcher picks an actor
    ledger.clear_queued(20, "gsm8k")
    assert ledger.queued(10, "addition") is not None and ledger.queued(20, "gsm8k") is None
    assert EvalLedger(str(tmp_path / "run")).in_flight([10, 20], ["addition", "gsm8k"]) == {
        (20, "addition"): {"actor": "stars-eval-job-1"}}
    # the checkpoint's eval run, as the first dispatcher of one of its units recorded it
    assert ledger.eval_run(20) is None
    ledger.mark_eval_run(20, {"run_id": "abc", "status": "RUNNING"})
    assert EvalLedger(str(tmp_path / "run")).eval_run(20) == {"run_id": "abc", "status": "RUNNING"}
    assert ledger.done_steps("addition") == [10] and ledger.missing(20, ["addition", "gsm8k"]) == ["addition", "gsm8k"]


def test_ledger_treats_a_torn_done_marker_as_not_done(tmp_path):
    ledger = EvalLedger(str(tmp_path / "run"))
    marker = Path(ledger.dir_of(20)) / "addition.done.json"
    marker.parent.mkdir(parents=True)
    marker.write_text('{"summary": ')
    assert ledger.missing(20, ["addition"]) == ["addition"]


def _checkpoint_dirs(run: Path, steps) -> None:
    for s in steps:
        (run / step_dir_name(s)).mkdir(parents=True)
        (run / step_dir_name(s) / TASK_FILE).write_text("{}")
        (run / step_dir_name(s) / TRAINER_STATE).write_bytes(b"")


def test_without_a_ray_snapshot_committed_checkpoints_are_the_complete_step_directories(tmp_path):
    run = tmp_path / "run"
    _checkpoint_dirs(run, (20, 10, 30))
    (run / "step_0000040").mkdir()  # being written: no stars_task.json yet
    (run / "step_0000050").mkdir()  # cut short by a full disk: the task file but no trainer state
    (run / "step_0000050" / TASK_FILE).write_text("{}")
    (run / "eval").mkdir()
    assert committed_checkpoints(str(run)) == ["step_0000010", "step_0000020", "step_0000030"]
    assert committed_checkpoints(str(tmp_path / "no-such-run")) == []


def _report_three_checkpoints(config: dict) -> None:
    import ray.train

    for step in (1, 2, 3):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / TASK_FILE).write_text("{}")
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=step_dir_name(step))


@pytest.mark.ray
def test_committed_checkpoints_are_what_ray_train_keeps(ray_cluster, tmp_path):
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    trainer = TorchTrainer(
        _report_three_checkpoints,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ledger-run", storage_path=str(tmp_path),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    run = tmp_path / "ledger-run"
    assert (run / RAY_RUN_SNAPSHOT).is_file()
    _checkpoint_dirs(run, (99,))  # complete-looking, but not Ray's: the snapshot decides, not the listing
    assert committed_checkpoints(str(run)) == ["step_0000003"]  # 1 and 2 were pruned (num_to_keep=1)
    assert committed_checkpoints(str(run)) == [Path(result.checkpoint.path).name]

    # Ray rewrites the snapshot in place while a run trains: a read that catches it half written is
    # tried again, and one that never sees it whole raises
    snapshot = run / RAY_RUN_SNAPSHOT
    whole = snapshot.read_bytes()
    snapshot.write_bytes(whole[: len(whole) // 2])
    rewrite = threading.Timer(0.3, snapshot.write_bytes, args=(whole,))
    rewrite.start()
    try:
        assert committed_checkpoints(str(run)) == ["step_0000003"]
    finally:
        rewrite.join()
    snapshot.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointManagerInitializationError):
        committed_checkpoints(str(run))


def test_latest_summary_is_the_newest_checkpoint_with_every_task_scored(tmp_path):
    from stars.ray_backend.ledger import EvalLedger

    ledger = EvalLedger(str(tmp_path / "run"))
    assert ledger.latest_summary(["addition"]) == {}
    ledger.mark_done(10, "addition", {"summary": {"addition/peak_acc": 0.5}})
    ledger.mark_done(20, "addition", {"summary": {"addition/peak_acc": 0.9}})
    ledger.mark_done(10, "gsm8k", {"summary": {"gsm8k/peak_acc": 0.1}})
    assert ledger.latest_summary(["addition"]) == {"eval/step": 20.0, "addition/peak_acc": 0.9}
    # step 20 has no gsm8k yet: the newest step with both is 10
    assert ledger.latest_summary(["addition", "gsm8k"]) == {
        "eval/step": 10.0, "addition/peak_acc": 0.5, "gsm8k/peak_acc": 0.1}


def test_storage_problem_names_a_path_that_cannot_be_written(tmp_path):
    from stars.ray_backend.ledger import storage_problem

    assert storage_problem(str(tmp_path / "runs")) is None
    assert (tmp_path / "runs").is_dir() and list((tmp_path / "runs").iterdir()) == []  # the probe is removed
    (tmp_path / "file").write_text("not a directory")
    problem = storage_problem(str(tmp_path / "file" / "runs"))
    assert problem.startswith(f"resources.storage_path '{tmp_path}/file/runs' cannot be written: ")
    assert "\n" not in problem
