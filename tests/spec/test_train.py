"""The train section's rules, and batch sizes across train and resources."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("train", "path", "fragment"),
    [
        ({"max_steps": 10, "epochs": 1}, "train.max_steps", "exactly one"),
        ({"lr": 1e-3}, "train.max_steps", "neither is set"),
        ({"max_steps": 10, "warmup_steps": 10}, "train.warmup_steps", "must be < max_steps=10"),
        ({"max_steps": 10, "warmup_steps": 1, "warmup_fraction": 0.1}, "train.warmup_fraction", "not both"),
        ({"max_steps": 10, "precision": "fp16"}, "train.precision", "expected one of 'fp32', 'bf16'"),
        ({"max_steps": 10, "global_batch_size": 100, "micro_batch_size": 30}, "train.global_batch_size", "30 * 1"),
    ],
)
def test_train_rules(problems_with, train, path, fragment):
    problems = problems_with(train=train)
    assert any(pr.path == path and fragment in pr.message for pr in problems), problems


def test_global_batch_must_split_over_workers(problems_with, spec_of):
    (problem,) = problems_with(resources={"num_workers": 3})
    assert problem.path == "train.global_batch_size"
    assert "divisible by resources.num_workers=3, got 128" in problem.message
    spec = spec_of(train={"max_steps": 5, "global_batch_size": 256, "micro_batch_size": 2}, resources={"num_workers": 32})
    assert spec.grad_accum_steps == 4


def test_bf16_precision_runs_without_gpus(spec_of):
    assert spec_of(train={"max_steps": 5, "precision": "bf16"}).train.precision == "bf16"
