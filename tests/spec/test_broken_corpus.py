"""The corpus of broken specs in tests/spec/broken/: each file is broken in one way a user would hit,
and `starsctl validate` and `starsctl submit` must refuse it with exit code 2, the file, the field
and a message that says what was expected; no traceback, and `submit` before Ray is imported.

Each file says what it expects in its first comment lines:

    # expect: <field path>: <message fragment>   (`(file)` as the path: a problem of the whole file)
    # line: <N>         optional: the line every expected problem is reported at
    # hidden: <text>    optional: a secret value that must never be printed

`expect` may repeat (one mistake with a consequence); the problems reported are exactly as many.

`submit` runs in a fresh interpreter (tests/test_cli.py's `run_cli_subprocess`, which reports the
modules imported) for one file per stage of loading (YAML, top level, field, rule, sweep, secret), and
in-process for the rest, with a Ray backend that fails the test if it is reached: ~0.5-1.5 s per
subprocess would make this module take a minute.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stars.cli import app
from stars.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "broken"
WHOLE_FILE = "(file)"
_HEADER = re.compile(r"^#\s*(expect|line|hidden):\s*(.*?)\s*$")


def _cli_tests():  # noqa: ANN202 - the module tests/test_cli.py
    # tests/ is not a package (pytest's importlib mode): load the CLI tests' subprocess helper by path
    spec = importlib.util.spec_from_file_location("_stars_cli_tests", REPO / "tests" / "test_cli.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_cli_subprocess = _cli_tests().run_cli_subprocess


@dataclass(frozen=True)
class BrokenSpec:
    """One corpus file and what its header says `starsctl` must print for it."""

    file: str
    """Path relative to the repository root (what the command is given and prints)."""
    expected: tuple[tuple[str, str], ...]
    """(dotted field path or `(file)`, text its message must contain) of every problem."""
    line: int | None
    hidden: str | None

    @classmethod
    def read(cls, path: Path) -> BrokenSpec:
        expected: list[tuple[str, str]] = []
        header: dict[str, str] = {}
        for text in path.read_text(encoding="utf-8").splitlines():
            m = _HEADER.match(text)
            if m is None:
                if text.startswith("#"):
                    continue  # a comment that says what the mistake is
                break
            if m.group(1) == "expect":
                where, sep, fragment = m.group(2).partition(": ")
                assert sep and fragment, f"{path}: expected '# expect: <field path>: <message fragment>'"
                expected.append((where, fragment))
            else:
                header[m.group(1)] = m.group(2)
        assert expected, f"{path}: the first line must be '# expect: <field path>: <message fragment>'"
        return cls(
            file=str(path.relative_to(REPO)),
            expected=tuple(expected),
            line=int(header["line"]) if "line" in header else None,
            hidden=header.get("hidden"),
        )

    @property
    def name(self) -> str:
        return Path(self.file).stem

    def check(self, exit_code: int, stderr: str) -> None:
        """The refusal `starsctl` printed is the one the header asks for."""
        assert exit_code == 2, stderr
        assert "Traceback" not in stderr, stderr
        if self.hidden is not None:
            assert self.hidden not in stderr, f"a secret value was printed:\n{stderr}"
        lines = [line for line in stderr.splitlines() if line.startswith(f"{self.file}:")]
        n = len(self.expected)
        assert lines and lines[-1] == f"{self.file}: {n} problem{'s' if n != 1 else ''}", stderr
        prefix = re.compile(rf"^{re.escape(self.file)}(?::(\d+))?: ")
        problems = []
        for line in lines[:-1]:
            m = prefix.match(line)
            assert m is not None, line
            problems.append((int(m.group(1)) if m.group(1) else None, line[m.end() :]))
        for path, fragment in self.expected:
            at = [
                line
                for line, rest in problems
                if (rest.startswith(fragment) if path == WHOLE_FILE else rest.startswith(f"{path}: ") and fragment in rest)
            ]
            assert at, f"no problem '{path}: ...{fragment}...' in:\n{stderr}"
            if self.line is not None:
                assert self.line in at, f"'{path}' expected at line {self.line}:\n{stderr}"


CASES = [BrokenSpec.read(p) for p in sorted(CORPUS.glob("*.yaml"))]
#: Submitted in a fresh interpreter: one file per stage of loading a spec.
IN_SUBPROCESS = (
    "tab-indent",  # YAML syntax
    "top-level-list",  # the document
    "duplicate-key",  # the YAML tree
    "max-steps-float",  # a field's type
    "warmup-past-max-steps",  # a rule inside a section
    "eval-task-does-not-fit-training",  # a rule across sections
    "sweep-grid-bad-value",  # a sweep, validated trial by trial
    "secret-env-var-not-string",  # a secret's value is never printed
)


@pytest.fixture(autouse=True)
def _embedded_ray(monkeypatch):
    """Run in the repository root, with no cluster address from the environment (a remote address
    changes how the spec is resolved)."""
    monkeypatch.chdir(REPO)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def test_the_corpus_covers_forty_mistakes():
    assert len(CASES) >= 40
    assert len({c.expected for c in CASES}) == len(CASES)  # no two files expect the same
    assert {c.name for c in CASES} >= set(IN_SUBPROCESS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_validate_refuses_with_the_field_and_a_fix(case: BrokenSpec):
    result = CliRunner().invoke(app, ["validate", case.file])
    case.check(result.exit_code, result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in IN_SUBPROCESS], ids=lambda c: c.name)
def test_submit_refuses(case: BrokenSpec, monkeypatch):
    backend = types.ModuleType("stars.ray_backend.submit")
    backend.submit = lambda *a, **k: pytest.fail(f"{case.file} was submitted")
    monkeypatch.setitem(sys.modules, "stars.ray_backend.submit", backend)
    result = CliRunner().invoke(app, ["submit", case.file])
    case.check(result.exit_code, result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize("case", [c for c in CASES if c.name in IN_SUBPROCESS], ids=lambda c: c.name)
def test_submit_refuses_before_ray_is_imported(case: BrokenSpec):
    with pytest.raises(SpecError):  # a spec that loads would really run: never submit it
        load_spec(case.file)
    rc, out, err, heavy = run_cli_subprocess("submit", case.file)
    case.check(rc, err)
    assert out == ""
    assert "ray" not in heavy and "torch" not in heavy, heavy
