"""Shared fixtures for the task tests: the fixture-file folder and a tiny local ChatML tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding a freshly trained byte-level BPE with a ChatML template."""
    from stars.tasks.testing import build_tiny_chat_tokenizer

    texts = [
        str(value)
        for path in sorted(FIXTURES.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
        for value in json.loads(line).values()
    ]
    return build_tiny_chat_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"), texts=texts, vocab_size=600)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    """Loaded the way a real model's tokenizer is: `AutoTokenizer.from_pretrained(model_dir)`."""
    from stars.tasks.math_sft import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)
