"""Tasks: the data and the scoring for everything STARS trains and evaluates.

- `stars.tasks.addition`: 4-digit (or n-digit) addition with reversed answers; tokenizer, generator,
  jsonl I/O, training data, and the greedy / teacher-forced exact-match scorers.
- `stars.tasks.loading`: one loader for hub ids and local files/folders, with clear errors.
- `stars.tasks.math_sft`: NuminaMath-style SFT data, chat-formatted, labels on the assistant turn only.
- `stars.tasks.benchmarks`: GSM8K, MATH500, ASDiv, SVAMP, AMC23 (registry, loading, prompts).
- `stars.tasks.answers`: final-answer extraction and math-verify checking.
- `stars.tasks.testing`: a tiny local ChatML tokenizer for tests and benchmarks.

Importing this package is cheap: torch, datasets and transformers load only when a function needs them.
"""
