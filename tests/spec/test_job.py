"""JobSpec: defaults that follow from other sections, forbidden keys, the schema as documentation,
and inputs that must not pass (NaN, booleans as numbers, absurd magnitudes)."""

from __future__ import annotations

import json
from typing import Annotated, get_args, get_origin

import pytest
from pydantic import BaseModel, Strict, ValidationError

from stars.spec import JobSpec, load_spec
from stars.spec.schema import field_members


def test_minimal_spec_gets_defaults_from_other_sections(spec_of):
    spec = spec_of(resources={"num_workers": 4})
    assert spec.experiment == "t"
    assert spec.train.micro_batch_size == 32  # 128 / 4 workers
    assert spec.grad_accum_steps == 1
    assert spec.eval.tasks == ["addition"]
    assert spec.eval.depths == list(range(1, 17))
    assert spec.model.d_model == 128
    assert spec.model.norm is not None and spec.model.norm.position == "post_sandwich"
    assert spec.resources.gpus_per_worker == 0
    assert spec.stars.loop_sampling.kind == "lognormal"
    assert (spec.stars.loop_sampling.mu, spec.stars.loop_sampling.sigma) == (1.7, 0.4)
    assert spec.stars.jsrr.weight == 0.1 and spec.stars.jsrr.mode == "vjp"


def test_unknown_keys_are_forbidden_everywhere(spec_of):
    for section, bad in [("train", {"max_steps": 1, "lrr": 1}), ("model", {"norm": {"kind": "x"}})]:
        with pytest.raises(ValidationError, match="Extra inputs"):
            spec_of(**{section: bad})


def test_field_docstrings_are_the_schema_documentation():
    schema = JobSpec.model_json_schema()
    lr = schema["$defs"]["TrainSpec"]["properties"]["lr"]
    assert "learning rate" in lr["description"].lower()
    assert schema["properties"]["name"]["description"].startswith("Job name")
    assert "discriminator" in json.dumps(schema["properties"]["data"]) or "oneOf" in json.dumps(schema)
    model = json.dumps(schema["properties"]["model"])
    assert "discriminator" in model and "source" in model


# ---- inputs that pass pydantic's lax mode and must not pass the spec --------------------------------
@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ("seed: true", "seed", "expected an integer, got True"),
        ("train: {max_steps: true}", "train.max_steps", "expected an integer, got True"),
        ("train: {max_steps: 100, lr: true}", "train.lr", "expected a number, got True"),
        ("train: {max_steps: 100, grad_clip: .inf}", "train.grad_clip", "expected a finite number, got inf"),
        ("stars: {loop_sampling: {kind: lognormal, mu: .nan}}", "stars.loop_sampling.mu", "finite number"),
        ("train: {max_steps: 100, lr: .NaN}", "train.lr", "finite number"),
        ("train: {max_steps: 100, lr: nan}", "train.lr", "expected a number, got 'nan'"),  # a string
        ("train: {max_steps: 1e23}", "train.max_steps", "expected an integer, got 1e+23"),  # PyYAML: a string
        ("train: {max_steps: 1.0e+23}", "train.max_steps", "expected an integer, got 1e+23"),
        ("train: {max_steps: 1000000001}", "train.max_steps", "<= 1000000000"),
        ("train: {max_steps: 100, global_batch_size: 2097152}", "train.global_batch_size", "<= 1048576"),
        ("train: {max_steps: 100, lr: 1.0e+3}", "train.lr", "<= 10"),
        ("model: {d_model: 131072, n_heads: 4}", "model.d_model", "<= 65536"),
        ("resources: {num_workers: 100000}", "resources.num_workers", "<= 4096"),
        ("train: {max_steps: 3.0}", "train.max_steps", "expected an integer, got 3.0"),
        ("eval: {workers: false}", "eval.workers", "expected an integer, got False"),
        ("resources: {resources_per_worker: {x: .inf}}", "resources.resources_per_worker.x", "finite"),
    ],
)
def test_bad_numbers_are_refused_with_the_field_named(write, problems_of, text, path, fragment):
    base = "name: t\ndata: {task: addition}\n"
    if not text.startswith("train:"):
        base += "train: {max_steps: 100}\n"
    problems = problems_of(write(base + text + "\n"))
    assert any(pr.path == path and fragment in pr.message for pr in problems), problems


def test_numbers_in_exponent_notation_are_numbers(write, problems_of):
    # PyYAML reads `3e-4` as a string; the spec loader reads it as YAML 1.2 and JSON do
    path = write("name: t\ndata: {task: addition}\ntrain: {max_steps: 100, lr: 3e-3}\n")
    spec = load_spec(path, ["seed=3", "stars.jsrr.weight=0", "eval.limit=7", "train.eps=1e-9"])
    assert (spec.seed, spec.train.lr, spec.stars.jsrr.weight, spec.eval.limit, spec.train.eps) == (3, 3e-3, 0.0, 7, 1e-9)
    assert isinstance(spec.train.lr, float) and isinstance(spec.eval.limit, int)
    (problem,) = problems_of(path, ["train.lr='3e-4'"])  # quoted: a string, as the user wrote
    assert problem.path == "train.lr" and "expected a number, got '3e-4'" in problem.message


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    todo = [root]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.append(m)
        for field in m.model_fields.values():
            todo.extend(field_members(field.annotation))
    return seen


def _numeric_schemas(schema: dict) -> list[dict]:
    """Every integer/number schema under a property (through anyOf, items, additionalProperties)."""
    out = []
    if schema.get("type") in ("integer", "number"):
        out.append(schema)
    for key in ("anyOf", "oneOf", "prefixItems"):
        for sub in schema.get(key, []):
            out.extend(_numeric_schemas(sub))
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out.extend(_numeric_schemas(schema[key]))
    return out


def test_every_number_in_the_schema_has_an_upper_bound():
    schema = JobSpec.model_json_schema()
    models = {"JobSpec": schema, **schema["$defs"]}
    unbounded = []
    for model_name, model in models.items():
        for name, prop in model.get("properties", {}).items():
            for num in _numeric_schemas(prop):
                if "maximum" not in num and "exclusiveMaximum" not in num:
                    unbounded.append(f"{model_name}.{name}")
    assert not unbounded, f"numeric fields without an upper bound in the JSON schema: {unbounded}"


def _loose_numbers(annotation, metadata=()) -> bool:
    """Whether an annotation holds an int or float that pydantic would take from a boolean."""
    if annotation in (int, float):
        return not any(isinstance(m, Strict) for m in metadata)
    if get_origin(annotation) is Annotated:
        inner, *extra = get_args(annotation)
        return _loose_numbers(inner, (*metadata, *extra))
    return any(_loose_numbers(arg) for arg in get_args(annotation))


def test_every_number_field_is_strict():
    # depth lists are parsed by `parse_depths`, which refuses booleans itself
    parsed = {("EvalSpec", "depths"), ("EvalSpec", "rho_depths")}
    loose = [
        f"{model.__name__}.{name}"
        for model in _models(JobSpec)
        for name, field in model.model_fields.items()
        if (model.__name__, name) not in parsed and _loose_numbers(field.annotation, field.metadata)
    ]
    assert not loose, f"number fields that would take booleans: {loose}"


def test_the_sweep_section_is_documented_in_the_schema():
    # `starsctl schema` is the help text: every sweep field says what it does
    defs = JobSpec.model_json_schema()["$defs"]
    for model in ("SweepSpec", "SampleDistribution", "EarlyStopSpec"):
        undocumented = [name for name, prop in defs[model]["properties"].items() if len(prop.get("description", "")) < 20]
        assert not undocumented, f"{model}: {undocumented}"
    sweep = defs["SweepSpec"]["properties"]
    assert set(sweep) >= {"variants", "grid", "sample", "num_samples", "sample_seed", "seeds", "max_concurrent_trials", "early_stop"}
    assert "pins" in sweep["variants"]["description"] and "loguniform" in sweep["sample"]["description"]
