"""MLflow params of a spec: flat dotted strings within MLflow's limits, secrets redacted."""

from __future__ import annotations

import json

from stars.spec import JobSpec
from stars.tracking.params import MAX_PARAM_KEY, MAX_PARAM_VALUE, flatten_params, iter_secret_values


def test_flatten_params_are_dotted_strings_without_secrets():
    spec = JobSpec.model_validate({
        "name": "t",
        "data": {"task": "addition"},
        "train": {"max_steps": 100},
        "resources": {"env_vars": {"HF_TOKEN": "hf_secret123", "AWS_SECRET_ACCESS_KEY": "aws456", "OMP_NUM_THREADS": "1"}},
        "tracking": {"tags": {"team": "loops", "api_key": "k789"}},
        "description": "x" * 7000,
        "sweep": {"grid": {"model.norm.type": ["layernorm", "rmsnorm"]}},
    })
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
    assert len(params["description"]) <= MAX_PARAM_VALUE and params["description"].endswith("(truncated)")
    assert all(len(k) <= MAX_PARAM_KEY for k in params)
