"""The architecture's rules, checked: layers import one way (import-linter contracts in
pyproject.toml), and no code outside a method's own package names a method."""

from __future__ import annotations

import ast
import io
import os
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from server.methods import method_ids

ROOT = Path(__file__).parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())", "--no-cache"]


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([*LINT, str(root / "pyproject.toml")], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_layers_import_one_way() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden", "contract"),
    [
        ("adapters_store/store.py", "from server.engine import Engine", "the store knows artifacts and the registry"),
        ("server/methods/tpv/module.py", "from server.engine import Engine", "server: api -> creation"),
        ("server/methods/attempt/recipe.py", "from server.methods.prompt_tuning import PromptTuning", "a method is one folder"),
        ("server/batcher.py", "import torch", "the batcher imports no torch"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, forbidden: str, contract: str) -> None:
    """The check can fail: the same tree with one forbidden import added is refused."""
    for package in ("server", "adapters_store", "client"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{forbidden}  # added by the test\n")
    result = lint(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.replace("\n", " ")
    assert f"{contract}" in broken and "BROKEN" in broken, result.stdout


def _string_literals(source: str) -> list[tuple[int, str]]:
    literals = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)  # a plain literal: quotes, prefixes
            except (ValueError, SyntaxError):  # f-strings: not a bare id
                continue
            if isinstance(value, str):
                literals.append((token.start[0], value))
    return literals


def test_no_code_outside_a_method_package_names_a_method() -> None:
    """Only server/methods/<id>/ (and tests) may spell a method id: everything else asks the
    registry (`method_ids`, `recipe_for`, `method_for_peft`) or the method through its contract."""
    ids = set(method_ids())
    found = []
    sources = [p for folder in ("server", "adapters_store", "client", "bench", "deploy") for p in (ROOT / folder).rglob("*.py")]
    for path in sources:
        if path.is_relative_to(ROOT / "server" / "methods") and path.parent != ROOT / "server" / "methods":
            continue  # inside a method's own package
        for line, value in _string_literals(path.read_text()):
            if value in ids:
                found.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    makefile = (ROOT / "Makefile").read_text().split()
    found += [f"Makefile: {word}" for word in makefile if word in ids]
    assert not found, "method ids outside their packages:\n" + "\n".join(found)
