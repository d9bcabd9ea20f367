"""The eval section: tasks that fit the training task."""

from __future__ import annotations


def test_eval_tasks_must_fit_the_training_task(problems_with):
    (problem,) = problems_with(eval={"tasks": ["addition", "gsm8k"]})
    assert problem.path == "eval.tasks[1]" and "math benchmark" in problem.message


def test_benchmark_paths_name_math_benchmarks_only(problems_with):
    (problem,) = problems_with(eval={"benchmark_paths": {"gsm9k": "/data/x.jsonl"}})
    assert problem.path.startswith("eval.benchmark_paths") and "gsm8k" in problem.message
