"""Secrets: which keys hold them, and spec data with them replaced."""

from __future__ import annotations

import pytest

from stars.spec import REDACTED, is_secret_key, redact_tree, redact_uri


def test_secret_key_heuristic():
    assert all(map(is_secret_key, ["HF_TOKEN", "db_password", "apiKey", "AWS_ACCESS_KEY_ID", "secret"]))
    assert not any(map(is_secret_key, ["max_new_tokens", "tokenizer", "keep_checkpoints", "monkey", "NCCL_DEBUG"]))


def test_redact_tree_replaces_values_under_secret_keys_and_uri_passwords():
    data = {"env": {"HF_TOKEN": "hf_x", "N": "1"}, "uris": ["postgresql://u:pw@h/db"], "api_key": {"a": 1}}
    out = redact_tree(data)
    assert out == {"env": {"HF_TOKEN": REDACTED, "N": "1"}, "uris": [f"postgresql://u:{REDACTED}@h/db"],
                   "api_key": {"a": REDACTED}}
    assert data["env"]["HF_TOKEN"] == "hf_x"  # a copy
    assert redact_uri("see https://me:s3cret@host/x") == f"see https://me:{REDACTED}@host/x"


def test_problems_never_echo_a_secret_value(tmp_path):
    """A secret given with the wrong type, or unreadable as YAML, is reported without its value."""
    from stars.spec import SpecError, load_spec

    spec = tmp_path / "job.yaml"
    spec.write_text("name: j\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec, ["resources.env_vars.MLFLOW_TRACKING_PASSWORD=0123", "resources.env_vars.HF_TOKEN=[x",
                         "resources.env_vars.OMP_NUM_THREADS=[2]"])
    text = "\n".join(err.value.lines())
    assert "0123" not in text and "83" not in text and "[x" not in text
    assert "MLFLOW_TRACKING_PASSWORD" in text and "HF_TOKEN" in text  # which key is wrong is still said
    assert "[2]" in text or "a list" in text  # non-secret values are still shown
