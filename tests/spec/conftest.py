"""Helpers of the spec tests: a minimal valid spec, and specs validated or loaded with their problems."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from stars.spec import JobSpec, SpecError, SpecProblem, load_spec

MINIMAL = {"name": "t", "data": {"task": "addition"}, "train": {"max_steps": 100}}


@pytest.fixture
def minimal() -> dict:
    """A fresh copy of the smallest valid spec mapping."""
    return json.loads(json.dumps(MINIMAL))


@pytest.fixture
def spec_of() -> Callable[..., JobSpec]:
    """`spec_of(train={...}, ...)`: the minimal spec with whole sections replaced, validated."""

    def make(**sections) -> JobSpec:
        data = json.loads(json.dumps(MINIMAL))
        data.update(sections)
        return JobSpec.model_validate(data)

    return make


@pytest.fixture
def write(tmp_path) -> Callable[..., Path]:
    """`write(text_or_mapping, name="job.yaml")`: a spec file under tmp_path."""

    def make(content: str | dict, name: str = "job.yaml") -> Path:
        p = tmp_path / name
        p.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return p

    return make


@pytest.fixture
def problems_of() -> Callable[..., list[SpecProblem]]:
    """`problems_of(path, overrides)`: the problems `load_spec` reports (it must fail)."""

    def problems(path: Path, overrides: list[str] | None = None) -> list[SpecProblem]:
        with pytest.raises(SpecError) as info:
            load_spec(path, overrides or [])
        return info.value.problems

    return problems


@pytest.fixture
def problems_with(minimal, write, problems_of) -> Callable[..., list[SpecProblem]]:
    """`problems_with(train={...})`: the problems of the minimal spec with sections replaced."""

    def problems(**sections) -> list[SpecProblem]:
        return problems_of(write({**minimal, **sections}))

    return problems
