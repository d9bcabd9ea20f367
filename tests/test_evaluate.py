"""Depth-curve evaluation of one checkpoint (no Ray): exactness of the one-pass and shared-prefill
paths, math benchmarks through the real tokenizer/answer checker, bookkeeping, `starsctl eval`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stars.cli import app
from stars.evaluate import (
    EvalInputError,
    EvalLedger,
    TaskEval,
    addition_problems,
    addition_teacher_forced,
    committed_checkpoints,
    evaluate_checkpoint,
    generate_depths,
    load_checkpoint,
    step_of,
    summarize,
    write_task_artifacts,
)
from stars.model import LoopLM, LoopLMConfig
from stars.tasks.addition import AdditionTokenizer, greedy_correct
from stars.tasks.benchmarks import encode_prompts, load_benchmark
from stars.tasks.testing import build_tiny_chat_tokenizer

FIXTURES = Path(__file__).parent / "tasks" / "fixtures"
ADDITION_TASK = {"task": "addition", "digits": 4, "num_test": 200, "seed": 0, "test_file": None}
runner = CliRunner()


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


@pytest.fixture(scope="module")
def addition_ckpt(tmp_path_factory) -> Path:
    """A checkpoint laid out like the trainer's: step_0000020/{model/, stars_task.json}."""
    root = tmp_path_factory.mktemp("ckpt") / "step_0000020"
    tok = AdditionTokenizer(4)
    tiny_looplm(tok.vocab_size, tok.pad_token_id, tok.eos_token_id).save_pretrained(root / "model")
    (root / "stars_task.json").write_text(json.dumps(ADDITION_TASK))
    return root


@pytest.fixture(scope="module")
def math_ckpt(tmp_path_factory) -> Path:
    """A LoopLM over the tiny ChatML tokenizer, saved with it (what a math_sft checkpoint holds)."""
    root = tmp_path_factory.mktemp("mathckpt") / "step_0000005"
    tok_dir = build_tiny_chat_tokenizer(root / "model")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = tiny_looplm(len(tok), 0, 2, max_pos=512, positions="rope", injection="none")
    model.save_pretrained(root / "model")
    (root / "stars_task.json").write_text(json.dumps({"task": "math_sft", "dataset": "fixture"}))
    return root


# ------------------------------------------------------------------------------------ exactness
def test_one_pass_teacher_forced_equals_sixteen_separate_passes(addition_ckpt):
    loaded = load_checkpoint(addition_ckpt, "cpu")
    model = loaded.model
    problems, tok = addition_problems(loaded.task, limit=120)
    correct, dyn = addition_teacher_forced(model, problems, tok, range(1, 17), batch_size=50)
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
def test_shared_prefill_generation_equals_per_depth_generation(math_ckpt, depths):
    loaded = load_checkpoint(math_ckpt, "cpu")
    tok = loaded.tokenizer()
    items = load_benchmark("gsm8k", FIXTURES / "gsm8k" / "test.jsonl", limit=6)
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
    problems, tok = addition_problems(loaded.task, limit=40)
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
    assert ev.summary == summarize("addition", ev.acc)
    assert ev.curves()["dyn/rho"] == ev.dynamics["rho"]
    csv, png = write_task_artifacts(ev, tmp_path, result.step)
    lines = csv.read_text().splitlines()
    assert lines[0] == "depth,acc,hidden_norm,step_size,dist_from_start,rho" and len(lines) == 17
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TaskEval.from_json(json.loads(json.dumps(ev.to_json()))) == ev


def test_summary_is_the_papers_headline_number():
    acc = {d: v for d, v in zip(range(1, 17), [0.1, 0.5, 0.7, 0.8] + [0.6] * 4 + [0.4] * 8)}
    s = summarize("gsm8k", acc)
    assert s["gsm8k/peak_acc"] == 0.8 and s["gsm8k/best_depth"] == 4.0
    assert s["gsm8k/acc_at_8"] == 0.6 and s["gsm8k/drop_at_8"] == pytest.approx(0.25)
    assert s["gsm8k/drop_at_16"] == pytest.approx(0.5)


def test_evaluate_math_benchmark_from_a_local_copy(math_ckpt):
    result = evaluate_checkpoint(
        math_ckpt, ["gsm8k"], [1, 2, 4], rho_depths=[2], rho_iters=3, limit=4, batch_size=2, max_new_tokens=6,
        benchmark_paths={"gsm8k": str(FIXTURES / "gsm8k" / "test.jsonl")},
    )
    ev = result.tasks["gsm8k"]
    assert ev.mode == "generate" and ev.n == 4 and ev.max_new_tokens == 6
    assert sorted(ev.acc) == [1, 2, 4] and sorted(ev.dynamics["rho"]) == [2]


def test_clear_errors(addition_ckpt, math_ckpt, tmp_path):
    with pytest.raises(EvalInputError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(EvalInputError, match="unknown task 'sudoku'; known tasks: addition, gsm8k"):
        evaluate_checkpoint(addition_ckpt, ["sudoku"])
    with pytest.raises(EvalInputError, match="trained on addition"):
        evaluate_checkpoint(addition_ckpt, ["gsm8k"], [1])
    with pytest.raises(EvalInputError, match="no task to score"):
        evaluate_checkpoint(math_ckpt)
    with pytest.raises(EvalInputError, match="needs an addition checkpoint"):
        evaluate_checkpoint(math_ckpt, ["addition"], [1])


# ----------------------------------------------------------------------------------- bookkeeping
def test_ledger_records_done_units_and_lists_what_is_missing(tmp_path):
    ledger = EvalLedger(str(tmp_path / "run"))
    assert ledger.missing(10, ["addition", "gsm8k"]) == ["addition", "gsm8k"]
    ledger.mark_running(10, "addition", {"pid": 1})
    assert ledger.missing(10, ["addition"]) == ["addition"]  # running is not done
    ledger.mark_done(10, "addition", {"summary": {"addition/peak_acc": 1.0}})
    assert ledger.missing(10, ["addition", "gsm8k"]) == ["gsm8k"]
    assert ledger.done(10, "addition")["summary"] == {"addition/peak_acc": 1.0}
    assert ledger.running(10, "addition") == {"pid": 1}
    assert ledger.done_steps("addition") == [10]
    assert (tmp_path / "run" / "eval" / "step_0000010" / "addition.done.json").is_file()
    assert not list((tmp_path / "run" / "eval" / "step_0000010").glob("*.tmp-*"))  # atomic writes
    # a restarted job sees the same state through a new ledger
    assert EvalLedger(str(tmp_path / "run")).missing(10, ["addition"]) == []


def test_committed_checkpoints_come_from_rays_snapshot(tmp_path):
    run = tmp_path / "run"
    for s in (10, 20, 30):
        (run / f"step_{s:07d}").mkdir(parents=True)
        (run / f"step_{s:07d}" / "stars_task.json").write_text("{}")
    assert committed_checkpoints(str(run)) == ["step_0000010", "step_0000020", "step_0000030"]  # no snapshot
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "step_0000030", "metrics": {}}],
                "latest_checkpoint_result": {"checkpoint_dir_name": "step_0000030", "metrics": {}}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert committed_checkpoints(str(run)) == ["step_0000030"]  # pruned ones are not Ray's any more
    assert step_of(run / "step_0000030") == 30 and step_of(run) is None


# ------------------------------------------------------------------------------------------- CLI
def test_starsctl_eval_prints_the_depth_table_and_writes_artifacts(addition_ckpt, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", str(addition_ckpt), "--task", "addition", "--depths", "1-16",
                              "--limit", "30", "--rho-depths", "4", "--rho-iters", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "addition (teacher_forced, 30 problems" in res.output and "summary: peak" in res.output
    assert sum(1 for line in res.output.splitlines() if line.strip()[:2].strip().isdigit()) == 16
    assert {p.name for p in out.iterdir()} == {"addition.csv", "addition.png", "eval.json"}
    data = json.loads((out / "eval.json").read_text())
    assert data["step"] == 20 and len(data["tasks"]["addition"]["acc"]) == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "/nonexistent/step_1"], "does not exist"),
        (["eval", "{ckpt}", "--task", "sudoku"], "unknown task 'sudoku'; known tasks: addition"),
        (["eval", "{ckpt}", "--depths", "16-1"], "--depths: depth range '16-1' is empty"),
        (["eval", "{ckpt}", "--benchmark-path", "gsm8k"], "--benchmark-path expects TASK=PATH"),
    ],
)
def test_starsctl_eval_user_errors_exit_2_without_traceback(addition_ckpt, args, message):
    res = runner.invoke(app, [a.format(ckpt=addition_ckpt) for a in args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_eval_and_compare_help_import_nothing_heavy():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom stars.cli import app\n"
        "for cmd in ('eval', 'compare'):\n"
        "    r = CliRunner().invoke(app, [cmd, '--help'])\n"
        "    assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
