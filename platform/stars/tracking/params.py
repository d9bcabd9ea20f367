"""A job spec as MLflow params, within MLflow's limits and without secrets.

MLflow takes flat string params: keys up to 250 characters of `[/\\w.\\- :]`, values up to 6000
characters. `flatten_params` turns the spec into dotted keys (`train.lr` -> "0.003") and redacts
values under secret-looking keys (`stars.spec.is_secret_key`) and passwords inside URIs. Pure Python:
no MLflow import, so it is testable on its own.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

from stars.spec import REDACTED, JobSpec, is_secret_key, redact_uri

__all__ = ["MAX_PARAM_KEY", "MAX_PARAM_VALUE", "flatten_params", "iter_secret_values", "param_key"]

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_PARAM_KEY = 250  # MLflow's limit on a param key
_PARAM_KEY_BAD = re.compile(r"[^/\w.\- :]")


def param_key(key: str) -> str:
    """`key` as a valid MLflow param key: characters MLflow refuses become `_`; a key too long is cut
    and ends in a hash of the whole, so distinct keys stay distinct."""
    key = _PARAM_KEY_BAD.sub("_", key)
    if len(key) > MAX_PARAM_KEY:
        key = key[: MAX_PARAM_KEY - 9] + "~" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return key


def _param_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        text = json.dumps(value, separators=(", ", ": "))
    else:
        text = str(value)
    text = redact_uri(text)
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - 14] + "...(truncated)"
    return text


def _flatten(prefix: str, value: Any, out: dict[str, str], secret: bool) -> None:
    if isinstance(value, dict) and value and not prefix.startswith("sweep.grid"):
        for k, v in value.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            _flatten(key, v, out, secret or is_secret_key(str(k)))
        return
    if prefix == "sweep.grid" and isinstance(value, dict) and value:
        # one param per grid path, its values as a JSON list
        for k, v in value.items():
            out[param_key(f"sweep.grid.{k}")] = _param_value(v)
        return
    out[param_key(prefix)] = REDACTED if secret else _param_value(value)


def flatten_params(spec: JobSpec) -> dict[str, str]:
    """MLflow params: the spec flattened to dotted keys (`train.lr` -> "0.003"), lists and grid
    values as JSON, values cut to MLflow's 6000 characters. Values under keys that look secret
    (`is_secret_key`: HF_TOKEN, *_PASSWORD, *_SECRET*, *_KEY, ...) are replaced by `<redacted>`,
    and so are passwords inside URIs."""
    out: dict[str, str] = {}
    _flatten("", spec.model_dump(mode="json"), out, False)
    return out


def iter_secret_values(spec: JobSpec) -> Iterator[str]:
    """Values of the spec that `flatten_params` redacts (for tests and log scrubbing)."""

    def walk(value: Any, secret: bool) -> Iterator[str]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, secret or is_secret_key(str(k)))
        elif isinstance(value, list):
            for v in value:
                yield from walk(v, secret)
        elif secret and value not in (None, ""):
            yield str(value)

    yield from walk(spec.model_dump(mode="json"), False)
