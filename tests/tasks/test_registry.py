"""The task registry: every task the spec declares is registered, with the same requirements, and the
trainer and evaluator find tasks only through it."""

from __future__ import annotations

import typing

import pytest

from stars.errors import UserError
from stars.spec import EVAL_TASK_NEEDS, EVAL_TASKS, AdditionData, MathSFTData
from stars.tasks import (
    EvalInputError,
    GenerativeTask,
    TeacherForcedTask,
    eval_task,
    eval_task_names,
    training_task,
    training_task_names,
)
from stars.tasks.registry import TrainingTask, register


def test_the_spec_and_the_registry_declare_the_same_tasks():
    data_tasks = {typing.get_args(m.model_fields["task"].annotation)[0] for m in (AdditionData, MathSFTData)}
    assert set(training_task_names()) == data_tasks
    assert set(eval_task_names()) == set(EVAL_TASKS) == set(EVAL_TASK_NEEDS)
    for name in EVAL_TASKS:
        assert eval_task(name).trained_on == EVAL_TASK_NEEDS[name][0], name


def test_scoring_modes():
    assert isinstance(eval_task("addition"), TeacherForcedTask) and eval_task("addition").mode == "teacher_forced"
    for name in ("gsm8k", "math500", "asdiv", "svamp", "amc23"):
        assert isinstance(eval_task(name), GenerativeTask) and eval_task(name).max_new_tokens == 2048


def test_unknown_names_are_user_errors_listing_what_exists():
    with pytest.raises(EvalInputError, match="unknown task 'sudoku'; known tasks: addition, gsm8k"):
        eval_task("sudoku")
    with pytest.raises(UserError, match="data.task 'chess' has no training task; known: addition, math_sft"):
        training_task("chess")


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        register(TrainingTask("addition", build=lambda spec: None))


def test_training_data_of_the_addition_task_describes_its_held_out_set(tiny_spec):
    from stars.tasks.addition import held_out_problems

    spec = tiny_spec()
    data = training_task("addition").build(spec)
    assert data.vocab_size == 15 and data.tokenizer is None and len(data.train_data) == spec.data.num_train
    problems, tok = held_out_problems(data.description)
    train_keys = {(p.num1, p.num2) for p in data.train_data.problems}
    assert len(problems) == spec.data.num_test and not train_keys & {(p.num1, p.num2) for p in problems}
