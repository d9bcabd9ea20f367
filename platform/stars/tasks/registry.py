"""The task registry: each task module registers, by name, what the trainer and the evaluator need of it.

Two kinds of entries:
- `TrainingTask`: a `data.task` of the job spec; `build(spec)` returns its `TrainingData`.
- an evaluation task (an `eval.tasks` entry), one of two scoring modes:
  `TeacherForcedTask` (every depth from one `forward_depths` pass: addition) or `GenerativeTask`
  (greedy generation at every depth from one shared prefill, answers judged one by one: the math
  benchmarks). `stars.evaluation.scoring` runs the mode; the entry supplies the data and the judge.

`stars.train` and `stars.evaluation` look tasks up here instead of branching on names, so a new task is
a module in `stars/tasks/` that calls `register(...)` at import (and is imported by
`stars/tasks/__init__.py`), plus its declaration in the job spec (`stars/spec/data.py` for a training
task's section, `stars/spec/eval.py` for an evaluation task's name and the training task it needs):
the spec stays importable without any task code, so `starsctl validate` is instant. See
docs/architecture.md, section 6.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from stars.errors import UserError

if TYPE_CHECKING:
    from stars.spec import JobSpec

__all__ = [
    "EvalInputError",
    "EvalTask",
    "GenerativeTask",
    "TeacherForcedTask",
    "TrainingData",
    "TrainingTask",
    "eval_task",
    "eval_task_names",
    "register",
    "training_task",
    "training_task_names",
]


class EvalInputError(UserError):
    """A problem with what the user asked to evaluate (unknown task, a task the checkpoint cannot do,
    a missing test file, ...)."""


@dataclass(frozen=True)
class TrainingData:
    """What training needs from a task: data, vocabulary facts, and how to describe it in a checkpoint."""

    train_data: Any
    """docs/interfaces.md contract: `len()` and `batch(indices)` -> input_ids, attention_mask, labels."""
    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    bos_token_id: int | None
    description: dict[str, Any]
    """Saved as `stars_task.json` beside the model, so a checkpoint can be scored on its own."""
    tokenizer: Any = None
    """A transformers tokenizer saved beside the model (text tasks); None for addition."""


@dataclass(frozen=True)
class TrainingTask:
    name: str
    """The spec's `data.task`."""
    build: Callable[[JobSpec], TrainingData]


@dataclass(frozen=True)
class TeacherForcedTask:
    """Scored by teacher forcing: a problem is right at depth d when every supervised argmax is."""

    name: str
    trained_on: str
    """The training task whose checkpoints this task scores (it shares that task's vocabulary)."""
    load: Callable[[Mapping[str, Any], int | None], tuple[Sequence[Any], Any]]
    """(the checkpoint's `stars_task.json`, limit) -> (problems, tokenizer): the held-out set."""
    correct: Callable[..., Mapping[int, Any]]
    """(model, problems, tokenizer, depths, batch_size, on_readout=) -> {depth: bool tensor}."""
    rho_sequences: Callable[[Sequence[Any], Any], list[list[int]]]
    """(problems, tokenizer) -> whole token sequences for the spectral-radius batch."""
    mode: Literal["teacher_forced"] = "teacher_forced"


@dataclass(frozen=True)
class GenerativeTask:
    """Scored by greedy generation from a chat prompt, each answer judged on its own."""

    name: str
    trained_on: str
    load: Callable[[str | None, int | None], Sequence[Any]]
    """(local copy or None for the hub, limit) -> items, each with a `.gold` answer."""
    prompts: Callable[[Any, Sequence[Any], str | None], list[list[int]]]
    """(tokenizer, items, system prompt or None for the default) -> prompt token ids."""
    judge: Callable[[str, Any], bool]
    """(generated text, item) -> correct?"""
    max_new_tokens: int = 2048
    """Default generation budget (the paper's)."""
    mode: Literal["generate"] = "generate"


EvalTask = TeacherForcedTask | GenerativeTask

_TRAINING: dict[str, TrainingTask] = {}
_EVAL: dict[str, EvalTask] = {}


def register(task: TrainingTask | EvalTask) -> None:
    """Add a task; a name is registered once per kind (a second registration is a bug)."""
    table: dict[str, Any] = _TRAINING if isinstance(task, TrainingTask) else _EVAL
    if task.name in table:
        raise ValueError(f"task {task.name!r} is registered twice")
    table[task.name] = task


def training_task(name: str) -> TrainingTask:
    if name not in _TRAINING:
        raise UserError(f"data.task {name!r} has no training task; known: {', '.join(sorted(_TRAINING))}")
    return _TRAINING[name]


def eval_task(name: str) -> EvalTask:
    if name not in _EVAL:
        raise EvalInputError(f"unknown task {name!r}; known tasks: {', '.join(_EVAL)}")
    return _EVAL[name]


def training_task_names() -> tuple[str, ...]:
    return tuple(_TRAINING)


def eval_task_names() -> tuple[str, ...]:
    return tuple(_EVAL)
