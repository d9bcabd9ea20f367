"""The YAML loader: every problem at once with file, line and dotted path; `--set` overrides."""

from __future__ import annotations

import pytest

from stars.errors import UserError
from stars.spec import SpecError, apply_overrides, load_spec, parse_override

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


def test_five_mistakes_give_five_problems_with_lines_and_hints(write, problems_of):
    p = write(FIVE_ERRORS)
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


def test_errors_inside_a_union_member_and_bad_tags(write, problems_of):
    p = write("name: t\ndata:\n  task: addition\n  digts: 3\ntrain: {max_steps: 5}\n")
    (problem,) = problems_of(p)
    assert (problem.path, problem.line) == ("data.digts", 4)
    assert problem.message == "unknown key for task 'addition'; did you mean 'digits'?"
    p = write("name: t\ndata: {task: addtion}\ntrain: {max_steps: 5}\n")
    (problem,) = problems_of(p)
    assert problem.path == "data.task" and "did you mean 'addition'?" in problem.message
    p = write("name: t\ndata: {digits: 3}\ntrain: {max_steps: 5}\n")
    (problem,) = problems_of(p)
    assert problem.path == "data.task" and "required: one of 'addition', 'math_sft'" in problem.message


def test_unknown_key_without_a_close_match_lists_the_allowed_keys(write, problems_of):
    p = write("name: t\ndata: {task: addition}\ntrain: {max_steps: 5, zzz: 1}\n")
    (problem,) = problems_of(p)
    assert problem.message.startswith("unknown key (allowed: max_steps, epochs,")


def test_missing_required_and_bad_name(write, problems_of):
    p = write("name: My Job\ntrain: {max_steps: 5}\n")
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
def test_yaml_problems(write, problems_of, text, line, fragment):
    problems = problems_of(write(text))
    assert any(pr.line == line and fragment in pr.message for pr in problems), problems


def test_missing_file_and_directory(tmp_path, problems_of):
    (problem,) = problems_of(tmp_path / "nope.yaml")
    assert str(problem) == f"{tmp_path / 'nope.yaml'}: file not found"
    (problem,) = problems_of(tmp_path)
    assert "is a directory" in problem.message


# ------------------------------------------------------------------------------------ overrides
def test_overrides_are_typed_by_the_schema(write, minimal):
    p = write(minimal)
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


def test_bad_overrides_name_set_as_their_source(write, minimal, problems_of):
    p = write(minimal)
    problems = problems_of(p, ["train.lrr=1", "seed=x", "oops", "train.max_steps.x=1", "model.nrom.type=rmsnorm"])
    text = [str(pr) for pr in problems]
    assert f"{p}: --set train.lrr=1: train.lrr: unknown key; did you mean 'lr'?" in text
    assert f"{p}: --set seed=x: seed: expected an integer, got 'x'" in text
    assert any(t.startswith(f"{p}: --set oops: expected KEY=VALUE") for t in text)
    assert any("train.max_steps is a single value" in t for t in text)
    assert any("--set model.nrom.type=rmsnorm: model.nrom: unknown key for source 'looplm'; did you mean 'norm'?" in t for t in text)
    assert all(pr.line is None and pr.source for pr in problems)


def test_parse_override():
    assert parse_override("a.b= 3 ") == (("a", "b"), 3)
    assert parse_override("x=") == (("x",), None)
    assert parse_override("sweep.grid.model.d_model=[1]") == (("sweep", "grid", "model.d_model"), [1])
    with pytest.raises(ValueError, match="empty part"):
        parse_override("a..b=1")


def test_apply_overrides_to_a_spec(spec_of):
    spec = spec_of()
    new = apply_overrides(spec, {"train.lr": 0.01, "model.norm.type": "rmsnorm"})
    assert (new.train.lr, new.model.norm.type, spec.train.lr) == (0.01, "rmsnorm", 3e-4)
    with pytest.raises(SpecError, match="did you mean 'lr'"):
        apply_overrides(spec, ["train.lrr=1"])


def test_spec_errors_are_user_errors(write, minimal):
    with pytest.raises(UserError) as info:
        load_spec(write({**minimal, "seed": -1}))
    assert isinstance(info.value, SpecError)
    file = info.value.problems[0].file
    assert info.value.lines() == [str(p) for p in info.value.problems] + [f"{file}: 1 problem"]


def test_set_keeps_dotted_paths_inside_sweep_grid_and_sample_whole():
    from stars.spec import parse_override

    assert parse_override("sweep.grid.model.d_model=[64, 128]") == (("sweep", "grid", "model.d_model"), [64, 128])
    assert parse_override("sweep.sample.train.lr={loguniform: [1.0e-4, 1.0e-3]}") == (
        ("sweep", "sample", "train.lr"), {"loguniform": [1e-4, 1e-3]})
    assert parse_override("sweep.seeds=[0, 1]") == (("sweep", "seeds"), [0, 1])
