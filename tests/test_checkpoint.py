"""The checkpoint layout: what the trainer writes is what evaluation and resume read, and the trainer
state is loaded without unpickling arbitrary objects."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from stars.checkpoint import (
    MODEL_DIR,
    TASK_FILE,
    TRAINER_STATE,
    CheckpointError,
    load_checkpoint,
    load_trainer_state,
    step_dir_name,
    step_of,
)
from stars.errors import UserError
from stars.spec import JobSpec
from stars.train import TrainHooks, train_loop


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The checkpoints of a 12-step tiny addition run (one every 6 steps), as `train_loop` writes them."""
    root = tmp_path_factory.mktemp("train")
    spec = JobSpec.model_validate({
        "name": "tiny", "seed": 0,
        "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_block": 1, "injection": "add",
                  "max_position_embeddings": 24},
        "data": {"task": "addition", "digits": 2, "num_train": 200, "num_test": 16, "seed": 0},
        "stars": {"loop_sampling": {"kind": "uniform", "min": 1, "max": 4}, "jsrr": {"weight": 0.1}},
        "train": {"max_steps": 12, "global_batch_size": 8, "lr": 3e-3, "checkpoint_every": 6, "log_every": 6},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(root / "runs")},
    })
    summary = train_loop(spec, hooks=TrainHooks(console=lambda line: None), checkpoint_root=root)
    return root, summary


def test_step_directory_names_round_trip(tmp_path):
    assert step_dir_name(120) == "step_0000120"
    assert step_of(tmp_path / step_dir_name(30)) == 30 and step_of(f"{tmp_path}/step_0000030/") == 30
    assert step_of(tmp_path) is None and step_of("step_12a") is None


def test_a_trainer_checkpoint_has_the_layout_and_its_state_loads_weights_only(trained):
    root, summary = trained
    ckpt = root / step_dir_name(12)
    assert summary.checkpoint_dir == str(ckpt)
    assert (ckpt / MODEL_DIR / "config.json").is_file() and (ckpt / TRAINER_STATE).is_file()
    assert json.loads((ckpt / TASK_FILE).read_text())["task"] == "addition"
    state = load_trainer_state(ckpt)  # weights_only=True: would raise on anything but plain data
    assert state["step"] == 12 and state["history"] == summary.history
    assert all(isinstance(h, tuple) for h in state["history"])
    assert state["resumes"] == [] and isinstance(state["depth"], int)
    assert set(state["optimizer"]) == {"state", "param_groups"} and state["scheduler"]["last_epoch"] == 12
    assert load_trainer_state(root / step_dir_name(6))["history"] == summary.history[:6]


def test_a_trainer_state_holding_an_arbitrary_object_is_refused(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (exec, ("import os; os.environ['STARS_PWNED'] = '1'",))

    ckpt = tmp_path / step_dir_name(1)
    ckpt.mkdir()
    torch.save({"step": 1, "payload": RunsCode()}, ckpt / TRAINER_STATE)
    with pytest.raises(CheckpointError, match="not loading it") as err:
        load_trainer_state(ckpt)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert "STARS_PWNED" not in os.environ  # nothing of the pickle ran


def test_load_checkpoint_reads_a_trainer_checkpoint_and_refuses_what_is_not_one(trained, tmp_path):
    root, _ = trained
    loaded = load_checkpoint(root / step_dir_name(6), "cpu")
    assert loaded.step == 6 and loaded.task["task"] == "addition" and not loaded.model.training
    bare = load_checkpoint(root / step_dir_name(6) / MODEL_DIR, "cpu")  # a bare model directory
    assert bare.step is None and bare.task == {}
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="has no text tokenizer"):
        loaded.tokenizer()  # addition checkpoints have none; math benchmarks need one
    assert issubclass(CheckpointError, UserError)
