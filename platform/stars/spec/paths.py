"""Paths in a spec: local or remote, absolute against a base, and safe as one directory name."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

__all__ = ["MAX_COMPONENT", "absolute_path", "is_local_path", "is_path_like", "safe_path_component"]

_URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
#: Longest name `safe_path_component` returns (filesystems allow 255 bytes; Ray and MLflow add
#: prefixes and suffixes to trial directory names).
MAX_COMPONENT = 120


def is_local_path(path: str) -> bool:
    """True for a plain filesystem path or a `file://` URI, False for s3://, gs://, ... URIs."""
    return not _URI_SCHEME.match(path) or path.startswith("file://")


def is_path_like(uri: str) -> bool:
    """Whether a tracking URI is a filesystem path (not `databricks`, not `http://...`)."""
    return "://" not in uri and (uri.startswith((".", "/", "~")) or "/" in uri or "\\" in uri)


def absolute_path(path: str, base: Path) -> str:
    """`path` made absolute against `base` (`~` expanded); `file://` URIs are left as they are."""
    if path.startswith("file://"):
        return path
    p = Path(path).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def safe_path_component(text: str, max_length: int = MAX_COMPONENT) -> str:
    """`text` as one directory name that cannot leave its parent directory.

    Keeps only `[A-Za-z0-9._=,+-]` (anything else becomes `_`), never starts with a dot (so never `.`
    or `..`) and is at most `max_length` characters. When anything had to change, a short hash of the
    original is appended, so distinct texts stay distinct: `../../x` -> `_._.._x-<hash>`.
    """
    safe = _UNSAFE.sub("_", text) or "_"
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe == text and 0 < len(safe) <= max_length:
        return safe
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{safe[: max(1, max_length - len(digest) - 1)]}-{digest}"
