"""benchmarks/bench_ouro.py end to end: the tiny preset at its smallest settings, in a subprocess (as a
user runs it), prints JSON with every measurement present and plausible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ouro.py"
SMALLEST = ["--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "1",
            "--gen-prompt-tokens", "8", "--gen-new-tokens", "2", "--gen-repeats", "1"]


@pytest.fixture(scope="module")
def report() -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), *SMALLEST], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_train_throughput_at_depths_4_and_8_and_with_jsrr(report):
    train = report["train"]
    assert report["tokens_per_step"] == report["batch"] * report["seq"] == 4 * 128
    for name, depth in (("ce@4", 4), ("ce@8", 8), ("ce+jsrr@4", 4)):
        assert train[name]["depth"] == depth
        assert train[name]["step_s"] > 0
        assert train[name]["tokens_per_s"] == pytest.approx(report["tokens_per_step"] / train[name]["step_s"], rel=1e-3)
    assert train["ce+jsrr@4"]["jsrr"]["weight"] > 0
    assert "jsrr" not in train["ce@4"]
    assert "stars_loss" in train["includes"] and "AdamW" in train["includes"]


def test_gradient_checkpointing_lowers_the_step_peak(report):
    memory = report["memory"]
    assert memory["depth"] == 8 and "VmHWM" in memory["method"]
    without, with_ = memory["without_checkpointing"], memory["with_checkpointing"]
    for measured in (without, with_):
        assert measured["peak_bytes"] >= measured["at_step_start_bytes"] > 0
        assert measured["step_adds_bytes"] > 0
    # Depth 8 without checkpointing keeps 16 layer applications' activations (~100 MB here); with
    # it, one loop step's inputs per step plus one step's recompute.
    assert with_["peak_bytes"] < without["peak_bytes"]
    assert memory["checkpointing_saves_bytes"] == without["peak_bytes"] - with_["peak_bytes"]


def test_generation_counts_new_tokens_of_all_16_depths(report):
    gen = report["generation"]
    assert gen["depths"] == "1-16" and gen["seconds"] > 0
    new_tokens = gen["batch"] * gen["new_tokens_per_depth"] * 16
    assert gen["new_tokens_per_s"] == pytest.approx(new_tokens / gen["seconds"], rel=1e-2)


def test_model_is_ouro_shaped_and_mfu_is_cuda_only(report):
    model = report["model"]
    assert model["layout"] == "LoopLMConfig.ouro_layout" and model["rope_theta"] == 1e6
    assert 0 < model["params_in_loop"] < model["params"]
    assert report["weights_dtype"] == "float32" and report["compute_dtype"] == "fp32"
    assert report["mfu"] is None
