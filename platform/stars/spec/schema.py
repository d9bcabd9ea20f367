"""Walking the spec's schema: which models a field can hold, which keys a dotted path may use, and
how a path is written in messages. Everything takes the root model as an argument, so the job model
(`stars.spec.job`) and the loader can both use these without importing each other."""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

__all__ = [
    "check_schema_path",
    "did_you_mean",
    "discriminated_members",
    "field_members",
    "format_path",
    "schema_field_names",
    "set_path",
    "unwrap",
]

Loc = tuple[str | int, ...]


def unwrap(annotation: Any) -> Any:
    """Strip Annotated/Optional from a field annotation."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
            continue
        if origin is Union or origin is types.UnionType:
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def field_members(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation can hold (one, several for a union, none)."""
    ann = unwrap(annotation)
    origin = get_origin(ann)
    if origin is Union or origin is types.UnionType:
        return [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return []


def discriminated_members(field: Any) -> dict[str, type[BaseModel]]:
    """Tag -> member model of a discriminated-union field (a member may have several tags, e.g.
    `source: Literal["pretrained", "ouro"]`), {} for other fields."""
    disc = getattr(field, "discriminator", None)
    if not isinstance(disc, str):
        return {}
    out: dict[str, type[BaseModel]] = {}
    for member in field_members(field.annotation):
        f = member.model_fields.get(disc)
        if f is not None and get_origin(f.annotation) is Literal:
            out.update({str(tag): member for tag in get_args(f.annotation)})
    return out


def _is_dict(annotation: Any) -> bool:
    return get_origin(unwrap(annotation)) is dict


def schema_field_names(root: type[BaseModel], path: Sequence[str]) -> list[str] | None:
    """Field names allowed under `path` (keys from `root`; () = top level); None if `path` does not
    lead to a model (a scalar, list or free-form mapping). Unions give their members' fields."""
    models: list[type[BaseModel]] = [root]
    for key in path:
        nxt: list[type[BaseModel]] = []
        for m in models:
            if key in m.model_fields:
                nxt.extend(field_members(m.model_fields[key].annotation))
        if not nxt:
            return None
        models = nxt
    names: list[str] = []
    for m in models:
        names.extend(n for n in m.model_fields if n not in names)
    return names


def check_schema_path(root: type[BaseModel], dotted: str) -> str | None:
    """None if `dotted` names a field under `root`, else an error message (with did-you-mean)."""
    keys = dotted.split(".")
    models: list[type[BaseModel]] = [root]
    for i, key in enumerate(keys):
        allowed: list[str] = []
        nxt: list[type[BaseModel]] = []
        dict_field = False
        for m in models:
            allowed.extend(n for n in m.model_fields if n not in allowed)
            if key in m.model_fields:
                ann = m.model_fields[key].annotation
                nxt.extend(field_members(ann))
                dict_field = dict_field or _is_dict(ann)
        where = ".".join(keys[:i]) or "the top level"
        if key not in allowed:
            return f"no field {key!r} in {where}{did_you_mean(key, allowed)}"
        rest = keys[i + 1 :]
        if not rest:
            return None
        if dict_field and len(rest) == 1:
            return None
        if not nxt:
            return f"{'.'.join(keys[: i + 1])!r} has no sub-fields"
        models = nxt
    return None


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`"; did you mean 'x'?"` for the closest choice, or `""`."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def format_path(loc: Loc) -> str:
    """`("eval", "tasks", 0)` -> `eval.tasks[0]`; `("sweep", "grid", "model.d_model")` ->
    `sweep.grid['model.d_model']`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "." in part or not part:
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
    return out


def set_path(data: dict[str, Any], keys: Sequence[str], value: Any) -> None:
    """`data[k0][k1]...[kn] = value`, creating (or replacing non-mapping) parents on the way."""
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value
