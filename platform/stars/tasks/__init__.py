"""Tasks: the data and the scoring for everything STARS trains and evaluates.

- `stars.tasks.registry`: the task registry; `stars.train` and `stars.evaluation` look tasks up there.
- `stars.tasks.addition`: 4-digit (or n-digit) addition with reversed answers; tokenizer, generator,
  jsonl I/O, training data, and the greedy / teacher-forced exact-match scorers.
- `stars.tasks.loading`: one loader for hub ids and local files/folders, with clear errors.
- `stars.tasks.math_sft`: NuminaMath-style SFT data, chat-formatted, labels on the assistant turn only.
- `stars.tasks.benchmarks`: GSM8K, MATH500, ASDiv, SVAMP, AMC23 (registry, loading, prompts).
- `stars.tasks.answers`: final-answer extraction and math-verify checking.
- `stars.tasks.testing`: a tiny local ChatML tokenizer for tests and benchmarks.

Importing this package is cheap: torch, datasets and transformers load only when a function needs them.
Importing it registers every task (each module calls `stars.tasks.registry.register` at import).
"""

from stars.tasks import addition, benchmarks, math_sft  # noqa: F401 - each registers its tasks
from stars.tasks.registry import (
    EvalInputError,
    GenerativeTask,
    TeacherForcedTask,
    TrainingData,
    TrainingTask,
    eval_task,
    eval_task_names,
    training_task,
    training_task_names,
)

__all__ = [
    "EvalInputError",
    "GenerativeTask",
    "TeacherForcedTask",
    "TrainingData",
    "TrainingTask",
    "eval_task",
    "eval_task_names",
    "training_task",
    "training_task_names",
]
