"""The model section: a LoopLM (architecture fields with their defaults) or a checkpoint (none)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from stars.spec import CheckpointModel, LoopLMModel, NormSpec, architecture_problems

REPO = Path(__file__).resolve().parents[2]


def interface_fields() -> set[str]:
    text = (REPO / "docs" / "interfaces.md").read_text()
    block = text.split("LoopLMConfig fields:", 1)[1].split("\n\n", 1)[0].replace("\n", " ")
    block = re.sub(r"\([^)]*\)", "", block)  # drop the explanations in parentheses
    return {item.strip(" .") for item in block.split(",")}


def test_a_spec_without_a_model_is_a_default_looplm(spec_of):
    spec = spec_of()
    assert isinstance(spec.model, LoopLMModel)
    assert spec.model.d_model == LoopLMModel.model_fields["d_model"].default == 128
    assert spec.model.norm.position == "post_sandwich"
    no_source = spec_of(model={"d_model": 64})  # no `source`: still a LoopLM
    assert isinstance(no_source.model, LoopLMModel) and no_source.model.d_model == 64


def test_looplm_config_kwargs_use_the_interface_names(spec_of):
    spec = spec_of(model={"d_model": 64, "norm": {"type": "rmsnorm", "position": "pre", "eps": 1e-6}})
    kwargs = spec.model.looplm_config_kwargs()
    assert kwargs["norm_type"] == "rmsnorm" and kwargs["norm_position"] == "pre" and kwargs["norm_eps"] == 1e-6
    assert kwargs["d_model"] == 64
    assert "norm" not in kwargs and "vocab_size" not in kwargs and "pad_token_id" not in kwargs
    assert "dtype" not in kwargs and "source" not in kwargs
    unknown = set(kwargs) - interface_fields()
    assert not unknown, f"not LoopLMConfig fields per docs/interfaces.md: {unknown}"


def test_looplm_config_kwargs_build_a_loop_lm_config(spec_of):
    config_mod = pytest.importorskip("stars.model.config")
    spec = spec_of(model={"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "injection": "add"})
    cfg = config_mod.LoopLMConfig(vocab_size=15, **spec.model.looplm_config_kwargs())
    assert (cfg.d_model, cfg.n_kv_heads, cfg.injection) == (64, 2, "add")
    # the spec's defaults are the model's defaults
    default = config_mod.LoopLMConfig(vocab_size=15, **spec_of().model.looplm_config_kwargs())
    plain = config_mod.LoopLMConfig(vocab_size=15)
    assert default.to_dict() == plain.to_dict()

    # the spec offers exactly the model's choices
    def choices(model, name):
        return set(re.findall(r"'([^']+)'", str(model.model_fields[name].annotation)))

    assert choices(NormSpec, "type") == set(config_mod.NORM_TYPES)
    assert choices(NormSpec, "position") == set(config_mod.NORM_POSITIONS)
    assert choices(LoopLMModel, "injection") == set(config_mod.INJECTIONS)
    assert choices(LoopLMModel, "positions") == set(config_mod.POSITIONS)
    assert choices(LoopLMModel, "mlp") == set(config_mod.MLPS)


@pytest.mark.parametrize(
    ("model", "path", "fragment"),
    [
        ({"d_model": 64, "n_heads": 5}, "model.n_heads", "must divide d_model=64"),
        ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads", "must divide n_heads=4"),
        ({"n_block": 0}, "model.n_block", ">= 1"),
        ({"d_model": 12, "n_heads": 4, "positions": "rope"}, "model.n_heads", "even head size"),
        ({"source": "ouro"}, "model.pretrained", "required"),
        ({"source": "ouro", "pretrained": "x", "d_model": 64}, "model.d_model", "comes from the checkpoint"),
        ({"source": "pretrained", "pretrained": "x", "norm": {"type": "rmsnorm"}}, "model.norm",
         "the architecture comes from the checkpoint when model.source is 'pretrained'; remove this key"),
        ({"pretrained": "some/dir"}, "model.pretrained", "only for model.source"),
        ({"trust_remote_code": True}, "model.trust_remote_code", "only for model.source 'pretrained' or 'ouro'"),
        ({"source": "ouro", "pretrained": "x", "dtyp": "float32"}, "model.dtyp",
         "unknown key for source 'ouro'; did you mean 'dtype'?"),
        ({"source": "ouroo", "pretrained": "x"}, "model.source", "did you mean 'ouro'?"),
    ],
)
def test_model_rules(problems_with, model, path, fragment):
    problems = problems_with(model=model)
    assert any(pr.path == path and fragment in pr.message for pr in problems), problems


def test_checkpoint_models_have_no_architecture_and_no_config_kwargs(spec_of):
    spec = spec_of(model={"source": "ouro", "pretrained": "ByteDance/Ouro-1.4B"}, data={"task": "math_sft"})
    assert isinstance(spec.model, CheckpointModel)
    assert not hasattr(spec.model, "d_model") and "d_model" not in CheckpointModel.model_fields
    assert not hasattr(spec.model, "looplm_config_kwargs")
    assert (spec.model.trust_remote_code, spec.model.dtype) == (False, "float32")
    assert spec.eval.tasks == []  # the default eval of a math job is "none" until tasks are named
    with pytest.raises(ValidationError, match="Extra inputs"):
        spec_of(model={"source": "pretrained", "pretrained": "p", "d_model": 64})


def test_the_architecture_rules_are_shared_with_the_model_config():
    config_mod = pytest.importorskip("stars.model.config")
    layouts = [(64, 5, None, "learned"), (64, 4, 3, "learned"), (12, 4, None, "rope"), (64, 4, 2, "rope")]
    for d_model, n_heads, n_kv_heads, positions in layouts:
        problems = architecture_problems(d_model, n_heads, n_kv_heads, positions)
        kwargs = dict(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, positions=positions)
        if not problems:
            config_mod.LoopLMConfig(**kwargs)
            LoopLMModel(**kwargs)
            continue
        with pytest.raises(ValueError) as err:
            config_mod.LoopLMConfig(**kwargs)
        for field, message in problems:
            assert f"LoopLMConfig.{field}: {message}" in str(err.value)
        with pytest.raises(ValidationError) as spec_err:
            LoopLMModel(**kwargs)
        assert {e["loc"][0] for e in spec_err.value.errors()} == {f for f, _ in problems}
