"""Checkpoints to score: tiny LoopLMs saved the way the trainer lays them out (`stars.checkpoint`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stars.checkpoint import MODEL_DIR, TASK_FILE, step_dir_name
from stars.model import LoopLM, LoopLMConfig
from stars.tasks.addition import AdditionTokenizer
from stars.tasks.testing import build_tiny_chat_tokenizer

FIXTURES = Path(__file__).parents[1] / "tasks" / "fixtures"
ADDITION_TASK = {"task": "addition", "digits": 4, "num_test": 200, "seed": 0, "test_file": None}


def tiny_looplm(vocab: int, pad: int, eos: int, *, seed: int = 0, n_block: int = 1, max_pos: int = 32,
                injection: str = "add", positions: str = "learned") -> LoopLM:
    torch.manual_seed(seed)
    cfg = LoopLMConfig(vocab_size=vocab, d_model=32, n_heads=2, n_block=n_block, d_ff=64, injection=injection,
                       positions=positions, max_position_embeddings=max_pos, pad_token_id=pad, eos_token_id=eos)
    model = LoopLM(cfg).eval()
    # Larger random weights than the init: the argmax then changes from depth to depth, so the
    # exactness tests compare predictions that actually differ across depths.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def addition_ckpt(tmp_path_factory) -> Path:
    """A checkpoint laid out like the trainer's: step_0000020/{model/, stars_task.json}."""
    root = tmp_path_factory.mktemp("ckpt") / step_dir_name(20)
    tok = AdditionTokenizer(4)
    tiny_looplm(tok.vocab_size, tok.pad_token_id, tok.eos_token_id).save_pretrained(root / MODEL_DIR)
    (root / TASK_FILE).write_text(json.dumps(ADDITION_TASK))
    return root


@pytest.fixture(scope="session")
def math_ckpt(tmp_path_factory) -> Path:
    """A LoopLM over the tiny ChatML tokenizer, saved with it (what a math_sft checkpoint holds)."""
    root = tmp_path_factory.mktemp("mathckpt") / step_dir_name(5)
    tok_dir = build_tiny_chat_tokenizer(root / MODEL_DIR)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = tiny_looplm(len(tok), 0, 2, max_pos=512, positions="rope", injection="none")
    model.save_pretrained(root / MODEL_DIR)
    (root / TASK_FILE).write_text(json.dumps({"task": "math_sft", "dataset": "fixture"}))
    return root


@pytest.fixture(scope="session")
def gsm8k_file() -> Path:
    """A few GSM8K test problems in the benchmark's own format (tests/tasks/fixtures)."""
    return FIXTURES / "gsm8k" / "test.jsonl"
