"""Depth lists as users write them: `"1-16"`, `"1,2,4,8"`, `"1-8,12,16"`, an int or a list of ints."""

from __future__ import annotations

import re

from pydantic import WithJsonSchema

__all__ = ["DEPTHS_SCHEMA", "MAX_DEPTH", "compact_depths", "parse_depths"]

#: Largest loop depth a spec may ask for (samplers, evaluation depths, `default_depth`).
MAX_DEPTH = 1024

_DEPTH_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")

#: How depth lists look in YAML / JSON: "1-16", "1,2,4,8" or a list of integers.
DEPTHS_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "string", "pattern": r"^\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*$"},
            {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": MAX_DEPTH}},
        ]
    }
)


def parse_depths(value: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """Parse a depth list: `"1-16"`, `"1,2,4,8"`, `"1-8,12,16"`, an int or a list of ints.

    Returns the sorted unique depths. Raises ValueError with a readable message.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected depths like '1-16' or [1, 2, 4], got {value!r}")
    if isinstance(value, int):
        items: list[int] = [value]
    elif isinstance(value, str):
        items = []
        for part in value.split(","):
            m = _DEPTH_ITEM.match(part)
            if not m:
                raise ValueError(f"expected depths like '1-16' or '1,2,4,8', got {value!r}")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            if hi < lo:
                raise ValueError(f"depth range {part.strip()!r} is empty (end < start)")
            if hi > MAX_DEPTH:
                raise ValueError(f"depths must be <= {MAX_DEPTH}, got {hi}")
            items.extend(range(lo, hi + 1))
    elif isinstance(value, (list, tuple)):
        items = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"expected a list of integers, got {v!r} in {list(value)!r}")
            items.append(v)
    else:
        raise ValueError(f"expected depths like '1-16' or [1, 2, 4], got {value!r}")
    if not items:
        raise ValueError("expected at least one depth")
    bad = [d for d in items if d < 1 or d > MAX_DEPTH]
    if bad:
        raise ValueError(f"depths must be between 1 and {MAX_DEPTH}, got {bad[0]}")
    return sorted(set(items))


def compact_depths(depths: list[int]) -> str:
    """The inverse of `parse_depths`: `[1, 2, 3, 4, 8]` -> `"1-4,8"`."""
    parts: list[str] = []
    ds = sorted(set(depths))
    i = 0
    while i < len(ds):
        j = i
        while j + 1 < len(ds) and ds[j + 1] == ds[j] + 1:
            j += 1
        parts.append(str(ds[i]) if i == j else f"{ds[i]}-{ds[j]}")
        i = j + 1
    return ",".join(parts)
