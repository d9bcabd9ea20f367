"""The framework-free training loop: data plan, schedules, exact resume, learning."""

import math

import pytest
import torch

from stars.checkpoint import load_trainer_state
from stars.model import LoopLM
from stars.train import (
    BatchPlan,
    TrainHooks,
    build_sampler,
    lr_multiplier,
    param_checksum,
    train_loop,
)


def quiet():
    return TrainHooks(console=lambda line: None)


def test_batch_plan_partitions_each_global_batch():
    plan = BatchPlan(n=50, seed=3, global_batch=12, micro_batch=3, world_size=2)  # 2 micro x 2 ranks
    for step in range(10):
        rows = [plan.rows(step, m, r) for m in range(2) for r in range(2)]
        flat = [i for part in rows for i in part]
        assert len(flat) == 12 and all(0 <= i < 50 for i in flat)
        assert all(len(part) == 3 for part in rows)
    # consecutive steps walk through a permutation: one epoch covers every row exactly once
    stream = [i for s in range(50 // 2) for m in range(2) for r in range(2) for i in plan.rows(s, m, r)]
    first_epoch = stream[:50]
    assert sorted(first_epoch) == list(range(50))
    again = BatchPlan(n=50, seed=3, global_batch=12, micro_batch=3, world_size=2)
    assert again.rows(7, 1, 1) == plan.rows(7, 1, 1)  # a pure function of the step
    assert BatchPlan(50, 4, 12, 3, 2).rows(0, 0, 0) != plan.rows(0, 0, 0)


def test_schedules(tiny_spec):
    cos = lr_multiplier(tiny_spec(**{"train.max_steps": 100, "train.warmup_steps": 10,
                                      "train.min_lr_ratio": 0.1}), 100)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(99) == pytest.approx(0.1, abs=1e-3)
    assert all(cos(s) >= cos(s + 1) for s in range(10, 99))
    wsd = lr_multiplier(tiny_spec(**{"train.max_steps": 100, "train.schedule": "wsd", "train.warmup_steps": 0,
                                      "train.warmup_fraction": 0.1, "train.decay_fraction": 0.1,
                                      "train.min_lr_ratio": 0.001}), 100)
    assert wsd(5) == pytest.approx(0.6) and wsd(50) == 1.0 and wsd(89) == 1.0
    assert wsd(99) == pytest.approx(0.001) and 0.001 < wsd(94) < 1.0


def test_resume_is_exact(tiny_spec, tmp_path):
    """12 straight steps == 6 steps, checkpoint, resume, 6 more: same weights, same depth sequence."""
    spec = tiny_spec()
    straight = train_loop(spec, hooks=quiet(), checkpoint_root=tmp_path / "a")
    first = train_loop(tiny_spec(**{"train.max_steps": 12}), hooks=quiet(), checkpoint_root=tmp_path / "b")
    assert first.checkpoint_dir.endswith("step_0000012")
    resumed = train_loop(spec, hooks=quiet(), resume_dir=tmp_path / "b" / "step_0000006",
                         checkpoint_root=tmp_path / "c")
    assert resumed.resumed_from == 6
    sampler = build_sampler(spec)
    expected = [(s + 1, sampler(s)) for s in range(12)]
    assert straight.history == expected and resumed.history == expected
    a = LoopLM.from_pretrained(tmp_path / "a" / "step_0000012" / "model")
    c = LoopLM.from_pretrained(tmp_path / "c" / "step_0000012" / "model")
    for (name, p), q in zip(a.named_parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert load_trainer_state(tmp_path / "c" / "step_0000012")["history"] == expected


def test_loss_falls_and_metrics_are_logged(tiny_spec, tmp_path):
    logged = {}
    hooks = TrainHooks(console=lambda line: None, log_metrics=lambda m, step: logged.setdefault(step, m))
    out = train_loop(tiny_spec(**{"train.max_steps": 60, "train.checkpoint_every": None}), hooks=hooks,
                     checkpoint_root=tmp_path)
    assert out.final_loss < 0.7 * out.first_loss
    assert sorted(logged) == list(range(2, 61, 2))
    m = logged[60]
    assert {"train/loss", "train/ce", "train/jsrr", "train/depth", "train/lr", "train/tokens_per_s"} <= set(m)
    assert m["train/loss"] == pytest.approx(0.9 * m["train/ce"] + 0.1 * m["train/jsrr"], rel=1e-5)
    assert 1 <= m["train/depth"] <= 4 and m["train/tokens_per_s"] > 0


def test_jsrr_off_before_start_step(tiny_spec, tmp_path):
    logged = {}
    hooks = TrainHooks(console=lambda line: None, log_metrics=lambda m, step: logged.setdefault(step, m))
    train_loop(tiny_spec(**{"train.max_steps": 8, "train.log_every": 1, "stars.jsrr.start_step": 4}),
               hooks=hooks, checkpoint_root=tmp_path)
    assert all(logged[s]["train/jsrr"] == 0 for s in range(1, 5))
    assert all(logged[s]["train/jsrr"] > 0 for s in range(5, 9))
    assert all(math.isclose(logged[s]["train/loss"], logged[s]["train/ce"]) for s in range(1, 5))


def test_central_difference_mode_trains_like_forward_mode(tiny_spec, tmp_path):
    """`stars.jsrr.mode: fd` is a numerical J v: the trainer logs the same penalty as exact `jvp`."""
    logged: dict[str, dict] = {}
    for mode in ("jvp", "fd"):
        hooks = TrainHooks(console=lambda line: None,
                           log_metrics=lambda m, step, mode=mode: logged.setdefault(mode, {}).setdefault(step, m))
        train_loop(tiny_spec(**{"train.max_steps": 4, "train.log_every": 1, "stars.jsrr.mode": mode,
                                "train.checkpoint_every": None}), hooks=hooks, checkpoint_root=tmp_path / mode)
    for step in range(1, 5):
        jvp, fd = logged["jvp"][step]["train/jsrr"], logged["fd"][step]["train/jsrr"]
        assert jvp > 0 and fd == pytest.approx(jvp, rel=1e-3), step


def test_gradient_accumulation_matches_one_big_batch(tiny_spec, tmp_path):
    """4 micro-batches of 4 == one batch of 16 (the CE is a mean; accumulation divides by 4).
    JSRR is off here: its random vector is drawn per micro-batch, so it differs by design."""
    common = {"train.max_steps": 3, "stars.jsrr.weight": 0.0, "train.checkpoint_every": None,
              "model.dropout": 0.0}
    big = train_loop(tiny_spec(**common), hooks=quiet(), checkpoint_root=tmp_path / "big")
    small = train_loop(tiny_spec(**common, **{"train.micro_batch_size": 4}), hooks=quiet(),
                       checkpoint_root=tmp_path / "small")
    a = LoopLM.from_pretrained(tmp_path / "big" / "step_0000003" / "model")
    b = LoopLM.from_pretrained(tmp_path / "small" / "step_0000003" / "model")
    assert big.history == small.history
    assert abs(param_checksum(a) - param_checksum(b)) < 1e-6 * abs(param_checksum(a))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ---- the model section is honoured: weights' dtype and trust_remote_code -----------------------------------
def test_build_model_keeps_weights_in_model_dtype(tiny_spec, tmp_path):
    from stars.spec import apply_overrides
    from stars.tasks import training_task
    from stars.train import build_model

    spec = tiny_spec()
    task = training_task(spec.data.task).build(spec)
    assert {p.dtype for p in build_model(spec, task).parameters()} == {torch.float32}
    bf16 = apply_overrides(spec, {"model.dtype": "bfloat16", "stars.jsrr.mode": "vjp"})
    assert {p.dtype for p in build_model(bf16, task).parameters()} == {torch.bfloat16}
    build_model(spec, task).save_pretrained(tmp_path / "saved")
    loaded = apply_overrides(spec, {"model": {"source": "pretrained", "pretrained": str(tmp_path / "saved"),
                                              "dtype": "bfloat16"}})
    assert {p.dtype for p in build_model(loaded, task).parameters()} == {torch.bfloat16}


CUSTOM_TOKENIZER = '''
from transformers import PreTrainedTokenizerFast


class MarkedTokenizer(PreTrainedTokenizerFast):
    """The checkpoint's own code: loaded only with trust_remote_code."""
'''


def test_trust_remote_code_reaches_the_tokenizer(tiny_spec, tmp_path):
    import json
    from pathlib import Path

    from stars.spec import apply_overrides
    from stars.tasks import training_task
    from stars.tasks.testing import build_tiny_chat_tokenizer

    fixtures = Path(__file__).parent / "tasks" / "fixtures" / "numina"
    texts = [v for line in (fixtures / "train.jsonl").read_text().splitlines() for v in json.loads(line).values()
             if isinstance(v, str)]
    model_dir = build_tiny_chat_tokenizer(tmp_path / "ckpt", texts=texts, vocab_size=400)
    (model_dir / "custom_tok.py").write_text(CUSTOM_TOKENIZER)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "custom_tok.MarkedTokenizer"]}
    config_path.write_text(json.dumps(config))

    def tokenizer_class(trust: bool) -> str:
        spec = apply_overrides(tiny_spec(), {
            "model": {"source": "pretrained", "pretrained": str(model_dir), "trust_remote_code": trust},
            "data": {"task": "math_sft", "dataset": str(fixtures / "train.jsonl"), "max_seq_len": 512},
            "eval": {"tasks": [], "depths": "1-4"},
        })
        return type(training_task(spec.data.task).build(spec).tokenizer).__name__

    assert tokenizer_class(True) == "MarkedTokenizer"
    assert tokenizer_class(False) != "MarkedTokenizer"


def test_a_non_finite_loss_stops_training_at_that_step(tiny_spec):
    """fp16 weights at lr 10 overflow within a few steps: training raises `TrainingDiverged` naming the
    step, before applying that step's update."""
    from stars.spec import apply_overrides
    from stars.train import TrainingDiverged, train_loop

    spec = apply_overrides(tiny_spec(), {
        "model.dtype": "float16", "model.norm.position": "pre", "train.lr": 10.0, "train.grad_clip": None,
        "train.warmup_steps": 0, "train.schedule": "constant", "stars.jsrr.weight": 0.0, "eval.tasks": [],
    })
    with pytest.raises(TrainingDiverged, match=r"^diverged at step \d+: loss (nan|inf)") as info:
        train_loop(spec)
    assert 1 <= info.value.step <= spec.train.max_steps


def test_the_exit_gate_trains_only_when_the_loss_uses_it(tiny_spec, tmp_path):
    from stars.train import ExitGateError

    def run(ce_loss: str, name: str) -> tuple[LoopLM, LoopLM]:
        spec = tiny_spec(**{"model.exit_gate": True, "stars.ce_loss": ce_loss, "train.max_steps": 4,
                            "train.checkpoint_every": 2})
        train_loop(spec, hooks=quiet(), checkpoint_root=tmp_path / name)
        return (LoopLM.from_pretrained(tmp_path / name / "step_0000002" / "model"),
                LoopLM.from_pretrained(tmp_path / name / "step_0000004" / "model"))

    before, after = run("last_step", "last")
    assert torch.equal(before.exit_gate.weight, after.exit_gate.weight)  # frozen: no gradient, no decay
    assert not torch.equal(before.block[0].attn.q_proj.weight, after.block[0].attn.q_proj.weight)
    before, after = run("gate_weighted", "gated")
    assert not torch.equal(before.exit_gate.weight, after.exit_gate.weight)
    with pytest.raises(ExitGateError, match="no exit gate"):
        train_loop(tiny_spec(**{"stars.ce_loss": "gate_weighted"}), hooks=quiet(), checkpoint_root=tmp_path / "x")
