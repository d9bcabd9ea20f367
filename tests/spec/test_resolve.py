"""Resolution (places made explicit), the resolved YAML (and what it hides), the resume identity
`spec_hash`, and warnings."""

from __future__ import annotations

import re

import pytest
import yaml
from typer.testing import CliRunner

from stars.spec import (
    COMPUTING_FIELDS,
    NON_COMPUTING_FIELDS,
    JobSpec,
    apply_overrides,
    default_tracking_uri,
    load_spec,
    resolve_spec,
    resolved_yaml,
    spec_hash,
    spec_warnings,
    sweep_trials,
)


def test_resolution_makes_places_explicit(tmp_path, monkeypatch, minimal, write, spec_of):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write(minimal))
    assert spec.resources.storage_path == str(tmp_path.resolve() / "stars_runs")
    assert spec.tracking.uri == default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert spec.tracking.artifact_location == str(tmp_path.resolve() / "mlruns")
    assert resolve_spec(spec) == spec  # idempotent
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_spec(spec_of()).tracking.uri == "http://mlflow.example:5000"
    assert resolve_spec(spec_of()).tracking.artifact_location is None
    remote = spec_of(resources={"storage_path": "s3://bucket/stars"})
    assert resolve_spec(remote).resources.storage_path == "s3://bucket/stars"
    assert resolve_spec(spec_of(tracking={"uri": "databricks"})).tracking.uri == "databricks"
    assert resolve_spec(spec_of(tracking={"uri": "sqlite:///rel.db"}), cwd=tmp_path).tracking.uri == (
        f"sqlite:///{tmp_path.resolve()}/rel.db"
    )


def test_resolved_yaml_round_trips(tmp_path, write, spec_of):
    spec = resolve_spec(spec_of(eval={"depths": "1-4,8"}, sweep={"grid": {"seed": [0, 1]}}), cwd=tmp_path)
    text = resolved_yaml(spec)
    assert text.startswith(f"# resolved STARS job spec; spec_hash {spec_hash(spec)}")
    again = load_spec(write(text, "resolved.yaml"))
    assert again == spec and spec_hash(again) == spec_hash(spec)


def test_resolved_yaml_for_mlflow_hides_secrets(spec_of):
    spec = spec_of(resources={"env_vars": {"HF_TOKEN": "hf_abc", "OMP_NUM_THREADS": "2"}})
    assert "hf_abc" in resolved_yaml(spec)  # what the job itself runs
    logged = resolved_yaml(spec, redact=True)
    assert "hf_abc" not in logged
    assert yaml.safe_load(logged)["resources"]["env_vars"] == {"HF_TOKEN": "<redacted>", "OMP_NUM_THREADS": "2"}


SECRET_JOB = """\
name: t
data: {task: addition}
train: {max_steps: 10}
resources:
  env_vars: {HF_TOKEN: hf_sekrit_123, DB_URL: "postgresql://me:pw_sekrit_456@db/x", OMP_NUM_THREADS: "1"}
"""


@pytest.mark.parametrize("command", [["submit", "--dry-run"], ["validate", "--show"]])
def test_the_cli_never_prints_secret_values(tmp_path, monkeypatch, write, command):
    cli = pytest.importorskip("stars.cli")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write(SECRET_JOB)
    result = CliRunner().invoke(cli.app, [command[0], str(path), command[1]])
    assert result.exit_code == 0, result.output
    shown = result.stdout + result.stderr
    assert "hf_sekrit_123" not in shown and "pw_sekrit_456" not in shown
    assert "<redacted>" in shown and "OMP_NUM_THREADS: '1'" in shown


def test_warnings_for_likely_mistakes(spec_of):
    spec = spec_of(model={"source": "ouro", "pretrained": "p", "dtype": "bfloat16"}, data={"task": "math_sft"},
                   train={"max_steps": 10, "lr": 1e-6})
    assert any("round to zero" in w for w in spec_warnings(spec))
    local = resolve_spec(spec_of(), cwd="/tmp")
    warnings = spec_warnings(local, address="http://head:8265")
    assert any("resources.storage_path" in w for w in warnings)
    assert any("tracking.uri" in w and "local to the machine" in w for w in warnings)
    unset = spec_warnings(spec_of(), address="http://head:8265")  # not resolved: the cluster's env decides
    assert any("tracking.uri is not set" in w and "$MLFLOW_TRACKING_URI" in w for w in unset)
    assert spec_warnings(local) == []


# ---- spec_hash: the resume identity ---------------------------------------------------------------------
def test_spec_hash_ignores_where_and_tracks_what(spec_of):
    a = resolve_spec(spec_of(), cwd="/tmp/a")
    b = resolve_spec(spec_of(description="other words"), cwd="/tmp/b")
    assert a.resources.storage_path != b.resources.storage_path
    assert spec_hash(a) == spec_hash(b)
    assert re.fullmatch(r"[0-9a-f]{16}", spec_hash(a))
    assert spec_hash(apply_overrides(a, {"train.lr": 1e-3})) != spec_hash(a)
    assert spec_hash(apply_overrides(a, {"seed": 1})) != spec_hash(a)


#: One changed value for each field that changes what training computes.
COMPUTING_CHANGES = {
    "seed": 1,
    "model.d_model": 64,
    "model.norm.type": "simplenorm",
    "model.dtype": "bfloat16",
    "data.num_train": 5000,
    "data.seed": 3,
    "stars.loop_sampling": {"kind": "fixed", "depth": 4},
    "stars.jsrr.weight": 0.0,
    "stars.ce_loss": "gate_weighted",
    "train.lr": 1e-3,
    "train.max_steps": 200,
    "train.global_batch_size": 256,
    "train.micro_batch_size": 16,
    "train.precision": "bf16",
    "train.grad_clip": None,
    "resources.num_workers": 2,
    "resources.use_gpu": True,
}
#: One changed value for each field that does not: a run with these resumes.
NON_COMPUTING_CHANGES = {
    "name": "other",
    "experiment": "exp2",
    "description": "new words",
    "eval.depths": "1-4",
    "eval.workers": 3,
    "eval.benchmark_paths": {"gsm8k": "/data/gsm8k.jsonl"},
    "tracking.uri": "http://mlflow.example:5000",
    "tracking.tags": {"team": "x"},
    "train.log_every": 1,
    "train.checkpoint_every": 7,
    "train.keep_checkpoints": 2,
    "train.gradient_checkpointing": True,
    "resources.storage_path": "s3://bucket/elsewhere",
    "resources.max_failures": 5,
    "resources.env_vars": {"HF_TOKEN": "x"},
    "resources.forward_env": ["HF_TOKEN"],
    "resources.cpus_per_worker": 2.0,
    "resources.resources_per_worker": {"label": 1.0},
    "resources.placement_strategy": "SPREAD",
}
#: What a change needs along with it to stay valid.
ALONG_WITH = {"resources.use_gpu": {"resources.gpus_per_worker": 1.0}}
WITH_GPU = {"resources.use_gpu": True, "resources.gpus_per_worker": 0.5, "resources.accelerator_type": "H100"}


def test_model_and_data_names_are_absolute_when_they_exist_here_and_ids_otherwise(tmp_path, spec_of):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "numina.jsonl").write_text("{}\n")
    spec = spec_of(
        model={"source": "ouro", "pretrained": "ckpt"},
        data={"task": "math_sft", "dataset": "numina.jsonl", "tokenizer": "Org/tokenizer"},
        eval={"tasks": ["gsm8k"], "benchmark_paths": {"gsm8k": "bench/gsm8k.jsonl", "svamp": "s3://b/svamp"}},
    )
    resolved = resolve_spec(spec, cwd=tmp_path)
    assert resolved.model.pretrained == str(tmp_path.resolve() / "ckpt")
    assert resolved.data.dataset == str(tmp_path.resolve() / "numina.jsonl")
    assert resolved.data.tokenizer == "Org/tokenizer"  # not here: a hub id, left as it is
    assert resolved.eval.benchmark_paths == {
        "gsm8k": str(tmp_path.resolve() / "bench" / "gsm8k.jsonl"), "svamp": "s3://b/svamp",
    }
    assert resolve_spec(resolved, cwd=tmp_path) == resolved
    hub = spec_of(model={"source": "ouro", "pretrained": "ByteDance/Ouro-1.4B"}, data={"task": "math_sft"})
    assert resolve_spec(hub, cwd=tmp_path).model.pretrained == "ByteDance/Ouro-1.4B"


def _single(spec_of) -> JobSpec:
    return spec_of(train={"max_steps": 100, "global_batch_size": 128, "micro_batch_size": 32})


def _trial(spec_of) -> JobSpec:
    swept = spec_of(train={"max_steps": 100, "micro_batch_size": 32}, sweep={"grid": {"model.norm.type": ["layernorm", "rmsnorm"]}})
    return sweep_trials(swept)[1].spec


@pytest.mark.parametrize("make", [_single, _trial], ids=["job", "sweep-trial"])
@pytest.mark.parametrize(("path", "value"), COMPUTING_CHANGES.items(), ids=list(COMPUTING_CHANGES))
def test_changing_what_training_computes_starts_fresh(spec_of, make, path, value):
    spec = make(spec_of)
    changed = apply_overrides(spec, {path: value, **ALONG_WITH.get(path, {})})
    assert changed != spec
    assert spec_hash(changed) != spec_hash(spec)


@pytest.mark.parametrize("make", [_single, _trial], ids=["job", "sweep-trial"])
@pytest.mark.parametrize(("path", "value"), NON_COMPUTING_CHANGES.items(), ids=list(NON_COMPUTING_CHANGES))
def test_changing_anything_else_resumes(spec_of, make, path, value):
    spec = make(spec_of)
    changed = apply_overrides(spec, {path: value})
    assert changed != spec
    assert spec_hash(changed) == spec_hash(spec)


def test_gpu_placement_details_do_not_change_the_hash(spec_of):
    gpu = apply_overrides(_single(spec_of), {"resources.use_gpu": True, **ALONG_WITH["resources.use_gpu"]})
    assert spec_hash(apply_overrides(gpu, WITH_GPU)) == spec_hash(gpu)


def test_math_tokenization_processes_do_not_change_the_hash(spec_of):
    spec = spec_of(model={"source": "pretrained", "pretrained": "p"}, data={"task": "math_sft"})
    assert spec_hash(apply_overrides(spec, {"data.num_proc": 8})) == spec_hash(spec)
    assert spec_hash(apply_overrides(spec, {"data.num_samples": 8})) != spec_hash(spec)


def _leaves(data, prefix=""):
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


def _covered(path: str, entries: tuple[str, ...]) -> str | None:
    """The most specific entry covering `path`."""
    hits = [e for e in entries if path == e or path.startswith(e + ".")]
    return max(hits, key=len) if hits else None


def test_every_field_is_classified_once(spec_of):
    """A new spec field must be put in COMPUTING_FIELDS or NON_COMPUTING_FIELDS on purpose."""
    specs = [
        spec_of(),
        spec_of(model={"source": "pretrained", "pretrained": "p"}, data={"task": "math_sft"},
                stars={"loop_sampling": {"kind": "poisson_lognormal"}}),
    ]
    for spec in specs:
        for leaf in _leaves(spec.model_dump(mode="json")):
            top = leaf.split(".")[0]
            assert _covered(leaf, COMPUTING_FIELDS + NON_COMPUTING_FIELDS), f"{leaf} is in neither list"
            assert top in COMPUTING_FIELDS or top in NON_COMPUTING_FIELDS or top == "resources", leaf
    assert not set(COMPUTING_FIELDS) & set(NON_COMPUTING_FIELDS)
    # every carve-out lies inside a computing section (otherwise it would be dead)
    for path in NON_COMPUTING_FIELDS:
        assert "." not in path or _covered(path, COMPUTING_FIELDS) or path.startswith("resources."), path
