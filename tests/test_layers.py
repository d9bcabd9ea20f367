"""The import layering of docs/architecture.md holds (import-linter contracts in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> list[str]:
    exe = shutil.which("lint-imports")
    assert exe is not None, "import-linter is a dev dependency: pip install -e '.[dev]'"
    return [exe, str(ROOT / "pyproject.toml"), "--no-cache"]


def test_import_contracts_hold():
    proc = subprocess.run(_lint_imports(), cwd=ROOT / "platform", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_every_stars_package_is_in_a_layer():
    """A new top-level module must be placed in the layers contract, or it escapes the check."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {m.strip() for layer in config["layers"] for m in layer.split("|")}
    pkg = ROOT / "platform" / "stars"
    modules = {f"stars.{p.stem}" for p in pkg.glob("*.py") if p.stem != "__init__"}
    modules |= {f"stars.{p.name}" for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    assert modules - named == set(), f"place these in the layers contract: {sorted(modules - named)}"


def test_every_spec_module_is_in_the_spec_layers():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (spec_contract,) = [c for c in contracts if c.get("containers") == ["stars.spec"]]
    named = {m.strip() for layer in spec_contract["layers"] for m in layer.replace("|", ":").split(":")}
    modules = {p.stem for p in (ROOT / "platform" / "stars" / "spec").glob("*.py") if p.stem != "__init__"}
    assert modules - named == set(), f"place these in the stars.spec layers: {sorted(modules - named)}"
