"""Secrets: which keys hold them, and spec data with them replaced."""

from __future__ import annotations

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
