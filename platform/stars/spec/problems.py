"""Pydantic errors as readable problems: a clean dotted path and "expected ..., got ..." text.

`describe_errors(errors, root)` drops union tags from error locations, names the union member a
problem is in ("unknown key for source 'ouro'"), suggests the closest key or choice, and lets a
model give a better message for a key it forbids (`Section.unknown_key_message`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from stars.spec.redaction import is_secret_key
from stars.spec.schema import Loc, did_you_mean, discriminated_members, field_members

__all__ = ["describe_errors", "describe_value"]


@dataclass(frozen=True)
class _Where:
    loc: Loc
    """The location without union tags."""
    allowed: list[str] | None
    """Field names allowed at the level of the last element (for did-you-mean)."""
    owners: list[type[BaseModel]]
    """The models the last element is a key of."""
    member: tuple[str, str] | None
    """(discriminator, tag) when that level is a union member, e.g. ("source", "ouro")."""
    root: type[BaseModel]
    """The model the location starts from (to find where a misplaced key belongs)."""


def _clean_loc(root: type[BaseModel], loc: Loc) -> _Where:
    models: list[type[BaseModel]] | None = [root]
    tags: dict[str, type[BaseModel]] = {}
    disc: str | None = None
    out: list[str | int] = []
    allowed: list[str] | None = list(root.model_fields)
    owners: list[type[BaseModel]] = [root]
    member: tuple[str, str] | None = None
    context: tuple[str, str] | None = None
    for part in loc:
        if isinstance(part, str) and part in tags and disc is not None:
            models = [tags[part]]
            tags = {}
            member = (disc, part)
            continue
        tags = {}
        out.append(part)
        context, member = member, None
        owners = models or []
        allowed = [n for m in models for n in m.model_fields] if models else None
        if isinstance(part, int) or not models:
            models = None
            continue
        nxt: list[type[BaseModel]] = []
        for m in models:
            field = m.model_fields.get(part)
            if field is None:
                continue
            tags.update(discriminated_members(field))
            disc = getattr(field, "discriminator", None)
            nxt.extend(field_members(field.annotation))
        models = nxt or None
    return _Where(tuple(out), allowed, owners, context, root)


def describe_value(value: Any) -> str:
    """A value as error messages show it after "got": `a mapping`, `a list`, `null` or its short repr."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _unknown_key(where: _Where, key: str) -> str:
    tag = where.member[1] if where.member else None
    for owner in where.owners:
        better = getattr(owner, "unknown_key_message", None)
        message = better(key, tag) if better is not None else None
        if message:
            return message
    hint = did_you_mean(key, where.allowed or [])
    if not hint:
        here = ".".join(str(p) for p in where.loc)
        elsewhere = [path for path in _field_paths(where.root, key) if path != here][:3]
        if elsewhere:  # a key at the wrong level, e.g. `lr:` at the top instead of under `train:`
            hint = f"; did you mean {' or '.join(repr(p) for p in elsewhere)}?"
    if not hint and where.allowed:
        hint = f" (allowed: {', '.join(where.allowed)})"
    if where.member:
        return f"unknown key for {where.member[0]} {where.member[1]!r}{hint}"
    return f"unknown key{hint}"


def _field_paths(model: type[BaseModel], key: str, prefix: str = "") -> list[str]:
    """Dotted paths of every field named `key` under `model` (its own fields first)."""
    found: list[str] = []
    nested: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if name == key:
            found.append(path)
        for member in field_members(field.annotation):
            nested.extend(p for p in _field_paths(member, key, f"{path}.") if p not in nested)
    return found + [p for p in nested if p not in found]


_COMPARISONS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _friendly(err: Mapping[str, Any], where: _Where) -> str:
    """A pydantic error as 'expected ..., got ...'."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    key = where.loc[-1] if where.loc else None
    # A value under a secret-looking key (resources.env_vars.HF_TOKEN) is never echoed, not even
    # as YAML read it (0123 -> 83).
    got = "a value (hidden: the key looks secret)" if isinstance(key, str) and is_secret_key(key) else describe_value(value)
    if kind == "missing":
        return "missing item" if isinstance(key, int) else "required field is missing"
    if kind == "extra_forbidden":
        return _unknown_key(where, str(key))
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace(" or ", ", ")
        choices = re.findall(r"'([^']*)'", expected)
        return f"expected one of {expected}, got {got}{did_you_mean(str(value), choices)}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {got}"
    if kind == "finite_number":
        return f"expected a finite number, got {got}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {got}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {got}"
    if kind in ("string_type",):
        return f"expected a string, got {got} (quote it)"
    if kind in ("dict_type", "model_type", "model_attributes_type", "mapping_type"):
        return f"expected a mapping (key: value), got {got}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {got}"
    if kind in _COMPARISONS:
        bound = next(iter(ctx.values()), "?")
        noun = "an integer" if isinstance(bound, int) and isinstance(value, int) else "a number"
        return f"expected {noun} {_COMPARISONS[kind]} {_number(bound)}, got {got}"
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"expected at most {ctx.get('max_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "string_too_short":
        return f"expected at least {ctx.get('min_length')} character(s), got {got}"
    if kind == "string_too_long":
        return f"expected at most {ctx.get('max_length')} characters, got {len(str(value))}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "union_tag_not_found":
        return "required"
    if kind == "stars_cross":
        return str(err["msg"])
    msg = str(err["msg"])
    return msg[0].lower() + msg[1:] if msg else kind


def _tags_at(root: type[BaseModel], path: Loc) -> list[str]:
    model: type[BaseModel] = root
    field = None
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        members = field_members(field.annotation)
        if len(members) == 1:
            model = members[0]
    return list(discriminated_members(field)) if field is not None else []


def _tag_error(root: type[BaseModel], err: Mapping[str, Any], loc: Loc) -> tuple[Loc, str]:
    ctx = err.get("ctx") or {}
    disc = str(ctx.get("discriminator", "")).strip("'\"")
    expected = str(ctx.get("expected_tags", ""))
    if not expected:
        # union_tag_not_found has no expected tags: read them from the schema
        expected = ", ".join(repr(t) for t in _tags_at(root, _clean_loc(root, loc).loc))
    if err["type"] == "union_tag_not_found":
        return loc + (disc,), f"required: one of {expected}"
    tag = ctx.get("tag")
    choices = re.findall(r"'([^']*)'", expected)
    return loc + (disc,), f"expected one of {expected}, got {tag!r}{did_you_mean(str(tag), choices)}"


def describe_errors(errors: Iterable[Mapping[str, Any]], root: type[BaseModel]) -> list[tuple[Loc, str]]:
    """Pydantic errors of validating `root` as (clean path, friendly message) pairs."""
    out = []
    for err in errors:
        raw_loc: Loc = tuple(err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            raw_loc, message = _tag_error(root, err, raw_loc)
            out.append((_clean_loc(root, raw_loc).loc, message))
        else:
            where = _clean_loc(root, raw_loc)
            out.append((where.loc, _friendly(err, where)))
    return out
