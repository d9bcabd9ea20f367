"""Secrets in a spec: which keys hold them, and the spec's values with them replaced.

A value is secret when any key on its path looks like a secret's name (`resources.env_vars.HF_TOKEN`)
or when it is the password part of a URI (`postgresql://user:pw@host`). `resolved_yaml(redact=True)`
(what `starsctl submit --dry-run` and `validate --show` print, and what MLflow stores) and MLflow's
params (`stars.tracking.params`) use these.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["REDACTED", "is_secret_key", "redact_tree", "redact_uri"]

REDACTED = "<redacted>"

#: Name parts that mark a secret: `HF_TOKEN`, `db_password`, `aws_secret_access_key`, `apiKey`.
_SECRET_PARTS = {
    "token", "password", "passwd", "pwd", "secret", "credential", "credentials", "key", "apikey",
    "auth", "authorization", "cookie", "passphrase", "private",
}
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]+):(?P<pw>[^/@\s]+)@")


def is_secret_key(key: str) -> bool:
    """Whether a mapping key looks like it holds a secret: one of its parts (split at `_ - . /`
    and camelCase) is token, password, secret, key, auth, credential, ... (`max_new_tokens` and
    `tokenizer` are not secrets)."""
    parts = re.split(r"[_\-./ ]+|(?<=[a-z0-9])(?=[A-Z])", key)
    return any(p.lower() in _SECRET_PARTS for p in parts if p)


def redact_uri(text: str) -> str:
    """Replace the password of any `scheme://user:password@host` in `text`."""
    return _URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)


def redact_tree(value: Any, secret: bool = False) -> Any:
    """A copy of JSON-like data with every value under a secret-looking key replaced by `REDACTED`
    and every password inside a URI string too (`secret`: the value is already under such a key)."""
    if isinstance(value, dict):
        return {k: redact_tree(v, secret or is_secret_key(str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v, secret) for v in value]
    if secret and value not in (None, ""):
        return REDACTED
    return redact_uri(value) if isinstance(value, str) else value
