"""The layout's rules, checked: import contracts (import-linter), no import dodging a cycle, small modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "medkd"
MAX_LINES = 500
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_are_kept() -> None:
    result = _lint_imports(REPO_ROOT / ".importlinter")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_wrong_arrow_breaks_a_contract(tmp_path: Path) -> None:
    """The checker bites: forbidding an arrow the pipeline really has must fail."""
    config = tmp_path / "contracts.ini"
    config.write_text(
        "[importlinter]\nroot_package = medkd\n\n"
        "[importlinter:contract:wrong]\nname = pipeline may not use teachers\ntype = forbidden\n"
        "source_modules =\n    medkd.pipeline\nforbidden_modules =\n    medkd.teachers\n"
    )
    result = _lint_imports(config)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout


def _function_level_medkd_imports(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    found = []
    type_checking_blocks = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in ast.walk(node)
    }
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            module = getattr(inner, "module", None) if isinstance(inner, ast.ImportFrom) else None
            names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
            if id(inner) in type_checking_blocks:
                continue
            if (module or "").startswith("medkd") or any(n.startswith("medkd") for n in names):
                found.append(inner.lineno)
    return found


def test_no_medkd_import_inside_a_function() -> None:
    offenders = {
        str(path.relative_to(REPO_ROOT)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := _function_level_medkd_imports(path))
    }
    assert offenders == {}, f"imports inside functions (a layer is wrong, or a command should be a module): {offenders}"


def test_modules_stay_small_or_say_why() -> None:
    """A module over MAX_LINES states at its top (the module docstring) why it is one module."""
    large = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            if "Why one module" not in docstring:
                large.append(f"{path.relative_to(REPO_ROOT)} ({text.count(chr(10))} lines)")
    assert large == [], f"split these or state 'Why one module: ...' in their docstring: {large}"
