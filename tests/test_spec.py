"""The job spec: schema, cross-field rules, loader errors, overrides, resolution, hash, params."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from stars.spec import (
    ARCH_DEFAULTS,
    JobSpec,
    compact_depths,
    default_tracking_uri,
    flatten_params,
    is_secret_key,
    iter_secret_values,
    parse_depths,
    resolve_spec,
    resolved_yaml,
    spec_hash,
    spec_warnings,
    sweep_trials,
)
from stars.spec_loader import SpecError, SpecProblem, apply_overrides, load_spec, parse_override

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {"name": "t", "data": {"task": "addition"}, "train": {"max_steps": 100}}


def spec_of(**sections) -> JobSpec:
    data = json.loads(json.dumps(MINIMAL))
    data.update(sections)
    return JobSpec.model_validate(data)


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems_of(path: Path, overrides: list[str] | None = None) -> list[SpecProblem]:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides or [])
    return info.value.problems


# ------------------------------------------------------------------------------------ defaults
def test_minimal_spec_gets_defaults_from_other_sections():
    spec = spec_of(resources={"num_workers": 4})
    assert spec.experiment == "t"
    assert spec.train.micro_batch_size == 32  # 128 / 4 workers
    assert spec.grad_accum_steps == 1
    assert spec.eval.tasks == ["addition"]
    assert spec.eval.depths == list(range(1, 17))
    assert spec.model.d_model == ARCH_DEFAULTS["d_model"]
    assert spec.model.norm is not None and spec.model.norm.position == "post_sandwich"
    assert spec.resources.gpus_per_worker == 0
    assert spec.stars.loop_sampling.kind == "lognormal"
    assert (spec.stars.loop_sampling.mu, spec.stars.loop_sampling.sigma) == (1.7, 0.4)
    assert spec.stars.jsrr.weight == 0.1 and spec.stars.jsrr.mode == "vjp"


def test_unknown_keys_are_forbidden_everywhere():
    for section, bad in [("train", {"max_steps": 1, "lrr": 1}), ("model", {"norm": {"kind": "x"}})]:
        with pytest.raises(ValidationError, match="Extra inputs"):
            spec_of(**{section: bad})


def test_field_docstrings_are_the_schema_documentation():
    schema = JobSpec.model_json_schema()
    lr = schema["$defs"]["TrainSpec"]["properties"]["lr"]
    assert "learning rate" in lr["description"].lower()
    assert schema["properties"]["name"]["description"].startswith("Job name")
    assert "discriminator" in json.dumps(schema["properties"]["data"]) or "oneOf" in json.dumps(schema)


# ------------------------------------------------------------------------------------ model
def interface_fields() -> set[str]:
    text = (REPO / "docs" / "interfaces.md").read_text()
    block = text.split("LoopLMConfig fields:", 1)[1].split("\n\n", 1)[0].replace("\n", " ")
    block = re.sub(r"\([^)]*\)", "", block)  # drop the explanations in parentheses
    return {item.strip(" .") for item in block.split(",")}


def test_looplm_config_kwargs_use_the_interface_names():
    spec = spec_of(model={"d_model": 64, "norm": {"type": "rmsnorm", "position": "pre", "eps": 1e-6}})
    kwargs = spec.model.looplm_config_kwargs()
    assert kwargs["norm_type"] == "rmsnorm" and kwargs["norm_position"] == "pre" and kwargs["norm_eps"] == 1e-6
    assert kwargs["d_model"] == 64
    assert "norm" not in kwargs and "vocab_size" not in kwargs and "pad_token_id" not in kwargs
    unknown = set(kwargs) - interface_fields()
    assert not unknown, f"not LoopLMConfig fields per docs/interfaces.md: {unknown}"


def test_looplm_config_kwargs_build_a_loop_lm_config():
    config_mod = pytest.importorskip("stars.model.config")
    spec = spec_of(model={"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "injection": "add"})
    cfg = config_mod.LoopLMConfig(vocab_size=15, **spec.model.looplm_config_kwargs())
    assert (cfg.d_model, cfg.n_kv_heads, cfg.injection) == (64, 2, "add")
    # the spec offers exactly the model's choices
    from stars.spec import ModelSpec, NormSpec

    def choices(model, name):
        return set(re.findall(r"'([^']+)'", str(model.model_fields[name].annotation)))

    assert choices(NormSpec, "type") == set(config_mod.NORM_TYPES)
    assert choices(NormSpec, "position") == set(config_mod.NORM_POSITIONS)
    assert choices(ModelSpec, "injection") == set(config_mod.INJECTIONS)
    assert choices(ModelSpec, "positions") == set(config_mod.POSITIONS)
    assert choices(ModelSpec, "mlp") == set(config_mod.MLPS)


@pytest.mark.parametrize(
    ("model", "path", "fragment"),
    [
        ({"d_model": 64, "n_heads": 5}, "model.n_heads", "must divide d_model=64"),
        ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads", "must divide n_heads=4"),
        ({"n_block": 0}, "model.n_block", ">= 1"),
        ({"d_model": 12, "n_heads": 4, "positions": "rope"}, "model.n_heads", "even head size"),
        ({"source": "ouro"}, "model.pretrained", "required"),
        ({"source": "ouro", "pretrained": "x", "d_model": 64}, "model.d_model", "comes from the checkpoint"),
        ({"pretrained": "some/dir"}, "model.pretrained", "only for model.source"),
    ],
)
def test_model_cross_field_rules(tmp_path, model, path, fragment):
    p = write(tmp_path, yaml.safe_dump({**MINIMAL, "model": model}))
    problems = problems_of(p)
    assert any(pr.path == path and fragment in pr.message for pr in problems), problems


def test_checkpoint_models_have_no_architecture_and_no_config_kwargs():
    spec = spec_of(model={"source": "ouro", "pretrained": "ByteDance/Ouro-1.4B"}, data={"task": "math_sft"})
    assert spec.model.d_model is None
    with pytest.raises(ValueError, match="only for model.source 'looplm'"):
        spec.model.looplm_config_kwargs()
    assert spec.eval.tasks == []  # the default eval of a math job is "none" until tasks are named


# ------------------------------------------------------------------------------------ data
def test_math_sft_defaults_match_the_paper_recipe():
    spec = spec_of(model={"source": "ouro", "pretrained": "p"}, data={"task": "math_sft"})
    d = spec.data
    assert d.task == "math_sft"
    assert (d.problem_column, d.solution_column) == ("problem", "solution")
    assert (d.shuffle_seed, d.max_seq_len, d.length_policy) == (74, 2048, "drop")


def test_a_new_looplm_on_math_needs_a_tokenizer_and_long_enough_positions(tmp_path):
    p = write(tmp_path, yaml.safe_dump({**MINIMAL, "data": {"task": "math_sft", "max_seq_len": 512}}))
    by_path = {pr.path: pr.message for pr in problems_of(p)}
    assert "required when model.source is 'looplm'" in by_path["data.tokenizer"]
    assert "must be >= 512" in by_path["model.max_position_embeddings"]


def test_addition_files_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"num1": 1, "num2": 2}\n')
    spec = load_spec(write(tmp_path, yaml.safe_dump({**MINIMAL, "data": {"task": "addition", "train_file": "train.jsonl"}})))
    assert spec.data.train_file == str(tmp_path / "train.jsonl")  # made absolute
    p = write(tmp_path, yaml.safe_dump({**MINIMAL, "data": {"task": "addition", "test_file": "nope.jsonl"}}))
    (problem,) = problems_of(p)
    assert problem.path == "data.test_file" and "file not found: 'nope.jsonl'" in problem.message


def test_eval_tasks_must_fit_the_training_task(tmp_path):
    p = write(tmp_path, yaml.safe_dump({**MINIMAL, "eval": {"tasks": ["addition", "gsm8k"]}}))
    (problem,) = problems_of(p)
    assert problem.path == "eval.tasks[1]" and "math benchmark" in problem.message


# ------------------------------------------------------------------------------------ stars/train
def test_loop_samplers_by_kind():
    for sampling, attr in [
        ({"kind": "fixed", "depth": 4}, "depth"),
        ({"kind": "poisson_lognormal", "mean": 8, "backprop_depth": 4}, "backprop_depth"),
        ({"kind": "uniform", "min": 2, "max": 8}, "max"),
    ]:
        spec = spec_of(stars={"loop_sampling": sampling})
        assert spec.stars.loop_sampling.kind == sampling["kind"]
        assert getattr(spec.stars.loop_sampling, attr) == sampling[attr]
    with pytest.raises(ValidationError, match="min \\(9\\) must be <= max \\(3\\)"):
        spec_of(stars={"loop_sampling": {"kind": "uniform", "min": 9, "max": 3}})
    with pytest.raises(ValidationError):
        spec_of(stars={"loop_sampling": {"kind": "fixed", "mu": 1.0}})  # mu is a lognormal field


def test_fd_jsrr_needs_float32_weights():
    with pytest.raises(ValidationError, match="'fd' .* needs model.dtype float32, got 'bfloat16'"):
        spec_of(model={"dtype": "bfloat16"}, stars={"jsrr": {"mode": "fd"}})
    assert spec_of(model={"dtype": "bfloat16"}, stars={"jsrr": {"mode": "fd", "weight": 0}})  # JSRR off
    assert spec_of(stars={"jsrr": {"mode": "fd"}}, train={"max_steps": 100, "precision": "bf16"})  # autocast


def test_jsrr_bounds():
    assert not spec_of(stars={"jsrr": {"weight": 0}}).stars.jsrr.enabled
    assert spec_of(stars={"jsrr": {"batch_fraction": 1.0}}).stars.jsrr.batch_fraction == 1.0
    assert spec_of(stars={"jsrr": {"mode": "fd"}}).stars.jsrr.mode == "fd"
    for bad in ({"batch_fraction": 0}, {"batch_fraction": 1.5}, {"weight": 1.0}, {"mode": "finite"}):
        with pytest.raises(ValidationError):
            spec_of(stars={"jsrr": bad})


@pytest.mark.parametrize(
    ("train", "path", "fragment"),
    [
        ({"max_steps": 10, "epochs": 1}, "train.max_steps", "exactly one"),
        ({"lr": 1e-3}, "train.max_steps", "neither is set"),
        ({"max_steps": 10, "warmup_steps": 10}, "train.warmup_steps", "must be < max_steps=10"),
        ({"max_steps": 10, "warmup_steps": 1, "warmup_fraction": 0.1}, "train.warmup_fraction", "not both"),
        ({"max_steps": 10, "precision": "fp16"}, "train.precision", "expected one of 'fp32', 'bf16'"),
        ({"max_steps": 10, "global_batch_size": 100, "micro_batch_size": 30}, "train.global_batch_size", "30 * 1"),
    ],
)
def test_train_rules(tmp_path, train, path, fragment):
    p = write(tmp_path, yaml.safe_dump({**MINIMAL, "train": train}))
    problems = problems_of(p)
    assert any(pr.path == path and fragment in pr.message for pr in problems), problems


def test_global_batch_must_split_over_workers(tmp_path):
    p = write(tmp_path, yaml.safe_dump({**MINIMAL, "resources": {"num_workers": 3}}))
    (problem,) = problems_of(p)
    assert problem.path == "train.global_batch_size"
    assert "divisible by resources.num_workers=3, got 128" in problem.message
    spec = spec_of(train={"max_steps": 5, "global_batch_size": 256, "micro_batch_size": 2}, resources={"num_workers": 32})
    assert spec.grad_accum_steps == 4


def test_bf16_precision_runs_without_gpus():
    assert spec_of(train={"max_steps": 5, "precision": "bf16"}).train.precision == "bf16"


def test_resources_rules():
    spec = spec_of(resources={"use_gpu": True, "accelerator_type": "A800"})
    assert spec.resources.gpus_per_worker == 1
    with pytest.raises(ValidationError, match="needs resources.use_gpu"):
        spec_of(resources={"accelerator_type": "A800"})
    with pytest.raises(ValidationError, match="cpus_per_worker"):
        spec_of(resources={"resources_per_worker": {"CPU": 2}})


# ------------------------------------------------------------------------------------ eval
def test_depth_lists_parse_and_print_compactly():
    assert parse_depths("1-16") == list(range(1, 17))
    assert parse_depths("1-4, 8,16") == [1, 2, 3, 4, 8, 16]
    assert parse_depths([8, 1, 8]) == [1, 8]
    assert compact_depths([1, 2, 3, 4, 8, 16, 15]) == "1-4,8,15-16"
    for bad in ("1-x", "4-1", "0-3", "", True, [1.5]):
        with pytest.raises(ValueError):
            parse_depths(bad)
    spec = spec_of(eval={"depths": "1-8,12", "rho_depths": "4,16", "limit": 50})
    assert spec.eval.depths == [1, 2, 3, 4, 5, 6, 7, 8, 12]
    assert spec.model_dump(mode="json")["eval"]["depths"] == "1-8,12"
    assert spec.eval.rho_depths == [4, 16] and spec.eval.limit == 50


# ------------------------------------------------------------------------------------ sweep
def test_sweep_expands_to_trials_with_deterministic_keys():
    spec = spec_of(
        stars={"loop_sampling": {"kind": "fixed", "depth": 4}},
        sweep={"grid": {"model.norm.position": ["pre", "post"], "model.norm.type": ["layernorm", "rmsnorm", "simplenorm"]}},
    )
    trials = sweep_trials(spec)
    assert len(trials) == spec.sweep.num_trials == 6
    assert [t.key for t in trials][:2] == ["t000-position=pre,type=layernorm", "t001-position=pre,type=rmsnorm"]
    combos = {(t.spec.model.norm.position, t.spec.model.norm.type) for t in trials}
    assert len(combos) == 6
    assert all(not t.spec.sweep.grid for t in trials)
    assert len({spec_hash(t.spec) for t in trials}) == 6
    assert sweep_trials(spec_of())[0].assignments == {}


def test_sweep_paths_and_values_are_validated(tmp_path):
    text = """\
name: t
data: {task: addition}
train: {max_steps: 10}
sweep:
  grid:
    model.norm.typ: [rmsnorm]
    train.lr: [0.1, -1]
    model.d_model: [66]
    name: [a]
    stars.loop_sampling:
      - {kind: fixed, depth: 4}
      - {kind: fixed, depth: 0}
"""
    by_path = {pr.path: pr for pr in problems_of(write(tmp_path, text))}
    assert "did you mean 'type'?" in by_path["sweep.grid['model.norm.typ']"].message
    assert by_path["sweep.grid['model.norm.typ']"].line == 6
    assert "expected a number > 0, got -1" in by_path["sweep.grid['train.lr'][1]"].message
    assert "sweep.grid['train.lr'][0]" not in by_path
    assert "makes model.n_heads invalid" in by_path["sweep.grid['model.d_model'][0]"].message
    assert "cannot be swept" in by_path["sweep.grid.name"].message
    assert by_path["sweep.grid['stars.loop_sampling'][1]"].line == 12


def test_invalid_grid_points_are_reported():
    with pytest.raises(ValidationError, match="grid point"):
        spec_of(sweep={"grid": {"model.d_model": [64, 96], "model.n_heads": [4, 64]}})  # 96 % 64 != 0


# ------------------------------------------------------------------------------------ loader
FIVE_ERRORS = """\
name: five
data:
  task: addition
  digits: 0
model:
  norm: {type: batchnorm}
train:
  max_steps: 100
  lr: fast
stars:
  jsrr: {weight: 0.1, mode: vjpp}
resorces:
  num_workers: 1
"""


def test_five_mistakes_give_five_problems_with_lines_and_hints(tmp_path):
    p = write(tmp_path, FIVE_ERRORS)
    problems = problems_of(p)
    assert [str(pr) for pr in problems] == [
        f"{p}:4: data.digits: expected an integer >= 1, got 0",
        f"{p}:6: model.norm.type: expected one of 'layernorm', 'rmsnorm', 'simplenorm', got 'batchnorm'",
        f"{p}:9: train.lr: expected a number, got 'fast'",
        f"{p}:11: stars.jsrr.mode: expected one of 'vjp', 'jvp', 'fd', got 'vjpp'; did you mean 'vjp'?",
        f"{p}:12: resorces: unknown key; did you mean 'resources'?",
    ]
    file, path, line, message = problems[0]  # a problem is the tuple (file, dotted path, line, message)
    assert (file, path, line, message) == (str(p), "data.digits", 4, "expected an integer >= 1, got 0")
    assert problems[0].source is None


def test_errors_inside_a_union_member_and_bad_tags(tmp_path):
    p = write(tmp_path, "name: t\ndata:\n  task: addition\n  digts: 3\ntrain: {max_steps: 5}\n")
    (problem,) = problems_of(p)
    assert (problem.path, problem.line) == ("data.digts", 4)
    assert problem.message == "unknown key for task 'addition'; did you mean 'digits'?"
    p = write(tmp_path, "name: t\ndata: {task: addtion}\ntrain: {max_steps: 5}\n")
    (problem,) = problems_of(p)
    assert problem.path == "data.task" and "did you mean 'addition'?" in problem.message
    p = write(tmp_path, "name: t\ndata: {digits: 3}\ntrain: {max_steps: 5}\n")
    (problem,) = problems_of(p)
    assert problem.path == "data.task" and "required: one of 'addition', 'math_sft'" in problem.message


def test_unknown_key_without_a_close_match_lists_the_allowed_keys(tmp_path):
    p = write(tmp_path, "name: t\ndata: {task: addition}\ntrain: {max_steps: 5, zzz: 1}\n")
    (problem,) = problems_of(p)
    assert problem.message.startswith("unknown key (allowed: max_steps, epochs,")


def test_missing_required_and_bad_name(tmp_path):
    p = write(tmp_path, "name: My Job\ntrain: {max_steps: 5}\n")
    by_path = {pr.path: pr for pr in problems_of(p)}
    assert by_path["data"].message == "required field is missing"
    assert "expected a slug" in by_path["name"].message and by_path["name"].line == 1


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("name: t\ntrain: {max_steps: 5\n", 3, "invalid YAML"),
        ("name: t\n  bad indent: 1\n", 2, "invalid YAML"),
        ("name: t\nname: u\n", 2, "duplicate key 'name' (first at line 1)"),
        ("- a\n- b\n", 1, "expected a mapping of sections"),
        ("", None, "the file is empty"),
        ("x: !!python/object:os.system {}\n", 1, "invalid YAML"),
    ],
)
def test_yaml_problems(tmp_path, text, line, fragment):
    problems = problems_of(write(tmp_path, text))
    assert any(pr.line == line and fragment in pr.message for pr in problems), problems


def test_missing_file_and_directory(tmp_path):
    (problem,) = problems_of(tmp_path / "nope.yaml")
    assert str(problem) == f"{tmp_path / 'nope.yaml'}: file not found"
    (problem,) = problems_of(tmp_path)
    assert "is a directory" in problem.message


# ------------------------------------------------------------------------------------ overrides
def test_overrides_are_typed_by_the_schema(tmp_path):
    p = write(tmp_path, yaml.safe_dump(MINIMAL))
    spec = load_spec(
        p,
        [
            "train.lr=3e-4",
            "seed=7",
            "eval.depths=1-8",
            "train.betas=[0.9, 0.99]",
            "stars.loop_sampling={kind: fixed, depth: 6}",
            "sweep.grid.model.norm.type=[layernorm, rmsnorm]",
            "tracking.enabled=false",
        ],
    )
    assert spec.train.lr == 3e-4 and isinstance(spec.train.lr, float)
    assert spec.seed == 7
    assert spec.eval.depths == list(range(1, 9))
    assert spec.train.betas == (0.9, 0.99)
    assert spec.stars.loop_sampling.kind == "fixed" and spec.stars.loop_sampling.depth == 6
    assert spec.sweep.grid == {"model.norm.type": ["layernorm", "rmsnorm"]}
    assert spec.tracking.enabled is False


def test_bad_overrides_name_set_as_their_source(tmp_path):
    p = write(tmp_path, yaml.safe_dump(MINIMAL))
    problems = problems_of(p, ["train.lrr=1", "seed=x", "oops", "train.max_steps.x=1", "model.nrom.type=rmsnorm"])
    text = [str(pr) for pr in problems]
    assert f"{p}: --set train.lrr=1: train.lrr: unknown key; did you mean 'lr'?" in text
    assert f"{p}: --set seed=x: seed: expected an integer, got 'x'" in text
    assert any(t.startswith(f"{p}: --set oops: expected KEY=VALUE") for t in text)
    assert any("train.max_steps is a single value" in t for t in text)
    assert any("--set model.nrom.type=rmsnorm: model.nrom: unknown key; did you mean 'norm'?" in t for t in text)
    assert all(pr.line is None and pr.source for pr in problems)


def test_parse_override():
    assert parse_override("a.b= 3 ") == (("a", "b"), 3)
    assert parse_override("x=") == (("x",), None)
    assert parse_override("sweep.grid.model.d_model=[1]") == (("sweep", "grid", "model.d_model"), [1])
    with pytest.raises(ValueError, match="empty part"):
        parse_override("a..b=1")


def test_apply_overrides_to_a_spec():
    spec = spec_of()
    new = apply_overrides(spec, {"train.lr": 0.01, "model.norm.type": "rmsnorm"})
    assert (new.train.lr, new.model.norm.type, spec.train.lr) == (0.01, "rmsnorm", 3e-4)
    with pytest.raises(SpecError, match="did you mean 'lr'"):
        apply_overrides(spec, ["train.lrr=1"])


# ------------------------------------------------------------------------------------ resolve/export
def test_resolution_makes_places_explicit(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write(tmp_path, yaml.safe_dump(MINIMAL)))
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


def test_resolved_yaml_round_trips(tmp_path):
    spec = resolve_spec(spec_of(eval={"depths": "1-4,8"}, sweep={"grid": {"seed": [0, 1]}}), cwd=tmp_path)
    text = resolved_yaml(spec)
    assert text.startswith(f"# resolved STARS job spec; spec_hash {spec_hash(spec)}")
    again = load_spec(write(tmp_path, text, "resolved.yaml"))
    assert again == spec and spec_hash(again) == spec_hash(spec)


def test_resolved_yaml_for_mlflow_hides_secrets():
    spec = spec_of(resources={"env_vars": {"HF_TOKEN": "hf_abc", "OMP_NUM_THREADS": "2"}})
    assert "hf_abc" in resolved_yaml(spec)  # what the job itself runs
    logged = resolved_yaml(spec, redact=True)
    assert "hf_abc" not in logged
    assert yaml.safe_load(logged)["resources"]["env_vars"] == {"HF_TOKEN": "<redacted>", "OMP_NUM_THREADS": "2"}


def test_spec_hash_ignores_where_and_tracks_what():
    a = resolve_spec(spec_of(), cwd="/tmp/a")
    b = resolve_spec(spec_of(description="other words"), cwd="/tmp/b")
    assert a.resources.storage_path != b.resources.storage_path
    assert spec_hash(a) == spec_hash(b)
    assert re.fullmatch(r"[0-9a-f]{16}", spec_hash(a))
    assert spec_hash(apply_overrides(a, {"train.lr": 1e-3})) != spec_hash(a)
    assert spec_hash(apply_overrides(a, {"seed": 1})) != spec_hash(a)


def test_flatten_params_are_dotted_strings_without_secrets():
    spec = spec_of(
        resources={"env_vars": {"HF_TOKEN": "hf_secret123", "AWS_SECRET_ACCESS_KEY": "aws456", "OMP_NUM_THREADS": "1"}},
        tracking={"tags": {"team": "loops", "api_key": "k789"}},
        description="x" * 7000,
        sweep={"grid": {"model.norm.type": ["layernorm", "rmsnorm"]}},
    )
    params = flatten_params(spec)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())
    assert params["train.lr"] == "0.0003"
    assert params["model.norm.position"] == "post_sandwich"
    assert params["eval.depths"] == "1-16"
    assert params["eval.max_new_tokens"] == "None"  # 'tokens' is not a secret
    assert params["sweep.grid.model.norm.type"] == '["layernorm", "rmsnorm"]'
    assert params["resources.env_vars.OMP_NUM_THREADS"] == "1"
    assert params["resources.env_vars.HF_TOKEN"] == "<redacted>"
    assert params["tracking.tags.team"] == "loops"
    secrets = set(iter_secret_values(spec))
    assert secrets == {"hf_secret123", "aws456", "k789"}
    blob = json.dumps(params)
    assert not any(s in blob for s in secrets)
    assert len(params["description"]) <= 6000 and params["description"].endswith("(truncated)")
    assert all(len(k) <= 250 for k in params)


def test_secret_key_heuristic():
    assert all(map(is_secret_key, ["HF_TOKEN", "db_password", "apiKey", "AWS_ACCESS_KEY_ID", "secret"]))
    assert not any(map(is_secret_key, ["max_new_tokens", "tokenizer", "keep_checkpoints", "monkey", "NCCL_DEBUG"]))


def test_credentials_in_the_tracking_uri_are_refused():
    with pytest.raises(ValidationError, match="MLFLOW_TRACKING_PASSWORD"):
        spec_of(tracking={"uri": "https://user:pw@mlflow.example"})


def test_warnings_for_likely_mistakes():
    spec = spec_of(model={"source": "ouro", "pretrained": "p", "dtype": "bfloat16"}, data={"task": "math_sft"},
                   train={"max_steps": 10, "lr": 1e-6})
    assert any("round to zero" in w for w in spec_warnings(spec))
    local = resolve_spec(spec_of(), cwd="/tmp")
    warnings = spec_warnings(local, address="http://head:8265")
    assert any("resources.storage_path" in w for w in warnings)
    assert any("tracking.uri" in w for w in warnings)
    assert spec_warnings(local) == []


def test_spec_task_names_match_the_task_registry():
    benchmarks = pytest.importorskip("stars.tasks.benchmarks")
    from stars.spec import EVAL_TASKS, MATH_BENCHMARKS

    assert set(MATH_BENCHMARKS) == set(benchmarks.BENCHMARKS)
    assert set(EVAL_TASKS) == {"addition", *benchmarks.BENCHMARKS}


def test_addition_sequence_length_matches_the_task_tokenizer():
    addition = pytest.importorskip("stars.tasks.addition")
    for digits in (1, 4, 7):
        spec = spec_of(data={"task": "addition", "digits": digits})
        assert spec.data.max_seq_len() == addition.AdditionTokenizer(digits).max_length
