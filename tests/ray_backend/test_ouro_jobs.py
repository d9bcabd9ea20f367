"""The paper's Ouro jobs end to end, as shipped: `starsctl submit jobs/stars_numina.yaml --set ...`
(and its SFT baseline) on the tiny Ouro checkpoint saved by Ouro's own code, tiny local NuminaMath
and benchmark files, one CPU worker, on the shared local Ray, into MLflow, every checkpoint scored
on all five math benchmarks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from stars.cli import app
from stars.tasks.testing import build_tiny_chat_tokenizer

pytestmark = pytest.mark.ray

ROOT = Path(__file__).parents[2]
OURO_TINY = ROOT / "tests" / "model" / "fixtures" / "ouro_tiny"
FIXTURES = ROOT / "tests" / "tasks" / "fixtures"
BENCHMARK_FILES = {
    "gsm8k": "gsm8k/test.jsonl", "math500": "math500/test.jsonl", "asdiv": "asdiv/validation.jsonl",
    "svamp": "svamp/test.jsonl", "amc23": "amc23/test.jsonl",
}
DEPTHS = [1, 2, 4, 8]


@pytest.fixture(scope="module")
def ouro_dir(tmp_path_factory) -> Path:
    """The fixture's config and weights plus a character tokenizer that fits its 97-token vocabulary,
    with the mislabelled special tokens of Ouro's upstream tokenizer config (all three id 0)."""
    out = tmp_path_factory.mktemp("ouro") / "ouro_tiny"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(OURO_TINY / name, out / name)
    texts = [str(v) for p in sorted(FIXTURES.rglob("*.jsonl")) for line in p.read_text().splitlines()
             for v in json.loads(line).values()]
    build_tiny_chat_tokenizer(out, texts, vocab_size=97, byte_level=False)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def overrides(ouro_dir: Path, tmp_path: Path) -> list[str]:
    sets = {
        "model.pretrained": str(ouro_dir),
        "data.dataset": str(FIXTURES / "numina" / "train.jsonl"),
        "data.num_samples": "null", "data.num_proc": "1", "data.max_seq_len": "256",
        "train.epochs": "null", "train.max_steps": "4", "train.global_batch_size": "4", "train.micro_batch_size": "2",
        "train.checkpoint_every": "2", "train.log_every": "1", "train.warmup_fraction": "0.25",
        "train.lr": "1e-3",  # visible weight changes in 4 steps
        "resources.num_workers": "1", "resources.use_gpu": "false", "resources.accelerator_type": "null",
        "resources.gpus_per_worker": "0", "resources.cpus_per_worker": "1", "resources.max_failures": "0",
        "resources.storage_path": str(tmp_path / "runs"),
        "eval.depths": ",".join(map(str, DEPTHS)), "eval.rho_depths": "[]", "eval.max_new_tokens": "6",
        "eval.limit": "2", "eval.batch_size": "4", "eval.workers": "1",
        "eval.resources.accelerator_type": "null", "eval.resources.gpus": "0", "eval.resources.cpus": "1",
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.artifact_location": str(tmp_path / "mlruns"),
    }
    sets.update({f"eval.benchmark_paths.{name}": str(FIXTURES / rel) for name, rel in BENCHMARK_FILES.items()})
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


@pytest.mark.parametrize("job", ["stars_numina", "sft_numina"])
def test_the_ouro_job_runs_end_to_end_on_the_tiny_checkpoint(ray_cluster, ouro_dir, tmp_path, job):
    """The paper's two fine-tuning jobs as shipped, pointed at the tiny Ouro checkpoint and local data:
    STARS (lognormal depths, JSRR) and its SFT baseline (fixed depth 4, no JSRR)."""
    result = CliRunner().invoke(app, ["submit", str(ROOT / "jobs" / f"{job}.yaml"), *overrides(ouro_dir, tmp_path)])
    assert result.exit_code == 0, result.output[-4000:]

    # checkpoints are in Ouro's own layout, trained (weights moved), loadable by the Ouro loader
    (final,) = list((tmp_path / "runs").glob(f"{job}-*/step_0000004"))
    assert json.loads((final / "model" / "config.json").read_text())["model_type"] == "ouro"
    before, after = load_file(OURO_TINY / "model.safetensors"), load_file(final / "model" / "model.safetensors")
    assert sorted(after) == sorted(before)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved
    assert "model.early_exit_gate.weight" not in moved  # last-step CE: the gate is frozen
    saved_tok = json.loads((final / "model" / "tokenizer_config.json").read_text())
    assert (saved_tok["bos_token"], saved_tok["eos_token"]) == ("<|im_start|>", "<|im_end|>")  # corrected

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stars-ouro-1.4b")
    (job_run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`stars.kind` = 'job'")
    assert job_run.info.status == "FINISHED" and job_run.data.params["model.source"] == "ouro"
    depths = {m.value for m in client.get_metric_history(job_run.info.run_id, "train/depth")}
    jsrr = [m.value for m in client.get_metric_history(job_run.info.run_id, "train/jsrr")]
    if job == "sft_numina":  # trained at its one depth, without the penalty
        assert job_run.data.params["stars.loop_sampling.kind"] == "fixed" and depths == {4.0}
        assert job_run.data.params["stars.jsrr.weight"] == "0.0" and not any(jsrr)
    else:
        assert job_run.data.params["stars.loop_sampling.kind"] == "lognormal" and any(jsrr)
    evals = client.search_runs([experiment.experiment_id], filter_string="tags.`stars.kind` = 'eval'")
    assert sorted(r.data.tags["stars.step"] for r in evals) == ["2", "4"]
    for run in evals:
        for bench in BENCHMARK_FILES:
            curve = client.get_metric_history(run.info.run_id, f"{bench}/acc")
            assert sorted(m.step for m in curve) == DEPTHS, (bench, run.data.tags["stars.step"])
            assert all(0.0 <= m.value <= 1.0 for m in curve)
