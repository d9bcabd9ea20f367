"""Load a YAML job spec: every problem at once, each with file, line, dotted path and a fix.

    >>> spec = load_spec("jobs/addition.yaml", ["train.lr=3e-4", "seed=1"])

`load_spec` raises `SpecError` whose `problems` are `SpecProblem(file, path, line, message,
source)` tuples, printed as

    jobs/x.yaml:12: train.lr: expected a number, got 'fast'
    jobs/x.yaml:3: resorces: unknown key; did you mean 'resources'?
    jobs/x.yaml: --set train.lrr=1: train.lrr: unknown key; did you mean 'lr'?

YAML syntax errors, a missing file and bad `--set` items are reported the same way. Pure Python
(pydantic + yaml): importing this module imports neither torch nor ray.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import yaml
from pydantic import TypeAdapter, ValidationError

from stars.errors import UserError
from stars.spec.job import SECTION_NAMES, JobSpec, cross_section_errors, fill_derived_defaults
from stars.spec.problems import describe_errors, describe_value
from stars.spec.redaction import is_secret_key
from stars.spec.resolve import resolve_spec
from stars.spec.schema import check_schema_path, format_path, set_path

__all__ = [
    "SpecError",
    "SpecProblem",
    "apply_overrides",
    "load_spec",
    "parse_override",
    "validate_data",
]

Loc = tuple[str | int, ...]


class _Problem(NamedTuple):
    file: str | None
    """The spec file (None for a spec not read from a file)."""
    path: str
    """Dotted field path, e.g. `train.lr`, `eval.tasks[0]`; "" for the whole file."""
    line: int | None
    """1-based YAML line, when the problem is in the file."""
    message: str
    """What is wrong and what was expected."""


class SpecProblem(_Problem):
    """One problem of a spec: the tuple `(file, dotted path, line, message)`, plus `source`, where
    the value came from when not the file (e.g. `--set train.lr=fast`)."""

    source: str | None

    def __new__(
        cls, file: str | None, path: str, line: int | None, message: str, source: str | None = None
    ) -> SpecProblem:
        self = super().__new__(cls, file, path, line, message)
        self.source = source
        return self

    def __repr__(self) -> str:
        return f"SpecProblem({self.file!r}, {self.path!r}, {self.line!r}, {self.message!r}, source={self.source!r})"

    def __str__(self) -> str:
        where = self.file or "<spec>"
        if self.source:
            where = f"{where}: {self.source}"
        elif self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(UserError):
    """A spec with problems; `problems` lists all of them, `str()` prints one per line."""

    def __init__(self, problems: Sequence[SpecProblem]):
        self.problems: list[SpecProblem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        """Every problem, then `<file>: N problems` (what `starsctl` prints)."""
        n = len(self.problems)
        where = next((p.file for p in self.problems if p.file), "<spec>")
        return [str(p) for p in self.problems] + [f"{where}: {n} problem{'s' if n != 1 else ''}"]


# ----------------------------------------------------------------------------------------- YAML
class _SpecYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `3e-4` and `1e23` are numbers (as in YAML 1.2 and JSON), not
    the strings YAML 1.1 makes of them: spec floats are strict and take no strings."""


_SpecYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _walk_nodes(
    node: yaml.Node, path: Loc, lines: dict[Loc, int], problems: list[tuple[Loc, int, str]]
) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append((path, line, "a key must be a plain name, not a list or mapping"))
                continue
            key = key_node.value
            if key in seen:
                problems.append((path + (key,), line, f"duplicate key {key!r} (first at line {seen[key]})"))
                # YAML keeps the last value of a repeated key: its problems are at the last one's lines
                here = path + (key,)
                for stale in [loc for loc in lines if loc[: len(here)] == here]:
                    del lines[stale]
            else:
                seen[key] = line
            lines[path + (key,)] = line
            _walk_nodes(value_node, path + (key,), lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk_nodes(item, path + (i,), lines, problems)


def _parse_yaml(text: str, file: str) -> tuple[Any, dict[Loc, int], list[SpecProblem]]:
    """(data, line of every path, problems) of a YAML document."""
    loader = _SpecYamlLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = ", ".join(str(x) for x in (exc.problem, exc.context) if x)
        line = mark.line + 1 if mark is not None else None
        if exc.context_mark is not None and mark is not None and exc.context_mark.line != mark.line:
            what += f" (started at line {exc.context_mark.line + 1})"
        return None, {}, [SpecProblem(file, "", line, f"invalid YAML: {what}")]
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML parse error is marked
        return None, {}, [SpecProblem(file, "", None, f"invalid YAML: {exc}")]
    finally:
        loader.dispose()
    lines: dict[Loc, int] = {(): 1}
    raw: list[tuple[Loc, int, str]] = []
    if node is not None:
        lines[()] = node.start_mark.line + 1
        _walk_nodes(node, (), lines, raw)
    problems = [SpecProblem(file, _dotted(loc), line, msg) for loc, line, msg in raw]
    return data, lines, problems


# ------------------------------------------------------------------------------------ overrides
_OVERRIDE = re.compile(r"^\s*([^=\s][^=]*?)\s*=(.*)$", re.S)


#: Sweep mappings keyed by a whole dotted spec path: `--set sweep.grid.model.d_model=[64, 128]` sets
#: the grid entry `model.d_model`, not a nested `model: {d_model: ...}`.
_DOTTED_KEY_SECTIONS = ("sweep.grid.", "sweep.sample.")


def override_keys(key: str) -> tuple[str, ...]:
    """The path of a `--set` key: split at dots, except the spec path inside `sweep.grid.` and
    `sweep.sample.`, which stays one key."""
    for prefix in _DOTTED_KEY_SECTIONS:
        if key.startswith(prefix) and len(key) > len(prefix):
            return (*prefix.rstrip(".").split("."), key[len(prefix) :])
    return tuple(key.split("."))


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """`"train.lr=3e-4"` -> `(("train", "lr"), "3e-4")`: the value is read as YAML
    (`true`, `[1, 2]`, `{kind: fixed, depth: 4}`, `null`), then typed by the schema.
    `sweep.grid.<dotted path>=[...]` and `sweep.sample.<dotted path>={...}` keep the dotted path as one
    key. Raises ValueError."""
    m = _OVERRIDE.match(item)
    if not m:
        raise ValueError("expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, text = m.group(1), m.group(2).strip()
    keys = override_keys(key)
    if any(not k.strip() for k in keys):
        raise ValueError(f"empty part in the key {key!r}")
    try:
        value = yaml.load(text, Loader=_SpecYamlLoader) if text else None
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot read the value {text!r} as YAML ({str(exc).splitlines()[0]})") from None
    return keys, value


def _apply_override_items(
    data: dict[str, Any], overrides: Iterable[str], file: str | None
) -> tuple[list[tuple[tuple[str, ...], str]], list[SpecProblem]]:
    applied: list[tuple[tuple[str, ...], str]] = []
    problems: list[SpecProblem] = []
    for item in overrides:
        path, sep, _ = item.partition("=")
        secret = bool(sep) and is_secret_key(path.strip().rsplit(".", 1)[-1])
        source = f"--set {path}=<hidden>" if secret else f"--set {item}"  # never echo a secret's value
        try:
            keys, value = parse_override(item)
        except ValueError as exc:
            message = "cannot read the value as YAML (hidden: the key looks secret)" if secret else str(exc)
            problems.append(SpecProblem(file, "", None, message, source))
            continue
        node: Any = data
        blocked = None
        for i, k in enumerate(keys[:-1]):
            child = node.get(k) if isinstance(node, dict) else None
            if child is None:
                break
            if not isinstance(child, dict):
                blocked = ".".join(keys[: i + 1])
                break
            node = child
        if blocked is not None:
            problems.append(
                SpecProblem(file, ".".join(keys), None, f"{blocked} is a single value, not a mapping", source)
            )
            continue
        set_path(data, keys, value)
        applied.append((keys, source))
    return applied, problems


# ---------------------------------------------------------------------------- error conversion
_dotted = format_path


def _line_for(path: Loc, lines: Mapping[Loc, int]) -> int | None:
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _source_for(
    path: Loc, overrides: Sequence[tuple[tuple[str, ...], str]], lines: Mapping[Loc, int]
) -> str | None:
    for keys, source in reversed(overrides):
        if path[: len(keys)] == keys:
            return source
        if keys[: len(path)] == path and path not in lines:
            return source
    return None


def _problems(
    errors: Iterable[Mapping[str, Any]],
    file: str | None,
    lines: Mapping[Loc, int],
    overrides: Sequence[tuple[tuple[str, ...], str]],
) -> list[SpecProblem]:
    out: list[SpecProblem] = []
    for loc, message in describe_errors(errors, JobSpec):
        source = _source_for(loc, overrides, lines)
        line = None if source else _line_for(loc, lines)
        problem = SpecProblem(file, _dotted(loc), line, message, source)
        if problem not in out:
            out.append(problem)
    return out


def _partial_cross_errors(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cross-section errors among the sections that are valid on their own (so that a spec with a
    bad field also gets its batch-size or task mismatch reported in the same run)."""
    sections: dict[str, Any] = {}
    for name in SECTION_NAMES:
        field = JobSpec.model_fields[name]
        try:
            if name in data:
                adapter: TypeAdapter[Any] = TypeAdapter(_field_type(field))
                sections[name] = adapter.validate_python(data[name])
            elif not field.is_required():
                sections[name] = field.get_default(call_default_factory=True)
        except ValidationError:
            continue
    fill_derived_defaults(sections)
    errors = cross_section_errors(sections)
    if not errors:
        return []
    return list(ValidationError.from_exception_data("JobSpec", errors).errors())


def _field_type(field: Any) -> Any:
    # the field's own FieldInfo carries its discriminator and validators (e.g. model's default source)
    return Annotated[field.annotation, field]


def validate_data(
    data: Any,
    *,
    file: str | None = None,
    lines: Mapping[Loc, int] | None = None,
    overrides: Sequence[tuple[tuple[str, ...], str]] = (),
) -> JobSpec:
    """Validate a spec mapping into a `JobSpec` (not resolved); raise `SpecError` with every
    problem, including cross-section ones among the valid sections."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise SpecError(
            [SpecProblem(file, "", lines.get(()), f"expected a mapping of sections (name:, model:, ...), got {describe_value(data)}")]
        )
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        errors = list(exc.errors())
    problems = _problems(errors, file, lines, overrides)
    seen = {p.path for p in problems}
    for p in _problems(_partial_cross_errors(data) + _grid_path_errors(data), file, lines, overrides):
        if p.path not in seen:
            problems.append(p)
            seen.add(p.path)
    raise SpecError(_sorted(problems))


def _sorted(problems: list[SpecProblem]) -> list[SpecProblem]:
    """File problems by line, then those without a line (overrides, missing file ...)."""
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


def _grid_path_errors(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Unknown sweep paths, reported even when other problems keep the full sweep check from running."""
    sweep = data.get("sweep")
    grid = sweep.get("grid") if isinstance(sweep, dict) else None
    if not isinstance(grid, dict):
        return []
    errors = []
    for key in grid:
        problem = check_schema_path(JobSpec, str(key))
        if problem is not None:
            errors.append({"type": "stars_cross", "loc": ("sweep", "grid", key), "msg": problem, "input": key})
    return errors


def load_spec(
    path: str | Path, overrides: Sequence[str] = (), *, resolve: bool = True, cwd: str | Path | None = None
) -> JobSpec:
    """Read, override, validate and (by default) resolve a YAML job spec.

    `overrides` are `KEY=VALUE` items (`--set`), applied in order on top of the file. Raises
    `SpecError` listing every problem; never anything else for a user mistake.
    """
    file = str(path)
    p = Path(path)
    if not p.exists():
        raise SpecError([SpecProblem(file, "", None, "file not found")])
    if p.is_dir():
        raise SpecError([SpecProblem(file, "", None, "is a directory, not a spec file")])
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([SpecProblem(file, "", None, f"cannot read: {exc}")]) from None
    data, lines, problems = _parse_yaml(text, file)
    if problems and data is None:
        raise SpecError(problems)
    if data is None:
        raise SpecError([SpecProblem(file, "", None, "the file is empty")])
    if not isinstance(data, dict):
        raise SpecError(
            [SpecProblem(file, "", lines.get(()), f"expected a mapping of sections (name:, model:, ...), got {describe_value(data)}")]
        )
    applied, override_problems = _apply_override_items(data, overrides, file)
    problems.extend(override_problems)
    try:
        spec = validate_data(data, file=file, lines=lines, overrides=applied)
    except SpecError as exc:
        raise SpecError(_sorted(problems + exc.problems)) from None
    if problems:
        raise SpecError(problems)
    if not resolve:
        return spec
    try:
        return resolve_spec(spec, cwd=cwd)
    except ValidationError as exc:  # resolution changed a path that no longer validates
        raise SpecError(_problems(exc.errors(), file, lines, applied)) from None


def apply_overrides(spec: JobSpec, assignments: Mapping[str, Any] | Sequence[str]) -> JobSpec:
    """A new spec with values replaced: `{"train.lr": 1e-3}` (values as Python objects) or
    `["train.lr=1e-3"]` (`--set` items). Validated; raises `SpecError`."""
    data = json.loads(json.dumps(spec.model_dump(mode="json")))
    applied: list[tuple[tuple[str, ...], str]] = []
    if isinstance(assignments, Mapping):
        for key, value in assignments.items():
            keys = override_keys(key)
            set_path(data, keys, value)
            applied.append((keys, f"{key}={value!r}"))
    else:
        applied, problems = _apply_override_items(data, assignments, None)
        if problems:
            raise SpecError(problems)
    return validate_data(data, overrides=applied)
