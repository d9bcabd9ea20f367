"""The data section: the training tasks, their files and their capacity."""

from __future__ import annotations

import pytest

from stars.spec import addition_capacity, load_spec


def test_math_sft_defaults_match_the_paper_recipe(spec_of):
    spec = spec_of(model={"source": "ouro", "pretrained": "p"}, data={"task": "math_sft"})
    d = spec.data
    assert d.task == "math_sft"
    assert (d.problem_column, d.solution_column) == ("problem", "solution")
    assert (d.shuffle_seed, d.max_seq_len, d.length_policy) == (74, 2048, "drop")


def test_a_new_looplm_on_math_needs_a_tokenizer_and_long_enough_positions(problems_with):
    by_path = {pr.path: pr.message for pr in problems_with(data={"task": "math_sft", "max_seq_len": 512})}
    assert "required when model.source is 'looplm'" in by_path["data.tokenizer"]
    assert "must be >= 512" in by_path["model.max_position_embeddings"]


def test_addition_files_must_exist(tmp_path, monkeypatch, minimal, write, problems_of):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"num1": 1, "num2": 2}\n')
    spec = load_spec(write({**minimal, "data": {"task": "addition", "train_file": "train.jsonl"}}))
    assert spec.data.train_file == str(tmp_path / "train.jsonl")  # made absolute
    (problem,) = problems_of(write({**minimal, "data": {"task": "addition", "test_file": "nope.jsonl"}}))
    assert problem.path == "data.test_file" and "file not found: 'nope.jsonl'" in problem.message


def test_addition_asks_no_more_problems_than_exist(problems_with, spec_of):
    (problem,) = problems_with(data={"task": "addition", "digits": 1, "num_train": 100_000})
    assert problem.path == "data.num_train"
    assert "num_train + num_test = 101000" in problem.message and "only 81" in problem.message
    assert spec_of(data={"task": "addition", "digits": 1, "num_train": 71, "num_test": 10}).data.digits == 1
    (problem,) = problems_with(data={"task": "addition", "digits": 1, "num_train": 72, "num_test": 10})
    assert "82" in problem.message


def test_addition_capacity_is_what_the_task_generator_can_produce():
    addition = pytest.importorskip("stars.tasks.addition")
    for digits in (1, 2):
        cap = addition_capacity(digits)
        train, test = addition.split_problems(cap - 5, 5, digits=digits, seed=0)
        assert len(train) + len(test) == cap
        with pytest.raises(ValueError):
            addition.split_problems(cap - 4, 5, digits=digits, seed=0)


def test_addition_sequence_length_matches_the_task_tokenizer(spec_of):
    addition = pytest.importorskip("stars.tasks.addition")
    for digits in (1, 4, 7):
        spec = spec_of(data={"task": "addition", "digits": digits, "num_train": 10, "num_test": 5})
        assert spec.data.max_seq_len() == addition.AdditionTokenizer(digits).max_length
