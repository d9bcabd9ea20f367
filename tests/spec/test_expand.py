"""Sweeps: the grid's rules (checked with the JobSpec) and its expansion into trials."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from stars.spec import spec_hash, sweep_trials


def test_sweep_expands_to_trials_with_deterministic_keys(spec_of):
    spec = spec_of(
        stars={"loop_sampling": {"kind": "fixed", "depth": 4}},
        sweep={"grid": {"model.norm.position": ["pre", "post"], "model.norm.type": ["layernorm", "rmsnorm", "simplenorm"]}},
    )
    trials = sweep_trials(spec)
    assert len(trials) == spec.sweep.num_trials == 6
    assert [t.key for t in trials][:2] == ["t000-position=pre,type=layernorm", "t001-position=pre,type=rmsnorm"]
    combos = {(t.spec.model.norm.position, t.spec.model.norm.type) for t in trials}
    assert len(combos) == 6
    assert all(not t.spec.sweep.grid for t in trials)
    assert len({spec_hash(t.spec) for t in trials}) == 6
    assert sweep_trials(spec_of())[0].assignments == {}
    assert sweep_trials(spec_of())[0].key == "t000"


def test_sweep_paths_and_values_are_validated(write, problems_of):
    text = """\
name: t
data: {task: addition}
train: {max_steps: 10}
sweep:
  grid:
    model.norm.typ: [rmsnorm]
    train.lr: [0.1, -1]
    model.d_model: [66]
    name: [a]
    stars.loop_sampling:
      - {kind: fixed, depth: 4}
      - {kind: fixed, depth: 0}
"""
    by_path = {pr.path: pr for pr in problems_of(write(text))}
    assert "did you mean 'type'?" in by_path["sweep.grid['model.norm.typ']"].message
    assert by_path["sweep.grid['model.norm.typ']"].line == 6
    assert "expected a number > 0, got -1" in by_path["sweep.grid['train.lr'][1]"].message
    assert "sweep.grid['train.lr'][0]" not in by_path
    assert "makes model.n_heads invalid" in by_path["sweep.grid['model.d_model'][0]"].message
    assert "cannot be swept" in by_path["sweep.grid.name"].message
    assert by_path["sweep.grid['stars.loop_sampling'][1]"].line == 12


def test_invalid_grid_points_are_reported(spec_of):
    with pytest.raises(ValidationError, match=r"trial t003-d_model=96,n_heads=64: model.n_heads: must divide"):
        spec_of(sweep={"grid": {"model.d_model": [64, 96], "model.n_heads": [4, 64]}})  # 96 % 64 != 0


def test_a_checkpoint_job_cannot_sweep_architecture(write, problems_of):
    text = """\
name: t
model: {source: pretrained, pretrained: some/dir}
data: {task: addition}
train: {max_steps: 10}
sweep: {grid: {model.d_model: [64]}}
"""
    (problem,) = problems_of(write(text))
    assert problem.path == "sweep.grid['model.d_model'][0]"
    assert "comes from the checkpoint" in problem.message


NASTY_VALUES = ["../../x", "..", ".", "/etc", "a/b", "a\\b", "..\\..\\y", ".hidden", "x" * 400, "é/ü", "", "a b"]


@pytest.mark.parametrize("path", ["description", "resources.env_vars.K"])
def test_no_grid_value_can_leave_the_trial_directory(spec_of, path):
    spec = spec_of(sweep={"grid": {path: NASTY_VALUES, "train.lr": [0.1]}})
    keys = [t.key for t in sweep_trials(spec)]
    assert len(set(keys)) == len(keys) == len(NASTY_VALUES)
    for key in keys:
        assert "/" not in key and "\\" not in key and not key.startswith(".")
        assert ".." not in re.split(r"[/\\]", key)
        assert re.fullmatch(r"[A-Za-z0-9._=,+-]+", key), key
    name = path.rsplit(".", 1)[-1]
    assert keys[-1].startswith(f"t011-{name}=a_b,lr=0.1-")  # still readable, plus a hash of the original
