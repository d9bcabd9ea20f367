"""The `data` section: the training task, a union on `task` (`addition` or `math_sft`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from stars.spec.base import MAX_SEED, Int, Section, cross_error, raise_all

__all__ = ["DEFAULT_SYSTEM_PROMPT", "AdditionData", "DataSpec", "MathSFTData", "addition_capacity"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant that can assist users with reasoning."


def addition_capacity(digits: int) -> int:
    """Distinct problems with two `digits`-digit operands: (9 * 10**(digits - 1))**2, ordered pairs
    (`stars.tasks.addition.generate_problems` draws operands from 10**(digits-1) .. 10**digits - 1)."""
    return (9 * 10 ** (digits - 1)) ** 2


def _check_file(value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    if not p.exists():
        raise ValueError(f"file not found: {value!r} (relative paths are relative to {os.getcwd()})")
    if not p.is_file():
        raise ValueError(f"not a file: {value!r}")
    return value


class AdditionData(Section):
    """The 4-digit addition diagnostic (docs/science.md, section 5): `1750+4733= 3846<eos>` with the
    answer reversed, character tokens (vocab 15), loss on the answer only."""

    task: Literal["addition"] = "addition"
    """Task selector."""
    digits: Int = Field(default=4, ge=1, le=9)
    """Digits per operand (operands are uniform `digits`-digit numbers)."""
    num_train: Int = Field(default=100_000, ge=1, le=10**9)
    """Generated training problems (ignored when `train_file` is given). Train and test are
    disjoint, so num_train + num_test must fit in the (9 * 10**(digits-1))**2 distinct problems."""
    num_test: Int = Field(default=1000, ge=1, le=10**7)
    """Generated held-out problems, all scored (ignored when `test_file` is given)."""
    seed: Int = Field(default=0, ge=0, le=MAX_SEED)
    """Seed of the generated problems (train and test are disjoint)."""
    train_file: str | None = None
    """Optional jsonl of training problems in the reference format (`num1`, `num2`, `sum`, ...).
    Must exist; relative paths are relative to the working directory."""
    test_file: str | None = None
    """Optional jsonl of test problems, same format. Must exist."""

    @field_validator("train_file", "test_file")
    @classmethod
    def _files_exist(cls, value: str | None) -> str | None:
        return _check_file(value)

    @model_validator(mode="after")
    def _fits(self) -> AdditionData:
        # the generator draws distinct problems and the training set excludes the test set: asking
        # for more than exist would fail (or loop) only once a worker builds the task
        capacity = addition_capacity(self.digits)
        generated = {"num_train": self.train_file is None, "num_test": self.test_file is None}
        asked = sum(getattr(self, name) for name, gen in generated.items() if gen)
        if asked > capacity:
            names = " + ".join(name for name, gen in generated.items() if gen)
            field = "num_train" if generated["num_train"] else "num_test"
            raise_all(
                "AdditionData",
                [
                    cross_error(
                        (field,),
                        f"{names} = {asked} distinct problems asked, but digits={self.digits} gives only "
                        f"{capacity} (train and test are disjoint)",
                        getattr(self, field),
                    )
                ],
            )
        return self

    def max_seq_len(self) -> int:
        """Length of the longest problem in tokens: 2 operands, '+', '=', space, digits+1, eos."""
        return 3 * self.digits + 5


class MathSFTData(Section):
    """Chat-format math supervised fine-tuning (docs/science.md, section 7): system prompt, user =
    problem, assistant = solution, loss on the assistant's tokens only."""

    task: Literal["math_sft"] = "math_sft"
    """Task selector."""
    dataset: str = "AI-MO/NuminaMath-1.5"
    """Hub dataset id, or a local path (a `save_to_disk` directory or a json/jsonl/parquet file)."""
    config: str | None = None
    """Dataset configuration name, if the dataset has several."""
    split: str = "train"
    """Dataset split."""
    problem_column: str = "problem"
    """Column holding the problem (the user turn)."""
    solution_column: str = "solution"
    """Column holding the solution (the assistant turn)."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """System prompt of every conversation (the paper's)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; null = the model checkpoint's (`model.pretrained`). Required
    when `model.source` is `looplm`."""
    num_samples: Int | None = Field(default=None, ge=1, le=10**9)
    """Keep the first N rows after dropping empty ones and shuffling; null = all (paper: 400000)."""
    shuffle_seed: Int = Field(default=74, ge=0, le=MAX_SEED)
    """Seed of the shuffle before taking `num_samples` (paper: 74)."""
    max_seq_len: Int = Field(default=2048, ge=8, le=1_048_576)
    """Longest tokenized conversation used in training."""
    length_policy: Literal["drop", "truncate"] = "drop"
    """What to do with longer conversations: `drop` them or `truncate` them to `max_seq_len`."""
    num_proc: Int = Field(default=1, ge=1, le=1024)
    """Processes for tokenization (datasets `map(num_proc=...)`)."""


DataSpec = Annotated[Union[AdditionData, MathSFTData], Field(discriminator="task")]  # noqa: UP007
"""The training task, selected by `task`."""
