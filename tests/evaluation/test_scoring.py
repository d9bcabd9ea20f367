"""Depth-curve scoring of one checkpoint (no Ray, no MLflow): exactness of the one-pass and
shared-prefill paths, math benchmarks through the real tokenizer/answer checker, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from stars.checkpoint import load_checkpoint
from stars.errors import UserError
from stars.evaluation import (
    EvalInputError,
    TaskEval,
    evaluate_checkpoint,
    generate_depths,
    summary_metrics,
    teacher_forced,
    write_task_artifacts,
)
from stars.tasks import eval_task
from stars.tasks.addition import greedy_correct, held_out_problems
from stars.tasks.benchmarks import encode_prompts, load_benchmark


# ------------------------------------------------------------------------------------ exactness
def test_one_pass_teacher_forced_equals_sixteen_separate_passes(addition_ckpt):
    loaded = load_checkpoint(addition_ckpt, "cpu")
    model = loaded.model
    problems, tok = held_out_problems(loaded.task, limit=120)
    correct, dyn = teacher_forced(eval_task("addition"), model, problems, tok, range(1, 17), batch_size=50)
    from stars.tasks.addition import AdditionData

    data = AdditionData(problems, tok)
    b = data.batch(range(len(problems)))
    target = b["labels"][:, 1:]
    supervised = target != -100
    preds_by_depth = []
    with torch.no_grad():
        for d in range(1, 17):
            logits = model(b["input_ids"], attention_mask=b["attention_mask"], depth=d).logits  # its own pass
            pred = logits[:, :-1].argmax(-1)
            preds_by_depth.append(pred[supervised])
            separate = ((pred == target) | ~supervised).all(dim=1)
            assert torch.equal(correct[d], separate), f"depth {d}"
            # and the same problems greedy decoding solves (the scorers' shared definition)
            if d in (1, 4, 16):
                assert torch.equal(correct[d], greedy_correct(model, problems, tok, d, batch_size=64))
    # the predictions really differ between depths, so the equality above is not vacuous
    assert sum(not torch.equal(preds_by_depth[0], p) for p in preds_by_depth[1:]) >= 5
    assert set(dyn) == {"hidden_norm", "step_size", "dist_from_start"}
    assert list(dyn["step_size"]) == list(range(1, 17)) and all(v > 0 for v in dyn["step_size"].values())


@pytest.mark.parametrize("depths", [range(1, 17), [1, 3, 8]])
def test_shared_prefill_generation_equals_per_depth_generation(math_ckpt, gsm8k_file, depths):
    loaded = load_checkpoint(math_ckpt, "cpu")
    tok = loaded.tokenizer()
    items = load_benchmark("gsm8k", gsm8k_file, limit=6)
    prompts = encode_prompts(tok, items)
    assert len({len(p) for p in prompts}) > 1  # batches are left-padded
    shared, dyn = generate_depths(loaded.model, prompts, depths, 12, batch_size=4, shared_prefill=True,
                                  dynamics=True)
    naive, _ = generate_depths(loaded.model, prompts, depths, 12, batch_size=4, shared_prefill=False)
    assert shared == naive
    assert sorted(shared) == sorted(depths)
    assert any(shared[min(depths)] != shared[d] for d in depths)  # depth changes the text
    assert dyn is not None and list(dyn["hidden_norm"]) == sorted(depths)


def test_addition_generation_shares_prefill_token_for_token(addition_ckpt):
    loaded = load_checkpoint(addition_ckpt, "cpu")
    problems, tok = held_out_problems(loaded.task, limit=40)
    prompts = [tok.encode_prompt(p.num1, p.num2) for p in problems]
    shared, _ = generate_depths(loaded.model, prompts, range(1, 17), 7, batch_size=16)
    naive, _ = generate_depths(loaded.model, prompts, range(1, 17), 7, batch_size=16, shared_prefill=False)
    assert shared == naive


# -------------------------------------------------------------------------------- whole checkpoint
def test_evaluate_addition_checkpoint_curves_dynamics_rho_summary(addition_ckpt, tmp_path):
    result = evaluate_checkpoint(addition_ckpt, limit=50, rho_depths=[1, 8], rho_iters=5)
    assert result.step == 20 and list(result.tasks) == ["addition"]
    ev = result.tasks["addition"]
    assert ev.n == 50 and ev.mode == "teacher_forced"
    assert sorted(ev.acc) == list(range(1, 17)) and all(0.0 <= a <= 1.0 for a in ev.acc.values())
    assert sorted(ev.dynamics["rho"]) == [1, 8] and all(r > 0 for r in ev.dynamics["rho"].values())
    assert ev.summary == summary_metrics("addition", ev.acc)
    assert ev.curves()["dyn/rho"] == ev.dynamics["rho"]
    assert set(ev.curves(with_dynamics=False)) == {"addition/acc"}
    csv, png = write_task_artifacts(ev, tmp_path, result.step)
    lines = csv.read_text().splitlines()
    assert lines[0] == "depth,acc,hidden_norm,step_size,dist_from_start,rho" and len(lines) == 17
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TaskEval.from_json(json.loads(json.dumps(ev.to_json()))) == ev


def test_evaluate_math_benchmark_from_a_local_copy(math_ckpt, gsm8k_file):
    result = evaluate_checkpoint(
        math_ckpt, ["gsm8k"], [1, 2, 4], rho_depths=[2], rho_iters=3, limit=4, batch_size=2, max_new_tokens=6,
        benchmark_paths={"gsm8k": str(gsm8k_file)},
    )
    ev = result.tasks["gsm8k"]
    assert ev.mode == "generate" and ev.n == 4 and ev.max_new_tokens == 6
    assert sorted(ev.acc) == [1, 2, 4] and sorted(ev.dynamics["rho"]) == [2]


def test_clear_errors(addition_ckpt, math_ckpt):
    with pytest.raises(EvalInputError, match="unknown task 'sudoku'; known tasks: addition, gsm8k"):
        evaluate_checkpoint(addition_ckpt, ["sudoku"])
    with pytest.raises(EvalInputError, match="'gsm8k' scores checkpoints trained on 'math_sft'; this "
                       "checkpoint was trained on 'addition'"):
        evaluate_checkpoint(addition_ckpt, ["gsm8k"], [1])
    with pytest.raises(EvalInputError, match="no task to score"):
        evaluate_checkpoint(math_ckpt)
    with pytest.raises(EvalInputError, match="'addition' scores checkpoints trained on 'addition'"):
        evaluate_checkpoint(math_ckpt, ["addition"], [1])
    with pytest.raises(EvalInputError, match="needs an addition checkpoint"):
        held_out_problems({"task": "math_sft"})
    with pytest.raises(EvalInputError, match="depths is empty"):
        evaluate_checkpoint(addition_ckpt, ["addition"], [])
    assert issubclass(EvalInputError, UserError)  # `starsctl eval` exits 2 on it, without a traceback


def test_generation_batches_shrink_to_what_fits_in_memory(math_ckpt, gsm8k_file):
    """The batch planner counts the KV cache per token from the model's shape: a budget of exactly
    k sequences' caches (at the planning share) yields k; the tokens do not depend on the batching."""
    from stars.evaluation.scoring import _MEMORY_SHARE, fitting_batch_size

    model = load_checkpoint(math_ckpt, "cpu").model
    c = model.config
    per_token = 2 * c.n_block * 16 * c.n_kv_heads * c.head_dim * 4  # float32, 16 loop steps, no prelude/coda
    assert model.kv_cache_bytes_per_token(16) == per_token
    per_seq = per_token * 30 + per_token * (30 + 50) + 4 * c.vocab_size * 2
    for k in (1, 3, 7):
        free = int(k * per_seq / _MEMORY_SHARE) + 1
        assert fitting_batch_size(model, 30, 50, 16, 64, free_bytes=free) == k
    assert fitting_batch_size(model, 30, 50, 16, 2, free_bytes=10**12) == 2  # never above the spec's
    assert fitting_batch_size(model, 30, 50, 16, 64, free_bytes=1) == 1
    assert fitting_batch_size(model, 30, 50, 16, 64) == 64  # CPU: not cut


def test_generation_reports_progress_per_batch(math_ckpt, gsm8k_file):
    from stars.evaluation import generate_depths

    loaded = load_checkpoint(math_ckpt, "cpu")
    prompts = encode_prompts(loaded.tokenizer(), load_benchmark("gsm8k", gsm8k_file))
    seen = []
    generate_depths(loaded.model, prompts, [1, 2], 4, batch_size=2, progress=lambda d, n: seen.append((d, n)))
    n = len(prompts)
    assert seen == [(min(i + 2, n), n) for i in range(0, n, 2)]


def test_math_scoring_logs_progress_with_rate_and_eta(math_ckpt, gsm8k_file):
    from stars.evaluation import evaluate_task

    lines = []
    evaluate_task(load_checkpoint(math_ckpt, "cpu"), "gsm8k", [1, 2], rho_depths=(), batch_size=2,
                  max_new_tokens=4, benchmark_path=str(gsm8k_file), console=lines.append)
    assert lines and all("prompts/s, ETA" in line for line in lines)
    assert lines[-1].split("generated ")[1].startswith("5/5 prompts")  # the fixture's 5 problems
